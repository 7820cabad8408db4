"""Preference pairs: records, rendering, lengths and batches.

A record is {"prompt" | "messages", "chosen", "rejected"} in JSONL or Parquet (or a Hugging Face
dataset through `datasets`):
- "prompt": text (one user turn) or a list of messages; "messages": a list of messages (a
  conversation that may hold a system turn and earlier exchanges), ending with a user's turn;
- "chosen", "rejected": text (one assistant turn), one assistant message {"role", "content"},
  or a list of messages. A list that starts with the prompt's conversation (Hugging Face's
  UltraFeedback keeps it so) has it taken off; without "prompt" or "messages" the prompt is what
  the two lists share before their last assistant turns (TRL's implicit prompt).

Both completions are rendered after the same prompt with the model's chat template, as
camelid.finetune.data renders instruction conversations (`encode_conversation`): the prompt's
tokens are the same in both rows, and the completion's tokens (its end-of-turn token included)
are the ones scored. A malformed record is an error naming its file and line; a pair whose two
completions render to the same tokens (a tie, no preference) is skipped and counted in
run.dir/data.json ("ties"), as are pairs truncated or dropped for length.

The demo's pairs (`build_preferences`, data.builtin = "corpus-preferences") are the quiz's
questions (camelid.finetune.quiz) with the answer that a rule prefers (the right attribution over
a wrong one; the full answer, naming the author, over the bare title) chosen: a rule that
stands in for a human, so that preference accuracy and win rates are checkable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from camelid.errors import CamelidError
from camelid.finetune import quiz
from camelid.finetune.data import IGNORE, Example, InstructionLoader, encode_conversation, next_targets, split_heldout
from camelid.finetune.records import Messages, check_conversation, detect_format, load_hf_dataset, read_file
from camelid.tokenizer.base import Tokenizer

COMPLETIONS = ("chosen", "rejected")
EXPECTED = '{"prompt" | "messages", "chosen", "rejected"}'
WHAT = "preference data"
BUILTIN_FILES = ("train.jsonl", "val.jsonl", "heldout.jsonl", "heldout-choices.jsonl", "heldout-answers.jsonl")
QUIZ_PER_WORK, QUIZ_PER_MODULE = 60, 30   # the training questions per label of quiz.collect's defaults
FORM_PAIRS = 1 / 3     # of the demo's pairs, the full answer over the bare one (the rest: right over wrong)


@dataclass
class PairRecord:
    prompt: Messages        # the conversation before the completions (ends with a non-assistant turn)
    chosen: Messages        # assistant messages
    rejected: Messages
    where: str              # file:line (Parquet: file:row N; a dataset: name[split] row N)


@dataclass
class Pair:
    chosen: Example         # the prompt's and the completion's tokens; trainable = the completion's
    rejected: Example
    prompt_len: int         # leading tokens the two rows share (the rendered prompt)


# ---- records ----------------------------------------------------------------------------------

def read_pairs(path: str | Path) -> list[PairRecord]:
    """The preference records of one JSONL or Parquet file, in file order."""
    return read_file(path, convert_pairs, WHAT)


def load_hf_pairs(name: str, split: str = "train", subset: str | None = None) -> list[PairRecord]:
    """The preference records of a Hugging Face dataset (a hub name, or a local directory or
    data files `datasets.load_dataset` reads)."""
    return load_hf_dataset(name, split, subset, convert=convert_pairs)


def convert_pairs(rows: Iterator[tuple[str, Any]]) -> list[PairRecord]:
    out = []
    for where, record in rows:
        if not isinstance(record, dict):
            raise CamelidError(f"{where}: expected a JSON object, got {type(record).__name__}")
        # Parquet and `datasets` give every row all the columns, None where a record lacks one
        out.append(to_pair({k: v for k, v in record.items() if v is not None}, where))
    return out


def to_pair(record: dict, where: str) -> PairRecord:
    missing = [k for k in COMPLETIONS if k not in record]
    if missing:
        if not any(k in record for k in COMPLETIONS):
            try:
                kind = detect_format(record, where)
            except CamelidError:
                kind = None
            if kind is not None:
                raise CamelidError(f"{where}: an instruction record ({kind} format) where preference pairs are "
                                   f"expected: model.objective = \"reward\" and \"dpo\" train on {EXPECTED}")
        raise CamelidError(f"{where}: no {missing[0]!r} field; preference records are {EXPECTED}")
    if "prompt" in record:
        prompt = record["prompt"]
        prompt = [{"role": "user", "content": _text(prompt, "prompt", where)}] if not isinstance(prompt, list) \
            else prompt
    elif "messages" in record:
        prompt = record["messages"]
        if not isinstance(prompt, list):
            raise CamelidError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects (the prompt's "
                               "conversation)")
    else:
        prompt = None
    chosen, rejected = (_completion(record[k], k, where) for k in COMPLETIONS)
    if prompt is None:
        prompt, chosen, rejected = _implicit_prompt(chosen, rejected, where)
    else:
        chosen, rejected = (_after_prompt(c, prompt, k, where) for c, k in ((chosen, "chosen"), (rejected, "rejected")))
    if not prompt:
        raise CamelidError(f"{where}: the prompt is empty; give \"prompt\" (text or messages) or \"messages\"")
    for key, completion in (("chosen", chosen), ("rejected", rejected)):
        if not completion:
            raise CamelidError(f"{where}: {key!r} holds no assistant message after the prompt; fill it in")
        for m in completion:
            if not isinstance(m, dict) or m.get("role") != "assistant":
                raise CamelidError(f"{where}: {key!r} must be the assistant's answer: text, an assistant message or "
                                   f"a list of them (got {m!r:.60})")
            if not isinstance(m.get("content"), str) or not m["content"].strip():
                raise CamelidError(f"{where}: {key!r} is empty; remove the record or fill it in")
    whole = check_conversation(prompt + chosen, where)   # the prompt's messages, named by index
    if whole[len(prompt) - 1]["role"] == "assistant":
        raise CamelidError(f"{where}: the prompt ends with an assistant turn; it must end with the user's (the "
                           "completions answer it)")
    return PairRecord(whole[:len(prompt)], whole[len(prompt):],
                      [{"role": "assistant", "content": m["content"]} for m in rejected], where)


def _text(value: object, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise CamelidError(f"{where}: {key!r} must be text or a list of messages, got {type(value).__name__}")
    if not value.strip():
        raise CamelidError(f"{where}: {key!r} is empty; remove the record or fill it in")
    return value


def _completion(value: object, key: str, where: str) -> list:
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    return [{"role": "assistant", "content": _text(value, key, where)}]


def _after_prompt(messages: list, prompt: list, key: str, where: str) -> list:
    """`messages` without the prompt's conversation where they start with it; a list holding
    other turns before the answer is an error."""
    split = _answer_start(messages, key, where)
    if split == 0:
        return messages
    if messages[:split] != prompt:
        raise CamelidError(f"{where}: {key!r} holds turns before the answer that are not the record's prompt; "
                           "give the answer alone, or the prompt's conversation followed by it")
    return messages[split:]


def _implicit_prompt(chosen: list, rejected: list, where: str) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) from two whole conversations that share the prompt."""
    a, b = _answer_start(chosen, "chosen", where), _answer_start(rejected, "rejected", where)
    if a == 0 and b == 0:
        raise CamelidError(f"{where}: no 'prompt' or 'messages' field, and the completions hold no prompt; "
                           f"preference records are {EXPECTED}")
    if chosen[:a] != rejected[:b]:
        raise CamelidError(f"{where}: 'chosen' and 'rejected' are conversations with different prompts; a pair "
                           "compares two answers to one prompt")
    return chosen[:a], chosen[a:], rejected[b:]


