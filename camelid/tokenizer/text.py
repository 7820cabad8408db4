"""The one rule for text that is not valid Unicode: it is not an error, its bad parts become
U+FFFD, exactly as `bytes.decode("utf-8", "replace")` would have made them.

Python hands such text over as lone surrogates: undecodable bytes in argv, stdin or file names
arrive as U+DC80..U+DCFF (the surrogateescape error handler), and JSON's "\\ud800" escapes as
themselves. Neither can be encoded as UTF-8, so tokenizers written in C++ or Rust refuse them
with errors that name nothing. Every str a tokenizer encodes passes through `replace_invalid`
(`encodable`).
"""

from __future__ import annotations

import re

from camelid.errors import CamelidError

REPLACEMENT = "\ufffd"
_SURROGATES = re.compile("[\ud800-\udfff]+")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]+")


def has_invalid(text: str) -> bool:
    """Whether `text` holds lone surrogates (undecodable bytes or bad escapes)."""
    # isascii() reads a flag, not the text: valid ASCII, the common case, costs nothing
    return not text.isascii() and _SURROGATES.search(text) is not None


def replace_invalid(text: str) -> str:
    """`text` with its lone surrogates replaced by U+FFFD (valid text comes back unchanged, the
    same object). A run of surrogate-escaped bytes becomes what decoding those bytes with
    errors="replace" gives (one U+FFFD per maximal invalid sequence); any other surrogate
    becomes one U+FFFD."""
    if not has_invalid(text):
        return text
    return _SURROGATES.sub(_replace_run, text)


def _replace_run(match: re.Match) -> str:
    run = match.group()
    if _ESCAPED_BYTE.fullmatch(run):
        decoded = bytes(ord(c) - 0xDC00 for c in run).decode("utf-8", "replace")
        # surrogateescape never escapes bytes that decode: if these do, they came from
        # elsewhere (JSON escapes), and each surrogate is one bad character
        if decoded.count(REPLACEMENT) == len(decoded):
            return decoded
    return REPLACEMENT * len(run)


def encodable(text: object) -> str:
    """What a tokenizer encodes: `text` by the rule above; anything but a str is refused."""
    if not isinstance(text, str):
        raise CamelidError(f"tokenizer: can only encode text (a str), not {type(text).__name__}")
    return replace_invalid(text)
