"""`camelid` command line: a table of subcommands, each a small function in this package.

Every user mistake arrives here as a CamelidError and leaves as one line on stderr with exit
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from camelid import __version__
from camelid.cli import (
    chat,
    convert,
    data,
    evaluation,
    finetune,
    generate,
    info,
    plan,
    quickstart,
    reward,
    serve,
    tokenizer,
    train,
)
from camelid.errors import CamelidError
from camelid.platform import keep_freed_memory

# name -> (module with add_arguments(parser) and main(args), one-line help)
COMMANDS = {
    "quickstart": (quickstart, "the end-to-end demo behind the README's first command"),
    "info": (info, "config, parameter count and memory of a named size or a checkpoint"),
    "generate": (generate, "continue a prompt with a model"),
    "chat": (chat, "talk to a model in the terminal, with its chat template"),
    "convert": (convert, "convert a checkpoint between camelid, Hugging Face, Meta and GGUF formats"),
    "data": (data, "prepare training data: clean, deduplicate, filter, tokenize (camelid data prepare)"),
    "tokenizer": (tokenizer, "train a SentencePiece tokenizer with LLaMA's settings"),
    "train": (train, "pretrain a LLaMA model from a TOML recipe; rerun to resume"),
    "finetune": (finetune, "adapt a model to instructions, preferences or a reward (DPO, PPO, GRPO): full, LoRA or "
                           "QLoRA, from a TOML recipe; rerun to resume"),
    "reward": (reward, "score texts or preference pairs with a reward model (accuracy, margins)"),
    "eval": (evaluation, "evaluate zero- and few-shot with the paper's protocol (multiple choice, exact match, pass@k)"),
    "serve": (serve, "serve a model over an OpenAI-compatible HTTP API, with a chat page"),
    "plan": (plan, "memory needed to run or train a model, and whether it fits a card"),
}

EPILOG = """examples:
  camelid quickstart
  camelid info 7B
  camelid generate --model smollm2-135m-instruct --prompt "The capital of France is" --temperature 0
  camelid chat --model path/to/model.gguf
  camelid convert path/to/hf-model out.gguf --to gguf --gguf-type Q8_0
  camelid data prepare recipes/quickstart-data.toml
  camelid train recipes/quickstart-train.toml --train.max_steps=100
  camelid finetune recipes/quickstart-sft.toml
  camelid reward --model runs/rm/model --input pairs.jsonl
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse's refusals as one line, like every other user mistake: argparse prints the whole
    usage block first, which buries the line that says what is wrong. Subparsers inherit this
    class, so `camelid generate --top-k x` says `camelid generate: error: ...` and points at
    that command's --help."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="camelid", description="LLaMA in PyTorch: train, evaluate and run LLaMA-family models.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"camelid {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(handler=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        command = f"camelid {args.command}" if getattr(args, "command", None) else "camelid"
        print(f"{command}: error: unrecognized arguments: {' '.join(extra)} (see {command} --help)", file=sys.stderr)
        return 2
    args.overrides = extra
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    keep_freed_memory()
    try:
        return int(args.handler(args) or 0)
    except CamelidError as e:
        print(f"camelid {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