def _answer_start(messages: list, key: str, where: str) -> int:
    """The index after the last message that is not the assistant's (0: all are)."""
    for i in range(len(messages) - 1, -1, -1):
        if not (isinstance(messages[i], dict) and messages[i].get("role") == "assistant"):
            if i == len(messages) - 1:
                raise CamelidError(f"{where}: {key!r} must be the assistant's answer: text, an assistant message or "
                                   f"a list of messages that ends with the assistant's (got {messages[i]!r:.60})")
            return i + 1
    return 0


# ---- rendering and lengths ------------------------------------------------------------------------

def encode_pair(record: PairRecord, tokenizer: Tokenizer) -> Pair:
    """Both conversations, prompt + completion, as `encode_conversation` renders them, with the
    completion's turns alone marked; their rendered prompt is their shared prefix."""
    n = len(record.prompt)
    try:
        chosen, rejected = (encode_conversation(record.prompt + c, tokenizer, completion_from=n)
                            for c in (record.chosen, record.rejected))
    except CamelidError as e:
        raise CamelidError(f"{record.where}: {e}") from None
    if not (any(chosen.trainable) and any(rejected.trainable)):
        raise CamelidError(f"{record.where}: the chat template renders no tokens for a completion")
    prompt_len = min(chosen.trainable.index(True), rejected.trainable.index(True))
    if chosen.ids[:prompt_len] != rejected.ids[:prompt_len]:
        raise CamelidError(f"{record.where}: the chat template renders the prompt differently before the two "
                           "completions, so they cannot be compared after one prompt")
    return Pair(chosen, rejected, prompt_len)


