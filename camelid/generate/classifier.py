"""A sequence scorer: a LLaMA whose head gives `config.num_labels` numbers per position instead
of a logit per vocabulary entry, read at each sequence's last token (Hugging Face's
LlamaForSequenceClassification, which camelid reads and writes). Reward models
(`camelid.align.reward_model`) and the classifiers `camelid eval` uses as judges are such scorers.

Rows are scored in batches padded on the right: attention is causal, so the padding after a row's
last token changes nothing before it, and only the hidden state of that last token goes through
the head ([N, dim] -> [N, num_labels]; no [T, vocab] logits exist).
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm import tqdm

from camelid.errors import CamelidError
from camelid.model import Transformer
from camelid.tokenizer.base import Tokenizer


class SequenceScorer:
    """A scorer (a Transformer with `config.num_labels` > 0) and its tokenizer, scoring texts.

        scorer = SequenceScorer.load("runs/rm/model")
        scorer.score(["a text", "another"])
        scorer.score_tokens([[1, 5, 9], [1, 7]])        # tensor([r0, r1])

    Scores are float32 on the CPU: a tensor [N] for a reward model (one label), [N, num_labels]
    for a scorer of several."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, source: str = ""):
        if not model.config.num_labels:
            raise CamelidError(f"{source or type(self).__name__}: a language model (its head gives "
                               f"{model.config.vocab_size} logits per token), not a reward model")
        self.model = model
        self.tokenizer = tokenizer
        self.source = source

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    # ---- tokens ---------------------------------------------------------------------------------
    def encode(self, item: str, where: str = "") -> list[int]:
        """The token ids scored for a text: with BOS where the tokenizer adds one."""
        if not isinstance(item, str):
            raise CamelidError(f"{where or 'item'}: expected a text, got {type(item).__name__}")
        if not item:
            raise CamelidError(f"{where or 'text'}: empty text; there is nothing to score")
        return self.tokenizer.encode(item, bos=self.tokenizer.add_bos)

    def check_row(self, ids: Sequence[int], where: str) -> None:
        """One clear line for a row the model cannot score: empty, longer than its context, or
        holding an id outside its vocabulary."""
        if not ids:
            raise CamelidError(f"{where}: no tokens to score")
        if len(ids) > self.config.max_seq_len:
            raise CamelidError(f"{where}: {len(ids)} tokens, more than the model's context of "
                               f"{self.config.max_seq_len}; shorten it")
        bad = next((i for i in ids if not 0 <= i < self.config.vocab_size), None)
        if bad is not None:
            raise CamelidError(f"{where}: token id {bad} is outside the model's vocabulary "
                               f"(0..{self.config.vocab_size - 1})")

    # ---- scores ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def score_tokens(self, rows: Sequence[Sequence[int]], batch_size: int = 16,
                     progress: bool = False) -> torch.Tensor:
        """The score at the last token of each row of token ids. Rows are batched by length
        (sorted, so that a batch holds rows of similar lengths and little padding) and the
        result comes back in the rows' order."""
        if batch_size < 1:
            raise CamelidError(f"batch_size must be >= 1 (got {batch_size})")
        rows = [list(r) for r in rows]
        for i, r in enumerate(rows):
            self.check_row(r, f"row {i}")
        out = torch.empty(len(rows), self.config.num_labels, dtype=torch.float32)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="scoring", unit="batch", disable=not progress, leave=False):
            take = order[start:start + batch_size]
            lengths = torch.tensor([len(rows[i]) for i in take])
            tokens = torch.zeros(len(take), int(lengths.max()), dtype=torch.long)  # padding: any id does
            for b, i in enumerate(take):
                tokens[b, :lengths[b]] = torch.tensor(rows[i])
            h = self.model.hidden(tokens.to(self.device))                             # [B, T, dim]
            last = h[torch.arange(len(take), device=self.device), (lengths - 1).to(self.device)]   # [B, dim]
            out[take] = self.model.head(last).float().cpu()                           # [B, num_labels]
        return out.squeeze(-1) if self.config.num_labels == 1 else out

    def score(self, items, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        """Scores of items (see `encode`); one item gives a tensor of one."""
        if isinstance(items, str):
            items = [items]
        rows = [self.encode(item, f"item {i}") for i, item in enumerate(items)]
        for i, r in enumerate(rows):
            self.check_row(r, f"item {i}")
        return self.score_tokens(rows, batch_size, progress)
