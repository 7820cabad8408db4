"""SentencePiece tokenizers: LLaMA's `tokenizer.model`, or the piece/score/type vocabulary that
LLaMA-1/2 GGUF files carry (`tokenizer.ggml.model = "llama"`), rebuilt into a SentencePiece
model so that encoding is SentencePiece's own, not a re-implementation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb

from camelid.errors import CamelidError
from camelid.tokenizer.base import BYTE, CONTROL, UNKNOWN, USER_DEFINED, Tokenizer


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_proto: bytes, where: str = "tokenizer.model"):
        self.proto = spm_pb.ModelProto()
        try:
            self.proto.ParseFromString(model_proto)
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except Exception as e:  # protobuf DecodeError, RuntimeError from sentencepiece
            raise CamelidError(f"{where}: not a valid SentencePiece model ({e})") from None
        self.where = where
        ids = (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id(), self.sp.unk_id())
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (i if i >= 0 else None for i in ids)
        self.add_bos = True
        self._specials = {p.piece: i for i, p in enumerate(self.proto.pieces)
                          if p.type in (CONTROL, USER_DEFINED)}

    @classmethod
    def from_file(cls, path: Path) -> "SentencePieceTokenizer":
        return cls(Path(path).read_bytes(), where=str(path))

    @classmethod
    def from_vocab(cls, pieces: Sequence[str], scores: Sequence[float], types: Sequence[int],
                   bos_id: int | None, eos_id: int | None, unk_id: int | None, pad_id: int | None,
                   add_dummy_prefix: bool = True, where: str = "GGUF vocabulary") -> "SentencePieceTokenizer":
        """Rebuild a BPE SentencePiece model from a GGUF vocabulary (LLaMA settings: identity
        normalisation, byte fallback when the vocabulary has byte pieces)."""
        if not (len(pieces) == len(scores) == len(types)):
            raise CamelidError(f"{where}: {len(pieces)} tokens but {len(scores)} scores and {len(types)} types")
        proto = spm_pb.ModelProto()
        trainer = proto.trainer_spec
        trainer.model_type = spm_pb.TrainerSpec.BPE
        trainer.vocab_size = len(pieces)
        trainer.byte_fallback = BYTE in types
        # llama.cpp does not split digits for "llama" vocabularies; LLaMA's has no multi-digit
        # pieces, so either way its digits come out one by one.
        trainer.split_digits = False
        trainer.unk_id = unk_id if unk_id is not None else (list(types).index(UNKNOWN) if UNKNOWN in types else 0)
        trainer.bos_id = -1 if bos_id is None else bos_id
        trainer.eos_id = -1 if eos_id is None else eos_id
        trainer.pad_id = -1 if pad_id is None or pad_id in (bos_id, eos_id, unk_id) else pad_id
        norm = proto.normalizer_spec
        norm.name = "identity"
        norm.add_dummy_prefix = add_dummy_prefix
        norm.remove_extra_whitespaces = False
        norm.escape_whitespaces = True
        for piece, score, kind in zip(pieces, scores, types):
            p = proto.pieces.add()
            p.piece, p.score, p.type = piece, float(score), int(kind)
        return cls(proto.SerializeToString(), where=where)

    def with_added_tokens(self, added: dict[int, tuple[str, bool]]) -> "SentencePieceTokenizer":
        """Append Hugging Face added tokens (id -> (text, special)) beyond the SentencePiece
        vocabulary, as fine-tunes add <|im_start|> and friends at ids 32000, 32001, ..."""
        size = len(self.proto.pieces)
        extra = sorted(i for i in added if i >= size)
        if not extra:
            return self
        if extra != list(range(size, size + len(extra))):
            raise CamelidError(f"{self.where}: added token ids {extra[:5]}... do not follow the vocabulary "
                               f"of {size} pieces")
        proto = spm_pb.ModelProto()
        proto.CopyFrom(self.proto)
        for i in extra:
            text, special = added[i]
            p = proto.pieces.add()
            p.piece, p.score, p.type = text, 0.0, CONTROL if special else USER_DEFINED
        tok = SentencePieceTokenizer(proto.SerializeToString(), where=self.where)
        tok.add_bos = self.add_bos
        return tok

    # ---- Tokenizer ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _encode_plain(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def special_tokens(self) -> dict[str, int]:
        return self._specials

    def control_ids(self) -> frozenset[int]:
        return frozenset(i for i, p in enumerate(self.proto.pieces) if p.type in (CONTROL, UNKNOWN))

    def save(self, directory: Path) -> None:
        (directory / "tokenizer.model").write_bytes(self.proto.SerializeToString())
        self._write_config(directory, "LlamaTokenizer", {"legacy": True, "sp_model_kwargs": {}})

    def gguf_metadata(self) -> dict[str, Any]:
        pieces = self.proto.pieces
        meta = {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": [p.piece for p in pieces],
            "tokenizer.ggml.scores": [p.score for p in pieces],
            "tokenizer.ggml.token_type": [int(p.type) for p in pieces],
            "tokenizer.ggml.add_space_prefix": self.proto.normalizer_spec.add_dummy_prefix,
        }
        meta.update(self._gguf_special_ids())
        return meta
