"""A reward model as a model: load a scorer, score token rows, texts and conversations.

A reward model is a LLaMA whose head gives one number per position instead of a logit per
vocabulary entry (`ModelConfig.num_labels` = 1), read at each sequence's last token: the
InstructGPT recipe (Ouyang et al., 2022, section 3.5; Stiennon et al., 2020). The scoring itself
is `camelid.generate.classifier.SequenceScorer`'s; conversations are rendered as
finetuning renders them (`camelid.finetune.data.encode_conversation`), so a reward model scores
exactly the tokens it was trained on.
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import torch

from camelid.finetune.data import encode_conversation
from camelid.finetune.records import check_conversation
from camelid.generate.classifier import SequenceScorer
from camelid.tokenizer.base import Tokenizer

Messages = list[dict[str, str]]
Scorable = Union[str, Messages]

# Text that exercises what tokenizers disagree on: words and their spacing, digits, case,
# punctuation, code, accents, CJK and an emoji (byte fallback), newlines and tabs.
PROBE = ("Shall I compare thee to a summer's day? The year 1609 had 365 days; 3.14159 is pi.\n"
         "def f(x):\n\treturn x * 2  # CAPS and  double  spaces\ncaf\u00e9 na\u00efve \u4f60\u597d \U0001f999 llama")
SAMPLED_PIECES = 1024   # vocabulary entries compared, evenly spread, besides the probe's


class RewardModel(SequenceScorer):
    """A reward model: a sequence scorer that also scores conversations, rendered as finetuning
    renders them.

        rm = RewardModel.load("runs/rm/model")
        rm.score(["a text", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]])
        rm.score_tokens([[1, 5, 9], [1, 7]])        # tensor([r0, r1])

    Scores are float32 on the CPU: a tensor [N] for a reward model (one label), [N, num_labels]
    for a scorer of several."""

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, quantize: str | None = None, group_size: int | None = None,
             adapter: str | os.PathLike[str] | None = None, progress: bool = False) -> "RewardModel":
        """A scorer from any format camelid reads that can hold one: a camelid checkpoint directory
        or a Hugging Face LlamaForSequenceClassification directory (the arguments are those of
        `camelid.load`). A language model is refused before its weights are read."""
        from camelid import load_model

        model, tokenizer, source = load_model(path, device, dtype, quantize, group_size, adapter, progress,
                                              scorer=True)
        return cls(model, tokenizer, source=str(source))

    def encode(self, item: Scorable, where: str = "") -> list[int]:
        """The token ids scored for `item`: a text (with BOS where the tokenizer adds one) or a
        conversation (a list of {"role", "content"} messages with an assistant turn), rendered
        with the model's chat template as finetuning renders it."""
        if isinstance(item, str):
            return super().encode(item, where)
        messages = check_conversation(item, where or "conversation")
        return encode_conversation(messages, self.tokenizer, train_on="all").ids

    def score(self, items: Scorable | Sequence[Scorable], batch_size: int = 16,
              progress: bool = False) -> torch.Tensor:
        """Scores of texts and/or conversations (see `encode`); one item gives a tensor of one."""
        if isinstance(items, list) and items and isinstance(items[0], dict):   # one conversation
            items = [items]
        return super().score(items, batch_size, progress)


# ---- the tokenizer a policy shares ------------------------------------------------------------------

def tokenizer_difference(a: Tokenizer, b: Tokenizer) -> str | None:
    """Why token ids from `a` would mean something else to a model that reads `b` (vocabulary
    size, special ids, the pieces of a spread of ids, the encoding of a probe text), or None
    where they agree. A reward model scores the ids its policy generated, unchanged."""
    if a.vocab_size != b.vocab_size:
        return f"vocabulary sizes differ ({a.vocab_size} and {b.vocab_size} tokens)"
    for what in ("bos_id", "eos_id"):
        if getattr(a, what) != getattr(b, what):
            return f"{what} differs ({getattr(a, what)} and {getattr(b, what)})"
    probe_a, probe_b = a.encode(PROBE, bos=a.add_bos), b.encode(PROBE, bos=b.add_bos)
    if probe_a != probe_b:
        at = next((k for k, (x, y) in enumerate(zip(probe_a, probe_b)) if x != y), min(len(probe_a), len(probe_b)))
        return f"a probe text encodes differently (from token {at} on)"
    step = max(1, a.vocab_size // SAMPLED_PIECES)
    for i in sorted({*range(0, a.vocab_size, step), a.vocab_size - 1, *probe_a}):
        if a.id_to_piece(i) != b.id_to_piece(i):
            return f"token {i} is {a.id_to_piece(i)!r} in one and {b.id_to_piece(i)!r} in the other"
    return None


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers give the same ids the same meaning (see `tokenizer_difference`)."""
    return tokenizer_difference(a, b) is None
