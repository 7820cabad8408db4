"""Streaming detokenization.

Decoding one token at a time drops SentencePiece's leading spaces (transformers #22710, #28776)
and cuts multi-byte UTF-8 characters that span several byte tokens in half. Instead, decode a
short window of recent tokens twice, with and without the new ones, and emit the difference;
hold the text back while it ends in an incomplete character (U+FFFD).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from camelid.tokenizer.base import Tokenizer

CONTEXT_TOKENS = 6  # prompt tokens kept as left context, so the first new piece keeps its space


class StreamDecoder:
    def __init__(self, tokenizer: "Tokenizer", context: Sequence[int] = ()):
        self.tok = tokenizer
        self.ids = list(context[-CONTEXT_TOKENS:])
        self.prefix = 0              # window start
        self.read = len(self.ids)    # tokens before this have been emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        seen = self.tok.decode(self.ids[self.prefix:self.read])
        full = self.tok.decode(self.ids[self.prefix:])
        if len(full) <= len(seen) or (full.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(seen):]
