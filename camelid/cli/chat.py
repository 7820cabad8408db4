"""Talk to a model in the terminal. The conversation is formatted with the model's own chat
template (from the GGUF or tokenizer_config.json; Llama-2's [INST] format otherwise).

Type a message and press Enter. Commands: /reset (forget the conversation), /system TEXT (set
the system prompt and reset), /help, /exit (or Ctrl-D). A message that starts with "/" is sent
as "//message". Ctrl-C stops a reply and returns to the prompt; at the prompt it ends the chat.

When the conversation outgrows the model's context, the oldest turns are dropped (the system
prompt stays) and a line says so; a single message too long to fit is refused. Text is read as
UTF-8; bytes that are not valid UTF-8 become U+FFFD, with a warning.
"""

from __future__ import annotations

import argparse
import sys

from camelid.cli.common import (add_draft_arguments, add_model_arguments, add_sampling_arguments,
                                check_model_arguments, lenient_stdin, load_llm, sampling_params, user_text)
from camelid.errors import CamelidError

COMMANDS = "/reset, /system TEXT, /help, /exit"
HELP = f"commands: {COMMANDS}; start a message with // to send one that begins with /"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_draft_arguments(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    add_sampling_arguments(p, temperature=0.7)


def say(text: str) -> None:
    print(f"({text})", file=sys.stderr, flush=True)


class Conversation:
    """The system prompt and the turns, cut to what the context holds: a prompt must leave
    `reserve` tokens for the reply."""

    def __init__(self, llm, system: str | None, reserve: int):
        self.llm, self.system, self.reserve = llm, system, reserve
        self.context = llm.config.max_seq_len
        self.turns: list[dict[str, str]] = []

    def messages(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def tokens(self, turns: list[dict[str, str]]) -> int:
        return len(self.llm.tokenizer.encode_chat(self.messages(turns)))

    def check_system(self, where: str) -> None:
        """A system prompt that leaves no room for a message is refused (`where` names it)."""
        if not self.system:
            return
        used = self.tokens([{"role": "user", "content": ""}])
        if used + self.reserve >= self.context:
            raise CamelidError(f"{where}: the system prompt takes about {used} tokens, too many for the model's "
                               f"context of {self.context} with {self.reserve} left for a reply; shorten it")

    def ask(self, text: str) -> list[dict[str, str]] | None:
        """The messages to send for a new user message, dropping the oldest turns as needed
        (and saying so); None, after saying why, when the message cannot fit at all."""
        message = {"role": "user", "content": text}
        room = self.context - self.reserve
        alone = self.tokens([message])
        if alone > room:
            say(f"message not sent: it takes {alone} tokens{' with the system prompt' if self.system else ''}, "
                f"and the model's context of {self.context} holds {room} besides the reply; shorten it")
            return None
        turns, dropped = self.turns + [message], 0
        # a turn is a user message and its reply: dropping them together keeps the roles alternating
        while len(turns) > 1 and self.tokens(turns) > room:
            turns, dropped = turns[2:], dropped + 1
        if dropped:
            say(f"dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to fit the model's context of "
                f"{self.context} tokens")
        self.turns = turns
        return self.messages(turns)


def main(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    check_model_arguments(args)
    warned: set[str] = set()
    system = user_text(args.system, "--system", args, warned) if args.system else None
    llm = load_llm(args)
    chat = Conversation(llm, system, reserve=min(params.max_new_tokens, llm.config.max_seq_len // 2))
    chat.check_system("--system")
    lenient_stdin()
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {llm.source} ({llm.config.n_layers} layers, dim {llm.config.dim}); {COMMANDS}; "
              "Ctrl-C stops a reply", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: the end
            if interactive:
                print(file=sys.stderr)
            break
        text = user_text(line, "input", args, warned).strip()
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            command, _, rest = text.partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command in ("/reset", "/system"):
                if command == "/system":
                    previous, chat.system = chat.system, rest.strip() or None
                    try:
                        chat.check_system("/system")
                    except CamelidError as e:
                        chat.system = previous
                        say(f"{e}; the system prompt is unchanged")
                        continue
                chat.turns = []
                say("conversation reset")
            elif command == "/help":
                say(HELP)
            else:
                say(f"unknown command {command}; {HELP}")
            continue
        if text.startswith("//"):
            text = text[1:]
        messages = chat.ask(text)
        if messages is None:
            continue
        if interactive:
            sys.stdout.write("assistant> ")
        reply, stopped = "", False
        pieces = llm.chat_stream(messages, params)
        try:
            for piece in pieces:
                reply += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stopped = True
        finally:
            pieces.close()  # the generation's cache goes back at once, wherever Ctrl-C struck
        sys.stdout.write("\n")
        if stopped:
            say("reply stopped")
        if stopped and not reply.strip():  # no answer to keep: forget the message too (roles alternate)
            chat.turns.pop()
        else:
            chat.turns.append({"role": "assistant", "content": reply.strip()})
    return 0
