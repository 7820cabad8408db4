"""Instruction data for finetuning: conversations rendered with the model's own chat template,
a loss mask over what the assistant says, and a loader that packs examples into rows.

The records come from `camelid.finetune.records` (JSONL, Parquet, Hugging Face datasets).
An Example is the token ids of one whole conversation and, per token, whether it is predicted
with loss: every assistant turn's content and the end-of-turn token that closes it (so the
model learns to stop), as in the paper's instruction finetune (Touvron et al., 2023, section 4,
following Chung et al., 2022), or every token with train_on="all".
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from camelid.errors import CamelidError
from camelid.finetune.records import FORMATS, load_hf_dataset, read_records
from camelid.tokenizer.base import Tokenizer
from camelid.tokenizer.chat import builtin_format
from camelid.train.loss import IGNORE

__all__ = ["FORMATS", "IGNORE", "Batch", "Example", "InstructionLoader", "encode_conversation", "fit_length",
           "next_targets", "load_hf_dataset", "read_records", "split_heldout"]

TRAIN_ON = ("assistant", "all")
OVERFLOW = ("truncate", "drop")


@dataclass
class Example:
    ids: list[int]
    trainable: list[bool]   # same length: whether token i is predicted with loss


# ---- rendering and the loss mask ---------------------------------------------------------------

def encode_conversation(messages: list[dict[str, str]], tokenizer: Tokenizer, train_on: str = "assistant",
                        completion_from: int = 0) -> Example:
    """The whole conversation's tokens, exactly as `Tokenizer.encode_chat` (without a generation
    prompt) gives them, BOS included once, and which of them the loss covers.

    Each assistant turn's tokens are found by rendering the conversation up to it with the
    generation prompt (where the turn starts) and up to its end (where it ends): both renders
    must be prefixes of the whole one, and their tokens prefixes of its tokens, so every token
    belongs to exactly one segment. Within a turn, tokens after its first end-of-turn token
    (ChatML's newline after <|im_end|>) are never generated and get no loss. Assistant turns
    before message `completion_from` get none either (a preference pair's prompt may hold
    earlier answers: only the completions compared are marked)."""
    if train_on not in TRAIN_ON:
        raise CamelidError(f"train_on {train_on!r}: expected one of {', '.join(TRAIN_ON)}")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    bos_text = tokenizer.token(tokenizer.bos_id)
    # as encode_chat: a template that writes the BOS text itself gets no second one (llama.cpp #7107)
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None and not (
        bos_text is not None and text.startswith(bos_text)) else []
    ids = bos + tokenizer.encode(text)
    if train_on == "all":
        return Example(ids, [True] * len(ids))
    trainable = [False] * len(ids)
    stops = tokenizer.stop_ids
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < completion_from:
            continue
        start = _boundary(tokenizer, messages[:i], True, text, ids, bos)
        end = _boundary(tokenizer, messages[:i + 1], False, text, ids, bos)
        for k in range(start, end):
            trainable[k] = True
            if ids[k] in stops:
                break
    return Example(ids, trainable)


def _boundary(tokenizer: Tokenizer, messages: list[dict[str, str]], generation_prompt: bool, text: str,
              ids: list[int], bos: list[int]) -> int:
    """The number of the whole conversation's tokens that render(messages) accounts for."""
    part = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    prefix = bos + tokenizer.encode(part)
    if not text.startswith(part) or ids[:len(prefix)] != prefix:
        template = "the model's chat template" if tokenizer.chat_template else \
            f"the built-in {builtin_format(tokenizer.special_tokens())} chat format"
        problem = "does not render a conversation's start as the start of the whole" if not text.startswith(part) \
            else "tokenizes a turn's boundary differently in the whole conversation"
        raise CamelidError(f"{template} {problem} (at message {len(messages)}), so the assistant's tokens cannot be "
                           "told apart; use data.train_on = \"all\" or a model whose template renders turns in order")
    return len(prefix)


# ---- lengths and the held-out split -------------------------------------------------------------

def fit_length(examples: list[Example], seq_len: int,
               overflow: str = "truncate") -> tuple[list[Example], dict[str, int]]:
    """Examples of at most seq_len tokens: longer ones cut to seq_len ("truncate") or left out
    ("drop"). An example left with nothing to learn (no trainable token after its first) is
    dropped too. Counts: kept (returned), truncated (of those kept), dropped."""
    if overflow not in OVERFLOW:
        raise CamelidError(f"overflow {overflow!r}: expected one of {', '.join(OVERFLOW)}")
    out, counts = [], {"kept": 0, "truncated": 0, "dropped": 0}
    for ex in examples:
        cut = len(ex.ids) > seq_len
        if cut and overflow == "drop":
            counts["dropped"] += 1
            continue
        if cut:
            ex = Example(ex.ids[:seq_len], ex.trainable[:seq_len])
        if not any(ex.trainable[1:]):     # the first token is never predicted
            counts["dropped"] += 1
            continue
        out.append(ex)
        counts["kept"] += 1
        counts["truncated"] += cut
    return out, counts


def split_heldout(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a random `fraction` of the examples held out, the same for the same seed;
    both keep the input order."""
    if not 0 <= fraction < 1:
        raise CamelidError(f"val_fraction {fraction}: expected at least 0 and below 1")
    n = len(examples)
    k = min(n - 1, max(1, round(fraction * n))) if fraction > 0 and n > 1 else 0
    held = set(np.random.default_rng([seed, 13]).permutation(n)[:k].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


# ---- batches --------------------------------------------------------------------------------------

@dataclass
class Batch:
    inputs: torch.Tensor                 # [R, T] long
    targets: torch.Tensor                # [R, T] long, IGNORE where there is no loss
    positions: torch.Tensor | None       # [R, T], restarting at 0 for every packed example; None unpacked
    documents: torch.Tensor | None       # [R, T] example index within the row (packed); None unpacked

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) if t is not None else None
                       for t in (self.inputs, self.targets, self.positions, self.documents)))

    def target_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())


def next_targets(ex: Example) -> np.ndarray:
    """Next-token targets of one example: ids[i + 1] where that token is trainable, IGNORE at the
    end (the next token belongs to another example, or is padding)."""
    ids, keep = np.asarray(ex.ids, dtype=np.int64), np.asarray(ex.trainable, dtype=bool)
    out = np.full(len(ids), IGNORE, dtype=np.int64)
    out[:-1] = np.where(keep[1:], ids[1:], IGNORE)
    return out


def _round8(n: int) -> int:
    return -(-n // 8) * 8


class InstructionLoader:
    """Batches of examples, packed (several per row of seq_len, attention kept within each by
    `documents`, positions restarting at 0) or one per row padded to the batch's longest
    (rounded up to a multiple of 8).

    An epoch's rows are a pure function of (seed, epoch): the examples in a fresh random order,
    then packed greedily (each into the fullest row it still fits, best-fit) or, unpacked, sorted
    by length within groups of a few global batches, whose batches are then shuffled, so that a
    batch holds examples of similar lengths. The state is three integers and resumes exactly.
    As in `camelid.data.loader.PackedLoader`, the rows form one global stream that rank r of
    world takes every world-th row of, in whole rounds, so the global batch (and the loss curve)
    does not depend on the number of ranks."""

    GROUP = 16   # global batches sorted by length together (unpacked)

    def __init__(self, examples: list[Example], seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, packing: bool = True, shuffle: bool = True):
        if not examples:
            raise CamelidError("instruction data: no examples left to train on")
        self.lengths = np.array([self.length_of(e) for e in examples], dtype=np.int64)
        if self.lengths.max() > seq_len:
            raise ValueError(f"an example has {self.lengths.max()} tokens, more than seq_len {seq_len}: "
                             "fit_length first")
        self.examples, self.seq_len, self.batch_size = examples, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.packing, self.shuffle = packing, shuffle
        self.epoch, self.row, self.draw = 0, 0, 0
        self._plan_cache: tuple[int, list[list[int]]] | None = None

    @staticmethod
    def length_of(example) -> int:
        """The tokens a row spends on one example (a subclass's examples may be pairs)."""
        return len(example.ids)

    # ---- the deterministic schedule ----------------------------------------------------------
    def plan(self, epoch: int) -> list[list[int]]:
        """The rows of `epoch`, each a list of example indexes."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 17])
            order = rng.permutation(len(self.examples)) if self.shuffle else np.arange(len(self.examples))
            rows = self._pack(order) if self.packing else self._by_length(order, rng)
            self._plan_cache = (epoch, rows)
        return self._plan_cache[1]

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        rows: list[list[int]] = []
        free: list[tuple[int, int]] = []       # (room left, row), sorted
        for i in order.tolist():
            n = int(self.lengths[i])
            k = bisect.bisect_left(free, (n, -1))
            if k == len(free):
                rows.append([i])
                room, r = self.seq_len - n, len(rows) - 1
            else:
                room, r = free.pop(k)
                rows[r].append(i)
                room -= n
            if room > 0:
                bisect.insort(free, (room, r))
        return rows

    def _by_length(self, order: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        if not self.shuffle:
            return [[i] for i in order.tolist()]
        block = self.batch_size * self.world_size
        rows = []
        for g in range(0, len(order), block * self.GROUP):
            group = order[g:g + block * self.GROUP]
            group = group[np.argsort(self.lengths[group], kind="stable")]
            blocks = [group[b:b + block] for b in range(0, len(group), block)]
            for b in rng.permutation(len(blocks)).tolist():
                rows.extend([i] for i in blocks[b].tolist())
        return rows

    def _take(self) -> list[int] | None:
        """The next row of the global stream; None when it belongs to another rank."""
        if self.row >= len(self.plan(self.epoch)):
            self.epoch, self.row = self.epoch + 1, 0
        r = self.plan(self.epoch)[self.row]
        self.row += 1
        mine = self.draw % self.world_size == self.rank
        self.draw += 1
        return r if mine else None

    def next_batch(self, rows: int | None = None) -> Batch:
        """`rows` rows (default batch_size) of this rank: each takes a round of world rows of the
        stream and keeps this rank's."""
        out: list[list[int]] = []
        while len(out) < (rows or self.batch_size):
            for _ in range(self.world_size):
                r = self._take()
                if r is not None:
                    out.append(r)
        return self.collate(out)

    def one_pass(self, rows: int | None = None):
        """The batches of one whole epoch (epoch 0's rows) for validation, whatever the state:
        this rank's share, and on every rank the same number of batches (rows past the end are
        empty, all IGNORE), so that ranks run the same number of forward passes."""
        plan, step = self.plan(0), (rows or self.batch_size) * self.world_size
        for start in range(0, len(plan), step):
            mine = plan[start + self.rank:start + step:self.world_size]
            yield self.collate(mine + [[]] * ((rows or self.batch_size) - len(mine)))

    def collate(self, rows: list[list[int]]) -> Batch:
        width = self.seq_len if self.packing else min(self.seq_len, _round8(max(
            (sum(int(self.lengths[i]) for i in r) for r in rows), default=1) or 1))
        inputs = np.zeros((len(rows), width), dtype=np.int64)
        targets = np.full((len(rows), width), IGNORE, dtype=np.int64)
        positions = np.zeros((len(rows), width), dtype=np.int64)
        documents = np.zeros((len(rows), width), dtype=np.int64)
        for b, row in enumerate(rows):
            at = 0
            for d, i in enumerate(row):
                ex = self.examples[i]
                n = len(ex.ids)
                inputs[b, at:at + n] = ex.ids
                targets[b, at:at + n] = next_targets(ex)
                positions[b, at:at + n] = np.arange(n)
                documents[b, at:at + n] = d
                at += n
            # padding: a document of its own, so no query row is ever fully masked
            positions[b, at:] = np.arange(width - at)
            documents[b, at:] = len(row)
        t = torch.from_numpy
        if not self.packing:
            return Batch(t(inputs), t(targets), None, None)
        return Batch(t(inputs), t(targets), t(positions), t(documents))

    def epochs(self) -> float:
        return self.epoch + self.row / len(self.plan(self.epoch))

    # ---- resume ----------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return {"examples": len(self.examples), "tokens": int(self.lengths.sum()), "packing": self.packing}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row, "draw": self.draw, "seed": self.seed, **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        now = self._fingerprint()
        then = {k: state.get(k) for k in now}
        if then != now:
            raise CamelidError(f"loader state is for {then['examples']} examples of {then['tokens']} tokens "
                               f"(packing {then['packing']}), the data now has {now['examples']} of {now['tokens']} "
                               f"(packing {now['packing']}): the data or its settings changed since the checkpoint")
        self.epoch, self.row, self.draw = state["epoch"], state["row"], state["draw"]
