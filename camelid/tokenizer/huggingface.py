"""Byte-level BPE (GPT-2 style) and other Hugging Face fast tokenizers, through the `tokenizers`
library: from a `tokenizer.json`, or built from GGUF metadata (`tokenizer.ggml.model = "gpt2"`)
with the pre-tokenizer that `tokenizer.ggml.pre` names, as llama.cpp does.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFBackend

from camelid.errors import CamelidError
from camelid.tokenizer.base import CONTROL, NORMAL, USER_DEFINED, Tokenizer
from camelid.tokenizer.text import encodable

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> the regular expressions applied in turn before BPE (llama.cpp's
# llama-vocab.cpp lists the same families). The byte-to-unicode mapping always follows.
PRE_TOKENIZERS: dict[str, list[str]] = {
    "default": [GPT2_SPLIT], "gpt2": [GPT2_SPLIT], "gpt-2": [GPT2_SPLIT], "mpt": [GPT2_SPLIT],
    "olmo": [GPT2_SPLIT], "jais": [GPT2_SPLIT],
    "smollm": [r"\p{N}", GPT2_SPLIT], "starcoder": [r"\p{N}", GPT2_SPLIT], "refact": [r"\p{N}", GPT2_SPLIT],
    "command-r": [r"\p{N}", GPT2_SPLIT], "codeshell": [r"\p{N}", GPT2_SPLIT],
    "llama3": [LLAMA3_SPLIT], "llama-bpe": [LLAMA3_SPLIT], "llama-v3": [LLAMA3_SPLIT],
    "smaug-bpe": [LLAMA3_SPLIT], "dbrx": [LLAMA3_SPLIT],
    "qwen2": [QWEN2_SPLIT], "stablelm2": [QWEN2_SPLIT], "deepseek-r1-qwen": [QWEN2_SPLIT],
}


def _gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character: printable Latin-1
    stays itself, the other bytes are shifted to 256 and up (the `bytes_to_unicode` table)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    table = {chr(b): b for b in kept}
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


_UNICODE_TO_BYTE = _gpt2_byte_alphabet()


def byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre not in PRE_TOKENIZERS:
        warnings.warn(f"GGUF pre-tokenizer {pre!r} is not known to camelid; using GPT-2's. "
                      f"Known: {', '.join(sorted(PRE_TOKENIZERS))}", stacklevel=3)
        pre = "gpt2"
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
    return pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def detect_pre(backend: HFBackend) -> str:
    """Name a tokenizer.json pre-tokenizer the way GGUF's `tokenizer.ggml.pre` does."""
    spec = json.dumps(json.loads(backend.to_str()).get("pre_tokenizer"))
    if '"Digits"' in spec and '"individual_digits": true' in spec:
        return "smollm"
    if "\\\\p{N}{1,3}" in spec:
        return "llama-bpe"
    if "[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}|" in spec:
        return "qwen2"
    return "gpt2"


class HFTokenizer(Tokenizer):
    def __init__(self, backend: HFBackend, pre: str | None = None):
        self.backend = backend
        self.pre = pre or detect_pre(backend)
        self._specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
        self._special_flag = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        self._byte_level = '"ByteLevel"' in json.dumps(json.loads(backend.to_str()).get("decoder"))

    @classmethod
    def from_file(cls, path: Path) -> "HFTokenizer":
        try:
            return cls(HFBackend.from_file(str(path)))
        except Exception as e:
            raise CamelidError(f"{path}: not a valid tokenizer.json ({e})") from None

    @classmethod
    def from_gguf_vocab(cls, tokens: Sequence[str], merges: Sequence[str], types: Sequence[int],
                        pre: str, where: str = "GGUF vocabulary") -> "HFTokenizer":
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = []
        for m in merges:
            a, sep, b = m.partition(" ")
            if not sep:
                raise CamelidError(f"{where}: malformed merge {m!r} (expected 'left right')")
            pairs.append((a, b))
        backend = HFBackend(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False,
                                       ignore_merges=pre in ("llama3", "llama-bpe", "llama-v3")))
        backend.pre_tokenizer = byte_level_pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, k in zip(tokens, types) if k == CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, k in zip(tokens, types) if k == USER_DEFINED])
        return cls(backend, pre=pre)

    # ---- Tokenizer ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _encode_plain(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, bos: bool = False, eos: bool = False, special: bool = True) -> list[int]:
        # The backend matches added tokens itself, exactly as transformers does; with
        # special=False it reads their markup as plain text.
        text = encodable(text)
        self.backend.encode_special_tokens = not special
        try:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        finally:
            self.backend.encode_special_tokens = False
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids + \
               ([self.eos_id] if eos and self.eos_id is not None else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self.backend.id_to_token(int(i))

    def piece_to_id(self, piece: str) -> int | None:
        return self.backend.token_to_id(piece)

    def special_tokens(self) -> dict[str, int]:
        return self._specials

    def control_ids(self) -> frozenset[int]:
        # added tokens that are not marked special (USER_DEFINED in GGUF) are ordinary text
        return frozenset(i for t, i in self._specials.items() if t in self._special_flag) | \
            frozenset(i for i in (self.bos_id, self.eos_id, self.unk_id) if i is not None)

    def _piece_bytes(self, piece: str) -> bytes:
        if piece in self._specials or not self._byte_level:
            return super()._piece_bytes(piece)
        return bytes(_UNICODE_TO_BYTE[c] for c in piece)

    def save(self, directory: Path) -> None:
        self.backend.save(str(directory / "tokenizer.json"))
        self._write_config(directory, "PreTrainedTokenizerFast", {"camelid_gguf_pre": self.pre})

    def gguf_metadata(self) -> dict[str, Any]:
        spec = json.loads(self.backend.to_str())
        model = spec["model"]
        if model.get("type") != "BPE" or model.get("byte_fallback") or "Metaspace" in json.dumps(spec.get("pre_tokenizer")):
            # A SentencePiece-style tokenizer.json (Llama-2's) would be misread as byte-level BPE.
            raise CamelidError("tokenizer: GGUF export of this tokenizer.json needs its SentencePiece original; "
                               "put the model's tokenizer.model beside it and convert again")
        vocab = self.backend.get_vocab(with_added_tokens=True)
        tokens = [""] * (max(vocab.values()) + 1)
        for t, i in vocab.items():
            tokens[i] = t
        types = [NORMAL] * len(tokens)
        for t, i in self._specials.items():
            types[i] = CONTROL if t in self._special_flag else USER_DEFINED
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        meta = {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": self.pre,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges,
        }
        meta.update(self._gguf_special_ids())
        return meta
