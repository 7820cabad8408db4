"""OpenAI's response and chunk objects for completions and chat completions, with their
log-probabilities, built from what the batcher's `Event`s carry.

A request has one choice per prompt and per `n` (choice index = prompt index x n + j, as
OpenAI numbers them); all chunks of one response share its id. Log-probabilities take each
endpoint's own shape: completions the legacy {tokens, token_logprobs, top_logprobs, text_offset}
(what lm-evaluation-harness's `local-completions` reads), chat a list of {token, logprob,
bytes, top_logprobs}.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from camelid.generate.sampling import TokenLogprob
from camelid.serve.batcher import Event
from camelid.tokenizer import Tokenizer

LEAST_LOGPROB = -9999.0   # what OpenAI reports for a token the model rules out (JSON has no -inf)


@dataclass
class Choice:
    """One choice as its events arrive."""

    index: int
    prompt: list[int]
    echo: str | None = None   # the prompt's text, put before the completion (a completion's echo)
    text: str = ""
    logprobs: list[tuple[int, TokenLogprob | None]] = field(default_factory=list)   # (token, its entry)
    finish_reason: str | None = None
    completion_tokens: int = 0
    offset: int = 0   # streaming: the next token's text_offset

    def add(self, event: Event) -> None:
        self.text += event.text
        self.logprobs += self.new_logprobs(event)
        if event.finish_reason:
            self.finish_reason, self.completion_tokens = event.finish_reason, event.completion_tokens

    def new_logprobs(self, event: Event) -> list[tuple[int, TokenLogprob | None]]:
        """The (token, entry) pairs an event brings: the prompt's (the first has none), or new tokens'."""
        if event.prompt_logprobs is not None:
            return list(zip(self.prompt, event.prompt_logprobs))
        return [(e.token, e) for e in event.logprobs]


def usage(choices: list[Choice], prompts: list[list[int]]) -> dict:
    """Prompt tokens counted once per prompt, whatever n."""
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Format:
    prefix = object_name = chunk_name = ""

    def __init__(self, model_name: str, tokenizer: Tokenizer, logprobs: bool):
        self.model, self.tokenizer, self.with_logprobs = model_name, tokenizer, logprobs
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def envelope(self, object_name: str, choices: list) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}

    def token_bytes(self, token: int) -> bytes:
        """A token's bytes; none for the ids of a model's padded vocabulary beyond the tokenizer's."""
        table = self.tokenizer.token_bytes()
        return table[token] if token < len(table) else b""

    def token_text(self, token: int) -> str:
        """A token's text, or, for a piece of a character (a byte-level token that is not valid
        UTF-8 alone), OpenAI's "bytes:\\xNN" form, so that two such tokens stay apart."""
        raw = self.token_bytes(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def whole(self, choices: list[Choice], prompts: list[list[int]]) -> dict:
        body = [self.choice(c, (c.echo or "") + c.text, c.logprobs, c.finish_reason) for c in choices]
        return {**self.envelope(self.object_name, body), "usage": usage(choices, prompts)}

    def usage_chunk(self, choices: list[Choice], prompts: list[list[int]]) -> dict:
        return {**self.envelope(self.chunk_name, []), "usage": usage(choices, prompts)}

    def opening(self, choice: Choice) -> dict | None:
        """The chunk that opens a choice's stream, if the endpoint has one."""
        return None

    def chunk(self, choice: Choice, text: str, logprobs: list, finish_reason: str | None) -> dict:
        return self.envelope(self.chunk_name, [self.choice(choice, text, logprobs, finish_reason, delta=True)])

    def choice(self, choice: Choice, text: str, logprobs: list, finish_reason: str | None,
               delta: bool = False) -> dict:
        raise NotImplementedError


class CompletionFormat(Format):
    prefix, object_name, chunk_name = "cmpl", "text_completion", "text_completion"

    def choice(self, choice: Choice, text: str, logprobs: list, finish_reason: str | None,
               delta: bool = False) -> dict:
        body = {"index": choice.index, "text": text, "finish_reason": finish_reason, "logprobs": None}
        if self.with_logprobs:
            body["logprobs"], end = self.logprobs(logprobs, choice.offset if delta else 0)
            if delta:
                choice.offset = end
        return body

    def logprobs(self, pairs: list[tuple[int, TokenLogprob | None]], start: int) -> tuple[dict, int]:
        """The legacy shape, and where the next token's text_offset starts. Offsets count the
        tokens' own texts (a control token's markup included), from the choice's first token."""
        texts = [self.token_text(t) for t, _ in pairs]
        offsets, at = [], start
        for text in texts:
            offsets.append(at)
            at += len(text)
        return {"tokens": texts,
                "token_logprobs": [None if e is None else _finite(e.logprob) for _, e in pairs],
                "top_logprobs": [None if e is None else {self.token_text(t): _finite(lp) for t, lp in e.top}
                                 for _, e in pairs],
                "text_offset": offsets}, at


class ChatFormat(Format):
    prefix, object_name, chunk_name = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def choice(self, choice: Choice, text: str, logprobs: list, finish_reason: str | None,
               delta: bool = False) -> dict:
        body = {"index": choice.index, "finish_reason": finish_reason,
                "logprobs": {"content": [self.entry(e) for _, e in logprobs]} if self.with_logprobs else None}
        if delta:
            body["delta"] = {"content": text} if text else {}
        else:
            body["message"] = {"role": "assistant", "content": text}
        return body

    def opening(self, choice: Choice) -> dict:
        return self.envelope(self.chunk_name, [{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}])

    def entry(self, e: TokenLogprob) -> dict:
        return {**self.alternative(e.token, e.logprob),
                "top_logprobs": [self.alternative(t, lp) for t, lp in e.top]}

    def alternative(self, token: int, logprob: float) -> dict:
        return {"token": self.token_text(token), "logprob": _finite(logprob), "bytes": list(self.token_bytes(token))}


def _finite(logprob: float) -> float:
    return max(logprob, LEAST_LOGPROB)