def encode_pairs(records: list[PairRecord], tokenizer: Tokenizer) -> list[Pair]:
    return [encode_pair(r, tokenizer) for r in records]


def fit_pairs(pairs: list[Pair], seq_len: int, overflow: str = "truncate") -> tuple[list[Pair], dict[str, int]]:
    """Pairs whose rows fit seq_len tokens, and the counts: kept (returned), truncated (of
    those kept), dropped, ties (skipped: the two completions render to the same tokens).

    A row longer than seq_len keeps its prompt and loses the end of its completion ("truncate")
    or its pair is left out ("drop"). A pair is dropped too when its prompt leaves no room for
    a completion token, or when the truncated completions are the same tokens."""
    out, counts = [], {"kept": 0, "truncated": 0, "dropped": 0, "ties": 0}
    for p in pairs:
        if p.chosen.ids == p.rejected.ids:
            counts["ties"] += 1
            continue
        cut = max(len(p.chosen.ids), len(p.rejected.ids)) > seq_len
        if cut and (overflow == "drop" or p.prompt_len >= seq_len):
            counts["dropped"] += 1
            continue
        if cut:
            p = Pair(*(Example(e.ids[:seq_len], e.trainable[:seq_len]) for e in (p.chosen, p.rejected)), p.prompt_len)
            if p.chosen.ids == p.rejected.ids:
                counts["dropped"] += 1
                continue
        out.append(p)
        counts["kept"] += 1
        counts["truncated"] += cut
    return out, counts


# ---- the demo's pairs ------------------------------------------------------------------------

