"""Continue a prompt and print only the continuation, streamed as it is generated.

Text is read as UTF-8; bytes that are not valid UTF-8 become U+FFFD, with a warning.

examples:
  camelid generate --model model.gguf --prompt "The capital of France is" --temperature 0
  echo "Once upon a time" | camelid generate --model model.gguf --prompt - --max-new-tokens 64
  camelid generate --model model.gguf --prompt-file story.txt --max-new-tokens 64
  camelid generate --model model.gguf --chat --prompt "Write a haiku about llamas"
  camelid generate --model llama-7b --draft tinyllama --prompt "def quicksort(xs):" --temperature 0
  camelid generate --model model.gguf --quantize int4 --prompt "Once upon a time"
  camelid generate --model model.gguf --no-compile --prompt "Hi"   # eager decoding, no compilation
"""

from __future__ import annotations

import argparse
import sys

from camelid.cli.common import (add_draft_arguments, add_model_arguments, add_sampling_arguments,
                                check_model_arguments, lenient_stdin, load_llm, read_text_file, sampling_params,
                                user_text)
from camelid.errors import CamelidError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_draft_arguments(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="the prompt; '-' reads it from stdin")
    prompt.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a text file")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message with the chat template")
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt (only with --chat)")
    add_sampling_arguments(p, temperature=0.6)
    p.add_argument("--stats", action="store_true",
                   help="print prefill and decode speed, and how many decode steps ran compiled, to stderr "
                        "(time spent loading or compiling decode steps is reported apart, not as decoding)")


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        return read_text_file(args.prompt_file, "--prompt-file", args)
    if args.prompt == "-":
        lenient_stdin()
        return user_text(sys.stdin.read(), "--prompt - (stdin)", args)
    return user_text(args.prompt, "--prompt", args)


def main(args: argparse.Namespace) -> int:
    # every option is checked, and the prompt read, before the model loads
    if args.system is not None and not args.chat:
        raise CamelidError("--system: only with --chat (a plain prompt has no system message); add --chat or "
                           "leave --system out")
    params = sampling_params(args)
    check_model_arguments(args)
    prompt = read_prompt(args)
    system = user_text(args.system, "--system", args) if args.system else None
    llm = load_llm(args)
    if args.chat:
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": prompt}]
        pieces = llm.stream(llm.tokenizer.encode_chat(messages), params)
    else:
        pieces = llm.stream(prompt, params)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        print_stats(llm)
    return 0


def print_stats(llm) -> None:
    s, steps = llm.stats, llm.engine.decode_steps
    how = f" ({steps['compiled']} of {sum(steps.values())} steps compiled)" if llm.decoder else " (eager)"
    line = (f"prefill {s.prompt_tokens} tokens at {s.prefill_tps:.1f} tokens/s, first token after "
            f"{s.first_token_s * 1000:.0f} ms; decode {s.new_tokens} tokens at {s.decode_tps:.1f} tokens/s{how}")
    if s.warmup_tokens or s.warmup_s >= 0.01:
        line += f"; {s.warmup_s:.2f} s loading or compiling decode steps, not counted as decoding"
    print(line, file=sys.stderr)
