"""Structured output: generation held to a JSON schema (OpenAI's `response_format`), through
llguidance (Microsoft's grammar engine, the one vLLM and SGLang offer too; it needs nothing
from transformers and works on the tokenizer's raw token bytes).

Each step a row's matcher names the tokens that keep the text a prefix of some valid document
(a bitmask over the vocabulary); the others get -inf before sampling, so whatever the sampler
picks, temperature and all, stays valid, and the row ends as soon as the document is complete.
Whitespace between JSON tokens is fixed (`whitespace_flexible` off): a small model left free
to add spaces and newlines may do so until it runs out of tokens.
"""

from __future__ import annotations

from typing import Any

import llguidance   # not llguidance.torch, which imports torch._dynamo (a second at start-up)
import torch

from camelid.errors import CamelidError
from camelid.tokenizer import Tokenizer

ANY_OBJECT = {"type": "object"}   # response_format json_object: any JSON object
_JSON_OPTIONS = {"whitespace_flexible": False}
_BITS = torch.arange(32, dtype=torch.int32)


class _ByteTokenizer:
    """What llguidance's TokenizerWrapper reads: each token's bytes, the control tokens
    (never part of a document), EOS, and an encoder for the grammar's literal strings."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokens = tokenizer.token_bytes()
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.control_ids())
        self._encode = tokenizer.encode

    def __call__(self, text: bytes) -> list[int]:
        return self._encode(text.decode("utf-8", "replace"), special=False)


class GrammarVocabulary:
    """A tokenizer as llguidance sees it, built once per model (it indexes the vocabulary)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        if tokenizer.eos_id is None:
            raise CamelidError("structured output needs a tokenizer with an end-of-text token")
        self.ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokenizer(tokenizer)))
        self.vocab_size = vocab_size    # the model's: may exceed the tokenizer's (padded embeddings)
        self.stop_ids = sorted(i for i in tokenizer.stop_ids if i < vocab_size)
        self.eos_id = tokenizer.eos_id

    def json_grammar(self, schema: dict[str, Any] | None) -> str:
        """The grammar for documents valid against `schema` (None: any JSON object); a schema
        llguidance cannot compile is a CamelidError with its reason."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(ANY_OBJECT if schema is None else schema,
                                                                    overrides=_JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise CamelidError(f"not a usable JSON schema: {e}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.ll)
        if error:
            raise CamelidError(f"not a usable JSON schema: {_first_line(error)}")
        return grammar

    def constraint(self, grammar: str) -> "Constraint":
        return Constraint(self, grammar)


class Constraint:
    """One row's position in its grammar: `restrict` its next token's logits, `accept` the token."""

    def __init__(self, vocab: GrammarVocabulary, grammar: str):
        self.vocab = vocab
        self.matcher = llguidance.LLMatcher(vocab.ll, grammar)
        if self.matcher.is_error():
            raise CamelidError(f"not a usable JSON schema: {_first_line(self.matcher.get_error())}")
        self._words = torch.full(((vocab.ll.vocab_size + 31) // 32,), -1, dtype=torch.int32)   # bit t: token t allowed

    @property
    def finished(self) -> bool:
        """The document is complete (or the matcher failed: nothing more can be added)."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [V] with every token the grammar forbids at -inf (a new tensor). Where the
        grammar may end here, the model's stop tokens are allowed (llguidance knows only EOS)."""
        self.matcher.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        allowed = ((self._words.unsqueeze(-1) >> _BITS) & 1).view(-1).bool()[: self.vocab.ll.vocab_size]
        keep = torch.zeros(logits.size(-1), dtype=torch.bool)
        n = min(allowed.numel(), keep.numel())
        keep[:n] = allowed[:n]
        if keep[self.vocab.eos_id]:
            keep[self.vocab.stop_ids] = True
        return logits.float().masked_fill(~keep.to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        if token in self.vocab.stop_ids:
            token = self.vocab.eos_id
        self.matcher.consume_token(token)


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"