def build_preferences(directory: str | Path, seed: int = 0, new_per_work: int = 60,
                      new_per_module: int = 30) -> dict[str, Path]:
    """Write the demo's pairs into `directory` (all files or none, as quiz.build_quiz): one per
    quiz question, by the rule that stands in for a human (quiz's docstring), which ranks a
    right answer above a wrong one whatever their forms, and the full form of a right answer
    above its bare label: FORM_PAIRS of them prefer the right answer's full form to its bare
    label, the others a right answer to a wrong one of the same kind drawn at random, each in
    either form at random (so that a full wrong answer loses to a bare right one, and a reward
    model learns that the form never buys a wrong answer anything). The training questions are new ones, up to `new_per_work`
    passages per work and `new_per_module` functions per module that the instruction demo
    (quiz.build_quiz) does not train on, as preferences are gathered on other prompts than the
    demonstrations (Ouyang et al., 2022); validation and held-out questions are the quiz's own.
    heldout-choices.jsonl is the quiz's held-out multiple choice (the file the instruction demo
    evaluates), whose pairs reject one of each question's wrong choices, and
    heldout-answers.jsonl the same questions to be answered by generation (the rule's win rate
    against the base model). Returns the paths by name."""
    quiz.check_directory(directory, BUILTIN_FILES)
    splits = quiz.collect(seed)   # the instruction demo's questions (build_quiz's defaults)
    more = quiz.collect(seed, QUIZ_PER_WORK + new_per_work, QUIZ_PER_MODULE + new_per_module)
    if (more["val"], more["heldout"]) != (splits["val"], splits["heldout"]):
        raise RuntimeError("quiz.collect drew other validation or held-out questions for a larger cap")
    known, choices = quiz.labels(splits), quiz.heldout_choices(splits, seed)
    taught = {i.question for i in splits["train"]}
    train = [i for i in more["train"] if i.question not in taught]
    rng = random.Random(f"{seed}:preferences")

    def form(label: str, kind: str) -> str:
        return quiz.full_answer(label, kind) if rng.random() < 0.5 else label

    def pair(messages: list[dict], item: quiz.Item, wrong: list[str]) -> dict:
        if rng.random() < FORM_PAIRS:
            chosen, rejected = quiz.full_answer(item.answer, item.kind), item.answer
        else:   # each answer's form drawn on its own: a right bare label is preferred to a full wrong answer
            chosen, rejected = form(item.answer, item.kind), form(rng.choice(wrong), item.kind)
        return {"messages": messages, "chosen": chosen, "rejected": rejected}

    def new(item: quiz.Item) -> dict:
        wrong = [label for label in known[item.kind] if label != item.answer]
        return pair([{"role": "user", "content": item.question}], item, wrong)

    heldout = [pair(c["messages"], item, [x for i, x in enumerate(c["choices"]) if i != c["gold"]])
               for c, item in zip(choices, splits["heldout"], strict=True)]
    records = {"train": [new(i) for i in train], "val": [new(i) for i in splits["val"]],
               "heldout": heldout, "heldout-choices": choices, "heldout-answers": quiz.heldout_answers(splits)}
    return quiz.write_records(directory, records)


# ---- from the recipe ------------------------------------------------------------------------------

def load_pairs(cfg, tokenizer: Tokenizer, run_dir: Path):
    """(train, val, held-out pairs, data.json's report, evaluation tasks) for a FinetuneConfig:
    files, a Hugging Face dataset or the demo's pairs, rendered and fitted to data.seq_len.
    Without data.val (and for a dataset) val_fraction of the pairs is held out; the held-out
    pairs are the demo's own, else none."""
    d = cfg.data
    tasks: list[str] = []
    heldout_records: list[PairRecord] = []
    if d.builtin:
        files = build_preferences(Path(run_dir) / "data", seed=cfg.train.seed)
        train_records, val_records = read_pairs(files["train"]), read_pairs(files["val"])
        heldout_records = read_pairs(files["heldout"])
        tasks = [str(files["heldout-choices"]), str(files["heldout-answers"])]
    elif d.hf_dataset:
        train_records, val_records = load_hf_pairs(d.hf_dataset, d.hf_split, d.hf_subset or None), []
    else:
        train_records = [r for f in d.train for r in read_pairs(f)]
        val_records = [r for f in d.val for r in read_pairs(f)]
    train = encode_pairs(train_records, tokenizer)
    if val_records:
        val = encode_pairs(val_records, tokenizer)
    else:
        train, val = split_heldout(train, d.val_fraction, cfg.train.seed)
    report: dict[str, Any] = {"seq_len": d.seq_len, "overflow": d.overflow}
    out = []
    for name, pairs in (("train", train), ("val", val), ("heldout", encode_pairs(heldout_records, tokenizer))):
        fitted, report[name] = fit_pairs(pairs, d.seq_len, d.overflow)
        out.append(fitted)
    if not out[0]:
        raise CamelidError(f"data: no training pair is left ({_counts(report['train'])}); raise data.seq_len or "
                           "set data.overflow = \"truncate\", and check that chosen and rejected differ")
    if not out[1]:
        raise CamelidError(f"data: no validation pair is left ({_counts(report['val'])}); give data.val files or "
                           "raise data.val_fraction")
    return out[0], out[1], out[2], report, tasks


