"""The tokenizer interface shared by SentencePiece and Hugging Face `tokenizers` back ends.

A Tokenizer turns text into ids and back, knows its special tokens (BOS, EOS, the end-of-turn
tokens that stop generation), renders chat conversations with the model's own template, and
describes itself for the checkpoint writers (`save`, `gguf_metadata`).
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

from camelid.tokenizer import chat
from camelid.tokenizer.text import encodable

# Tokens that end a turn in the common chat formats. Every one the vocabulary has is a stop
# token, not only EOS: Llama-3 ends turns with <|eot_id|> (vLLM #4180), ChatML with <|im_end|>.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>",
                      "<end_of_turn>", "<|eom_id|>")

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback tokens

# GGUF / SentencePiece token types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class Tokenizer(ABC):
    """Common behaviour; subclasses implement the raw encode/decode and the vocabulary."""

    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    unk_id: int | None = None
    add_bos: bool = True          # whether the model expects BOS before a prompt
    chat_template: str | None = None
    extra_stop_ids: frozenset[int] = frozenset()  # e.g. generation_config.json's eos list

    # ---- to implement --------------------------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def _encode_plain(self, text: str) -> list[int]:
        """Encode text that contains no special tokens."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def id_to_piece(self, i: int) -> str: ...

    @abstractmethod
    def piece_to_id(self, piece: str) -> int | None: ...

    @abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Control / added tokens that may appear verbatim in text (chat markup)."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write the tokenizer files and tokenizer_config.json into `directory`."""

    @abstractmethod
    def gguf_metadata(self) -> dict[str, Any]:
        """The `tokenizer.ggml.*` keys (and `tokenizer.chat_template`) for a GGUF file."""

    # ---- shared ----------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False, special: bool = True) -> list[int]:
        """Token ids of `text`; special-token markup such as <|im_start|> becomes its single id
        unless special=False. Lone surrogates (undecodable bytes) are encoded as U+FFFD."""
        text = encodable(text)
        ids: list[int] = [self.bos_id] if bos and self.bos_id is not None else []
        if special:
            for chunk, tok_id in self._split_special(text):
                ids.extend([tok_id] if tok_id is not None else self._encode_plain(chunk))
        else:
            ids.extend(self._encode_plain(text))
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _split_special(self, text: str) -> list[tuple[str, int | None]]:
        specials = self.special_tokens()
        if not specials or not any(s in text for s in specials):
            return [(text, None)] if text else []
        if not hasattr(self, "_special_re"):
            alternation = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
            self._special_re = re.compile(f"({alternation})")
        parts = []
        for part in self._special_re.split(text):
            if part in specials:
                parts.append((part, specials[part]))
            elif part:
                parts.append((part, None))
        return parts

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes in decoded text, for consumers that work on bytes (a grammar's
        matcher): a byte-fallback piece <0xE2> is that one byte, SentencePiece's "▁" a space;
        control tokens as their text (`control_ids` says which they are). Computed once."""
        cached = getattr(self, "_token_bytes", None)
        if cached is None:
            cached = self._token_bytes = [self._piece_bytes(self.id_to_piece(i)) for i in range(self.vocab_size)]
        return cached

    def _piece_bytes(self, piece: str) -> bytes:
        byte = BYTE_PIECE.fullmatch(piece)
        return bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode("utf-8")

    def control_ids(self) -> frozenset[int]:
        """Ids that never stand for text (BOS, EOS, chat markup, unknown)."""
        ids = {i for i in (self.bos_id, self.eos_id, self.unk_id) if i is not None}
        return frozenset(ids | set(self.special_tokens().values()))

    def token(self, i: int | None) -> str | None:
        return None if i is None else self.id_to_piece(i)

    @property
    def stop_ids(self) -> frozenset[int]:
        """EOS plus every end-of-turn token the vocabulary has."""
        ids = set(self.extra_stop_ids)
        if self.eos_id is not None:
            ids.add(self.eos_id)
        specials = self.special_tokens()
        ids.update(specials[t] for t in END_OF_TURN_TOKENS if t in specials)
        return frozenset(ids)

    # ---- chat ----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the text the model was trained on."""
        return chat.render(messages, add_generation_prompt, template=self.chat_template, bos=self.token(self.bos_id),
                           eos=self.token(self.eos_id), specials=self.special_tokens())

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode_rendered(self.apply_chat_template(messages, add_generation_prompt))

    def encode_rendered(self, text: str) -> list[int]:
        """Ids of a conversation that a chat template rendered: its markup as special tokens, and
        BOS as the tokenizer adds it, unless the template wrote it itself: a second BOS is a
        classic bug (llama.cpp #7107)."""
        bos_text = self.token(self.bos_id)
        starts_with_bos = bos_text is not None and text.startswith(bos_text)
        return self.encode(text, bos=self.add_bos and not starts_with_bos)

    # ---- description ---------------------------------------------------------------------------
    def _config_json(self, tokenizer_class: str) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "tokenizer_class": tokenizer_class,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "bos_token": self.token(self.bos_id),
            "eos_token": self.token(self.eos_id),
            "unk_token": self.token(self.unk_id),
            "pad_token": self.token(self.pad_id),
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        return {k: v for k, v in cfg.items() if v is not None}

    def _write_config(self, directory: Path, tokenizer_class: str, extra: dict[str, Any] | None = None) -> None:
        cfg = self._config_json(tokenizer_class)
        cfg.update(extra or {})
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    def _gguf_special_ids(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"tokenizer.ggml.add_bos_token": self.add_bos}
        for key, value in (("bos", self.bos_id), ("eos", self.eos_id), ("unknown", self.unk_id),
                           ("padding", self.pad_id)):
            if value is not None:
                meta[f"tokenizer.ggml.{key}_token_id"] = value
        if self.chat_template:
            meta["tokenizer.chat_template"] = self.chat_template
        return meta
