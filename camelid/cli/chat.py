"""Talk to a model in the terminal. The conversation is formatted with the model's own chat
template (from the GGUF or tokenizer_config.json; Llama-2's [INST] format otherwise).

Type a message and press Enter. Commands: /reset (forget the conversation), /system TEXT (set
the system prompt and reset), /exit (or Ctrl-D).
"""

from __future__ import annotations

import argparse
import sys

from camelid.cli.common import add_draft_arguments, add_model_arguments, add_sampling_arguments, load_llm, sampling_params


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_draft_arguments(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    add_sampling_arguments(p, temperature=0.7)


def main(args: argparse.Namespace) -> int:
    llm = load_llm(args)
    params = sampling_params(args)
    system = args.system
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {llm.source} ({llm.config.n_layers} layers, dim {llm.config.dim}); "
              "/reset, /system TEXT, /exit", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset" or text.startswith("/system"):
            if text.startswith("/system"):
                system = text[len("/system"):].strip() or None
            history = []
            print("(conversation reset)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        if interactive:
            sys.stdout.write("assistant> ")
        reply = ""
        for piece in llm.chat_stream(messages, params):
            reply += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply.strip()})
    return 0
