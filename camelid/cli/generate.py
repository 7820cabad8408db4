"""Continue a prompt and print only the continuation, streamed as it is generated.

examples:
  camelid generate --model model.gguf --prompt "The capital of France is" --temperature 0
  echo "Once upon a time" | camelid generate --model model.gguf --prompt - --max-new-tokens 64
  camelid generate --model model.gguf --chat --prompt "Write a haiku about llamas"
  camelid generate --model llama-7b --draft tinyllama --prompt "def quicksort(xs):" --temperature 0
  camelid generate --model model.gguf --quantize int4 --compile --prompt "Once upon a time"
"""

from __future__ import annotations

import argparse
import sys

from camelid.cli.common import (add_draft_arguments, add_model_arguments, add_sampling_arguments, load_llm,
                                sampling_kwargs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_draft_arguments(p)
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt; '-' reads it from stdin")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message with the chat template")
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt (with --chat)")
    add_sampling_arguments(p, temperature=0.6)
    p.add_argument("--stats", action="store_true", help="print prefill and decode speed to stderr")


def main(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = load_llm(args)
    kwargs = sampling_kwargs(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        pieces = llm.stream(llm.tokenizer.encode_chat(messages), **kwargs)
    else:
        pieces = llm.stream(prompt, **kwargs)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        s = llm.stats
        print(f"prefill {s.prompt_tokens} tokens at {s.prefill_tps:.1f} tokens/s; "
              f"decode {s.new_tokens} tokens at {s.decode_tps:.1f} tokens/s", file=sys.stderr)
    return 0
