"""Tokenizers: SentencePiece (LLaMA), byte-level BPE (GPT-2 style), chat templates, streaming."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError
from camelid.tokenizer.base import Tokenizer
from camelid.tokenizer.huggingface import HFTokenizer
from camelid.tokenizer.sentencepiece import SentencePieceTokenizer
from camelid.tokenizer.stream import StreamDecoder
from camelid.tokenizer.text import has_invalid, replace_invalid

__all__ = ["HFTokenizer", "SentencePieceTokenizer", "StreamDecoder", "Tokenizer", "has_invalid", "load_tokenizer",
           "replace_invalid", "tokenizer_from_gguf"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as AddedToken dicts.
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CamelidError(f"{path}: not valid JSON ({e})") from None


def has_tokenizer(directory: Path) -> bool:
    return any((Path(directory) / f).exists() for f in TOKENIZER_FILES)


def load_tokenizer(directory: Path) -> Tokenizer:
    """A tokenizer from a model directory (Hugging Face, Meta or camelid layout).

    A SentencePiece `tokenizer.model` wins over `tokenizer.json` (it is the original the fast
    file was converted from); `tokenizer_config.json` supplies BOS/EOS, add_bos_token and the chat
    template; `generation_config.json` may list more end tokens.
    """
    directory = Path(directory)
    cfg = _read_json(directory / "tokenizer_config.json")
    spm_path, json_path = directory / "tokenizer.model", directory / "tokenizer.json"
    tok: Tokenizer
    if spm_path.exists() and _is_sentencepiece(spm_path):
        tok = SentencePieceTokenizer.from_file(spm_path).with_added_tokens(_added_tokens(directory, cfg))
    elif json_path.exists():
        tok = HFTokenizer.from_file(json_path)
        if cfg.get("camelid_gguf_pre"):
            tok.pre = cfg["camelid_gguf_pre"]
    elif spm_path.exists():
        raise CamelidError(f"{spm_path}: not a SentencePiece model (a tiktoken file, as Llama-3's Meta "
                           "release ships?); use the Hugging Face release, which has tokenizer.json")
    else:
        raise CamelidError(f"{directory}: no tokenizer.model or tokenizer.json found")
    for attr, key in (("bos_id", "bos_token"), ("eos_id", "eos_token"), ("pad_id", "pad_token"),
                      ("unk_id", "unk_token")):
        text = _token_text(cfg.get(key))
        if text is not None and tok.piece_to_id(text) is not None:
            setattr(tok, attr, tok.piece_to_id(text))
    if "add_bos_token" in cfg:
        tok.add_bos = bool(cfg["add_bos_token"])
    elif isinstance(tok, HFTokenizer):
        tok.add_bos = _post_processor_adds_bos(tok)
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (directory / "chat_template.jinja").exists():
        template = (directory / "chat_template.jinja").read_text()
    tok.chat_template = template
    gen = _read_json(directory / "generation_config.json")
    eos = gen.get("eos_token_id")
    if eos is not None:
        tok.extra_stop_ids = frozenset(eos if isinstance(eos, list) else [eos])
    return tok


def _added_tokens(directory: Path, cfg: dict[str, Any]) -> dict[int, tuple[str, bool]]:
    """Tokens a Hugging Face directory adds on top of tokenizer.model, from any of the three
    places transformers keeps them."""
    added: dict[int, tuple[str, bool]] = {}
    for i, t in (cfg.get("added_tokens_decoder") or {}).items():
        added[int(i)] = (t["content"], bool(t.get("special", False)))
    fast = _read_json(directory / "tokenizer.json")
    for t in fast.get("added_tokens") or []:
        added.setdefault(int(t["id"]), (t["content"], bool(t.get("special", False))))
    for text, i in _read_json(directory / "added_tokens.json").items():
        added.setdefault(int(i), (text, True))
    return added


def _is_sentencepiece(path: Path) -> bool:
    head = path.read_bytes()[:64]
    # A tiktoken file is base64 text lines ("IQ== 0"); a SentencePiece model is a protobuf.
    return not all(32 <= b < 127 or b in (9, 10, 13) for b in head)


def _post_processor_adds_bos(tok: HFTokenizer) -> bool:
    if tok.bos_id is None:
        return False
    ids = tok.backend.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == tok.bos_id


def tokenizer_from_gguf(meta: dict[str, Any], where: str = "GGUF file") -> Tokenizer:
    """A tokenizer from GGUF `tokenizer.ggml.*` metadata (values already decoded to Python)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise CamelidError(f"{where}: has no tokenizer (tokenizer.ggml.model / tokens missing)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    tok: Tokenizer
    if kind == "llama":
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        tok = SentencePieceTokenizer.from_vocab(
            tokens, scores, types, bos_id=ids["bos"], eos_id=ids["eos"], unk_id=ids["unknown"],
            pad_id=ids["padding"], add_dummy_prefix=meta.get("tokenizer.ggml.add_space_prefix", True),
            where=where)
    elif kind == "gpt2":
        tok = HFTokenizer.from_gguf_vocab(tokens, meta.get("tokenizer.ggml.merges") or [], types,
                                          pre=meta.get("tokenizer.ggml.pre", "default"), where=where)
    else:
        raise CamelidError(f"{where}: tokenizer model {kind!r} is not supported (supported: 'llama' "
                           "SentencePiece and 'gpt2' byte-level BPE)")
    tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id = ids["bos"], ids["eos"], ids["unknown"], ids["padding"]
    # llama.cpp's defaults when the key is absent: on for SentencePiece and Llama-3's BPE
    default_bos = kind == "llama" or meta.get("tokenizer.ggml.pre") in ("llama-bpe", "llama3", "llama-v3")
    tok.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos))
    tok.chat_template = meta.get("tokenizer.chat_template")
    return tok