def _counts(c: dict[str, int]) -> str:
    return (f"{c['kept']:,} pairs ({c['truncated']} truncated, {c['dropped']} dropped, "
            f"{c['ties']} ties skipped)")


def describe(report: dict) -> str:
    """The data line a run prints."""
    held = f", held out {_counts(report['heldout'])}" if report["heldout"]["kept"] else ""
    return (f"data: train {_counts(report['train'])}, validation {_counts(report['val'])}{held}, rows of at most "
            f"{report['seq_len']} tokens")


# ---- batches ---------------------------------------------------------------------------------------

@dataclass
class PairBatch:
    inputs: torch.Tensor     # [2P, T]: the P chosen rows, then the P rejected rows, padded at the right together
    targets: torch.Tensor    # [2P, T] the next token where it belongs to the completion, else IGNORE
    lengths: torch.Tensor    # [2P] each row's real tokens (0: an empty slot, validation's padding)
    index: torch.Tensor      # [P] each pair's index in its split (-1: an empty slot)
    split: str

    @property
    def pairs(self) -> int:
        return self.index.shape[0]

    @property
    def real(self) -> torch.Tensor:
        """[P] bool: the slots that hold a pair."""
        return self.index >= 0

    def to(self, device) -> "PairBatch":
        return PairBatch(self.inputs.to(device), self.targets.to(device), self.lengths.to(device),
                         self.index.to(device), self.split)

    def last(self) -> torch.Tensor:
        """[2P] the position of each row's last real token (0 for an empty slot)."""
        return (self.lengths - 1).clamp(min=0)


class PairLoader(InstructionLoader):
    """Batches of pairs with InstructionLoader's schedule, unpacked: a pair's two rows never
    share a row with another pair; a batch's pairs are of similar lengths (sorted within groups
    of batches, whose order is shuffled), and resume is exact."""

    def __init__(self, pairs: list[Pair], seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, split: str = "train"):
        if not pairs:
            raise CamelidError(f"preference data: no {split} pairs left to train on")
        super().__init__(pairs, seq_len, batch_size, seed, rank, world_size, packing=False, shuffle=shuffle)
        self.split = split

    @staticmethod
    def length_of(pair: Pair) -> int:
        return max(len(pair.chosen.ids), len(pair.rejected.ids))

    def collate(self, rows: list[list[int]]) -> PairBatch:
        P = len(rows)
        width = min(self.seq_len, -(-max((int(self.lengths[r[0]]) for r in rows if r), default=1) // 8) * 8)
        inputs = np.zeros((2 * P, width), dtype=np.int64)
        targets = np.full((2 * P, width), IGNORE, dtype=np.int64)
        lengths = np.zeros(2 * P, dtype=np.int64)
        index = np.full(P, -1, dtype=np.int64)
        for b, row in enumerate(rows):
            if not row:
                continue
            (i,) = row
            index[b] = i
            pair = self.examples[i]
            for k, ex in ((b, pair.chosen), (P + b, pair.rejected)):
                n = len(ex.ids)
                inputs[k, :n] = ex.ids
                targets[k, :n] = next_targets(ex)
                lengths[k] = n
        t = torch.from_numpy
        return PairBatch(t(inputs), t(targets), t(lengths), t(index), self.split)
