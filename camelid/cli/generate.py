"""Continue a prompt and print only the continuation, streamed as it is generated.

examples:
  camelid generate --model model.gguf --prompt "The capital of France is" --temperature 0
  echo "Once upon a time" | camelid generate --model model.gguf --prompt - --max-new-tokens 64
  camelid generate --model model.gguf --chat --prompt "Write a haiku about llamas"
  camelid generate --model llama-7b --draft tinyllama --prompt "def quicksort(xs):" --temperature 0
  camelid generate --model model.gguf --quantize int4 --prompt "Once upon a time"
  camelid generate --model model.gguf --no-compile --prompt "Hi"   # eager decoding, no compilation
"""

from __future__ import annotations

import argparse
import sys

from camelid.cli.common import (add_draft_arguments, add_model_arguments, add_sampling_arguments, load_llm,
                                sampling_params)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_draft_arguments(p)
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt; '-' reads it from stdin")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message with the chat template")
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt (with --chat)")
    add_sampling_arguments(p, temperature=0.6)
    p.add_argument("--stats", action="store_true",
                   help="print prefill and decode speed, and how many decode steps ran compiled, to stderr")


def main(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = load_llm(args)
    params = sampling_params(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        pieces = llm.stream(llm.tokenizer.encode_chat(messages), params)
    else:
        pieces = llm.stream(prompt, params)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        s, steps = llm.stats, llm.engine.decode_steps
        how = f" ({steps['compiled']} of {sum(steps.values())} steps compiled)" if llm.decoder else " (eager)"
        print(f"prefill {s.prompt_tokens} tokens at {s.prefill_tps:.1f} tokens/s, first token after "
              f"{s.first_token_s * 1000:.0f} ms; decode {s.new_tokens} tokens at {s.decode_tps:.1f} tokens/s{how}",
              file=sys.stderr)
    return 0
