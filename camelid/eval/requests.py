"""What a task asks of the model, and how text becomes the token ids that are scored.

Log-likelihood requests follow lm-evaluation-harness, whose conventions published numbers
assume: trailing spaces of the context move into the continuation; context and continuation are
tokenized together and split at the character boundary, so a token that merges across it
belongs to the continuation; an empty context is scored from BOS (or EOS when there is none).
Chat requests (a conversation as context) are tokenized as chat and generation tokenize them:
the template's markup as special tokens, BOS as `Tokenizer.encode_rendered` adds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from camelid.errors import CamelidError
from camelid.tokenizer import Tokenizer


@dataclass(frozen=True)
class Loglikelihood:
    context: str
    continuation: str
    chat: bool = False    # the context is a conversation rendered with the chat template (chat_requests)


@dataclass(frozen=True)
class Rolling:
    text: str


@dataclass(frozen=True)
class Generate:
    context: str
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    chat: bool = False    # the context is a rendered conversation: its markup is special tokens


@dataclass
class Encoded:
    context: list[int]                       # never empty: BOS (or EOS) when the text has no tokens
    continuation: list[int]                  # never empty
    key: tuple[int, ...] = field(init=False)  # requests sharing a context share its KV cache

    def __post_init__(self) -> None:
        self.key = tuple(self.context)


def prefix_token(tok: Tokenizer) -> int:
    token = tok.bos_id if tok.bos_id is not None else tok.eos_id
    if token is None:
        raise CamelidError("tokenizer has neither BOS nor EOS: an empty context cannot be scored")
    return token


def _context_tokens(tok: Tokenizer, whole: list[int], context: str) -> int:
    """How many leading tokens of `whole` lie entirely inside `context` (binary search on the
    decoded prefix, which only grows with more tokens)."""
    lo, hi = 0, len(whole)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        text = tok.decode(whole[:mid])
        if len(text) <= len(context) and context.startswith(text):
            lo = mid
        else:
            hi = mid - 1
    return lo


def scored_split(context: str, continuation: str) -> tuple[str, str]:
    """The context and continuation as scored: trailing spaces of the context move into the
    continuation (lm-evaluation-harness does the same)."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        return context[:-spaces], context[-spaces:] + continuation
    return context, continuation


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> Encoded:
    context, continuation = scored_split(context, continuation)
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    whole = tok.encode(context + continuation, special=False)
    n = _context_tokens(tok, whole, context) if context else 0
    ctx, cont = bos + whole[:n], whole[n:]
    if not cont:
        raise CamelidError(f"log-likelihood request: the continuation {continuation!r} has no tokens of its own")
    if not ctx:
        ctx = [prefix_token(tok)]
    return Encoded(ctx, cont)


def encode_chat_pair(tok: Tokenizer, context: str, continuation: str) -> Encoded:
    """A chat request's ids: `context` is a rendered conversation ending in the generation
    prompt. The template's markup is special tokens here, so the split is where the ids of the
    context alone stop agreeing with those of the whole: a token merging across the boundary
    belongs to the continuation, as in encode_pair."""
    context, continuation = scored_split(context, continuation)
    whole = tok.encode_rendered(context + continuation)
    alone = tok.encode_rendered(context)
    n = 0
    while n < min(len(whole), len(alone)) and whole[n] == alone[n]:
        n += 1
    ctx, cont = whole[:n], whole[n:]
    if not cont:
        raise CamelidError(f"log-likelihood request: the continuation {continuation!r} has no tokens of its own")
    return Encoded(ctx or [prefix_token(tok)], cont)


def chat_requests(tok: Tokenizer, messages: list[dict[str, str]], choices: list[str]) -> list[Loglikelihood]:
    """One request per choice for a conversation answered by the assistant: the context is the
    conversation rendered with the model's chat template and its generation prompt; the
    continuation is the choice as written, preceded by whatever whitespace the template puts
    between the generation prompt and an assistant's answer (Llama-2's "[/INST] answer"; none in
    ChatML), so that the choice is scored as the model sees answers in training. A template that
    cannot render a conversation ending on an answer gets the choice as written."""
    context = tok.apply_chat_template(messages, add_generation_prompt=True)
    requests = []
    for choice in choices:
        try:
            full = tok.apply_chat_template(messages + [{"role": "assistant", "content": choice}],
                                           add_generation_prompt=False)
        except CamelidError:
            full = ""
        rest = full[len(context):] if full.startswith(context) else ""
        at = rest.find(choice) if choice else -1
        lead = rest[:at] if at > 0 and not rest[:at].strip() else ""
        requests.append(Loglikelihood(context, lead + choice, chat=True))
    return requests
