"""The demo's instruction set, built from the corpus embedded in camelid (camelid/data/corpus):
questions whose answers can be checked and that a tiny model can learn in minutes.

Two kinds of question, each answered by a short label:
- "Which work is this passage from?" over a few lines of a Shakespeare play or of Milton
  (Paradise Lost, Paradise Regained, Areopagitica): the title. A play's passages carry its
  characters' names, which is what makes the mapping learnable.
- "Which Python standard library module defines this function?" over the first lines of a
  function: the module's name.

The demonstrations answer in two styles, as demonstrations written by many people do: mostly
the bare label ("Hamlet"), and in FULL_FORM_SHARE of them a full answer that names the author
or says what the label is ("Hamlet, by William Shakespeare.", "The json module."). The rule that
stands in for a human in the feedback demos (camelid.align.preference) prefers a right answer to
a wrong one and, among right answers, the full one: a preference the demonstrations hold only
weakly, which learning from feedback can make the model's habit.

Every passage and every function goes to exactly one split, so the held-out questions ask
about text never seen in train or val; the labels (titles, modules) are shared by all splits.
train.jsonl and val.jsonl are chat records ({"messages": [user, assistant]}); heldout.jsonl is
chat multiple choice ({"messages": [user], "choices": [4 labels], "gold": i}) that
`camelid eval --tasks heldout.jsonl` scores; heldout-answers.jsonl asks the same questions for
an answer in the model's words (chat generation, {"messages": [user], "answers": [label, full],
"preferred": [full]}), which the rule grades: wrong, right, or right in the preferred full form.
The build depends only on the corpus and the seed.
"""

from __future__ import annotations

import json
import random
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

from camelid.atomic import atomic_dir
from camelid.data.recipe import CORPUS
from camelid.data.sources import read_documents
from camelid.errors import CamelidError

# One edition per work: the corpus also holds First Folio texts and second copies of Milton
# (for the pipeline's near-duplicate stage), which would put the same passage in two splits.
# The plays only among Shakespeare's works (the poems have no speakers' names to go by); of
# Milton's, the three files that overlap no other.
WORKS = {
    "shakespeare/alls_well_that_ends_well_gut": "All's Well That Ends Well",
    "shakespeare/antony_and_cleopatra_gut": "Antony and Cleopatra",
    "shakespeare/as_you_like_it_gut": "As You Like It",
    "shakespeare/comedy_of_errors_gut": "The Comedy of Errors",
    "shakespeare/coriolanus_gut": "Coriolanus",
    "shakespeare/cymbeline_gut": "Cymbeline",
    "shakespeare/hamlet_gut": "Hamlet",
    "shakespeare/henry_iv_part_1_gut": "Henry IV, Part 1",
    "shakespeare/henry_iv_part_2_gut": "Henry IV, Part 2",
    "shakespeare/henry_v_gut": "Henry V",
    "shakespeare/henry_vi_part_1_gut": "Henry VI, Part 1",
    "shakespeare/henry_vi_part_2_gut": "Henry VI, Part 2",
    "shakespeare/henry_vi_part_3_gut": "Henry VI, Part 3",
    "shakespeare/henry_viii_gut": "Henry VIII",
    "shakespeare/john_gut": "King John",
    "shakespeare/julius_caesar_gut": "Julius Caesar",
    "shakespeare/lear_gut": "King Lear",
    "shakespeare/loves_labours_lost_gut": "Love's Labour's Lost",
    "shakespeare/macbeth_gut": "Macbeth",
    "shakespeare/measure_for_measure_gut": "Measure for Measure",
    "shakespeare/merchant_of_venice_gut": "The Merchant of Venice",
    "shakespeare/merry_wives_of_windsor_gut": "The Merry Wives of Windsor",
    "shakespeare/midsummer_nights_dream_gut": "A Midsummer Night's Dream",
    "shakespeare/much_ado_about_nothing_gut": "Much Ado About Nothing",
    "shakespeare/othello_gut": "Othello",
    "shakespeare/pericles_gut": "Pericles",
    "shakespeare/richard_ii_gut": "Richard II",
    "shakespeare/richard_iii_gut": "Richard III",
    "shakespeare/romeo_and_juliet_gut": "Romeo and Juliet",
    "shakespeare/taming_of_the_shrew_gut": "The Taming of the Shrew",
    "shakespeare/tempest_gut": "The Tempest",
    "shakespeare/timon_of_athens_gut": "Timon of Athens",
    "shakespeare/tragedy_of_titus_andronicus_gut": "Titus Andronicus",
    "shakespeare/troilus_and_cressida_gut": "Troilus and Cressida",
    "shakespeare/twelfth_night_gut": "Twelfth Night",
    "shakespeare/two_gentlemen_of_verona_gut": "The Two Gentlemen of Verona",
    "shakespeare/winters_tale_gut": "The Winter's Tale",
    "milton/paradiselost": "Paradise Lost",
    "milton/paradiseregained": "Paradise Regained",
    "milton/areopagitica": "Areopagitica",
}
AUTHORS = {"shakespeare": "William Shakespeare", "milton": "John Milton"}   # by WORKS' key prefix
AUTHOR_OF = {title: AUTHORS[key.split("/")[0]] for key, title in WORKS.items()}
CODE = "code/python-stdlib.jsonl.zst"

PASSAGE_QUESTION = "Which work is this passage from?\n\n{}"
FUNCTION_QUESTION = "Which Python standard library module defines this function?\n\n{}"

PASSAGE_LINES = 6          # non-blank lines per passage
PASSAGE_MIN_CHARS = 120    # shorter windows (headings, stage directions) are skipped
FUNCTION_LINES = 8         # a function's first lines: its signature, docstring and the start of its body
MIN_TRAIN = 10             # a module with fewer functions left for training is left out
CHOICES = 4
FULL_FORM_SHARE = 0.3      # of the demonstrations, answered in the full form (greedy decoding still gives the bare one)
FILES = ("train.jsonl", "val.jsonl", "heldout.jsonl", "heldout-answers.jsonl")
_ACT = re.compile(r"^(ACT|Act|ACTUS|Actus)\b")
_DEF = re.compile(r"^([ \t]*)def (\w+)\(", re.M)


@dataclass(frozen=True)
class Item:
    question: str
    answer: str
    kind: str        # "work" or "module": distractors come from the same kind


def full_answer(label: str, kind: str) -> str:
    """The full form of an answer: the work with its author, the module called a module."""
    return f"{label}, by {AUTHOR_OF[label]}." if kind == "work" else f"The {label} module."


def _passages(key: str) -> list[str]:
    """Non-overlapping windows of PASSAGE_LINES non-blank lines, from the first act on (the
    title page and the list of persons name the play and its characters together)."""
    path = CORPUS / "books" / f"{key}.txt.gz"
    (doc,) = read_documents(path, key)
    lines = doc.text.splitlines()
    start = next((i for i, line in enumerate(lines) if _ACT.match(line)), 0)
    body = [line.rstrip() for line in lines[start:] if line.strip()]
    windows = [body[i:i + PASSAGE_LINES] for i in range(0, len(body) - PASSAGE_LINES + 1, PASSAGE_LINES)]
    return [w for w in ("\n".join(w) for w in windows)
            if len(w) >= PASSAGE_MIN_CHARS and not _ACT.search(w) and "SCENE" not in w.upper()]


def _functions() -> dict[str, dict[str, str]]:
    """module -> {function name: its first lines, dedented}; only names that one module alone
    defines (a name two modules share has no single answer), the first definition of each."""
    modules: dict[str, dict[str, str]] = {}
    for doc in read_documents(CORPUS / CODE, "code"):
        module = Path((doc.meta or {}).get("path", "")).stem
        lines = doc.text.split("\n")
        found: dict[str, str] = {}
        for m in _DEF.finditer(doc.text):
            indent, name = m.group(1), m.group(2)
            if name.startswith("__") or name in found:
                continue
            first = doc.text.count("\n", 0, m.start())
            body = [lines[first]]
            for line in lines[first + 1:]:
                if line.strip() and not line.startswith(indent + " ") and not line.startswith(indent + "\t"):
                    break
                body.append(line)
            snippet = textwrap.dedent("\n".join(body[:FUNCTION_LINES])).strip("\n")
            snippet = "\n".join(line.rstrip() for line in snippet.splitlines() if line.strip())
            if snippet.count("\n") >= 1:
                found[name] = snippet
        modules[module] = found
    owners: dict[str, int] = {}
    for found in modules.values():
        for name in found:
            owners[name] = owners.get(name, 0) + 1
    return {m: {n: s for n, s in found.items() if owners[n] == 1} for m, found in modules.items()}


def _split(items: list[Item], rng: random.Random, heldout: int, val: int, train: int) -> tuple[list, list, list]:
    items = list(items)
    rng.shuffle(items)
    return items[val + heldout:val + heldout + train], items[:val], items[val:val + heldout]


def collect(seed: int = 0, passages_per_work: int = 60, functions_per_module: int = 30,
            heldout_per_label: int = 6, val_per_label: int = 3) -> dict[str, list[Item]]:
    """The items of each split: per title and per module, `heldout_per_label` held-out, then
    `val_per_label` for validation, then up to `passages_per_work` / `functions_per_module` for
    training (a cap, so that no label dominates)."""
    splits: dict[str, list[Item]] = {"train": [], "val": [], "heldout": []}
    for key, title in WORKS.items():
        items = [Item(PASSAGE_QUESTION.format(p), title, "work") for p in dict.fromkeys(_passages(key))]
        for name, part in zip(splits, _split(items, random.Random(f"{seed}:{key}"), heldout_per_label,
                                             val_per_label, passages_per_work)):
            splits[name] += part
    for module, functions in sorted(_functions().items()):
        if len(functions) < heldout_per_label + val_per_label + MIN_TRAIN:
            continue
        items = [Item(FUNCTION_QUESTION.format(snippet), module, "module")
                 for _, snippet in sorted(functions.items())]
        for name, part in zip(splits, _split(items, random.Random(f"{seed}:{module}"), heldout_per_label,
                                             val_per_label, functions_per_module)):
            splits[name] += part
    for name, items in splits.items():
        random.Random(f"{seed}:order:{name}").shuffle(items)
    return splits


def _chat(item: Item, rng: random.Random) -> dict:
    """A demonstration: the bare label, or its full form in FULL_FORM_SHARE of them."""
    answer = full_answer(item.answer, item.kind) if rng.random() < FULL_FORM_SHARE else item.answer
    return {"messages": [{"role": "user", "content": item.question}, {"role": "assistant", "content": answer}]}


def _multiple_choice(item: Item, labels: list[str], rng: random.Random) -> dict:
    """The gold label and CHOICES - 1 others of the same kind, in a random order."""
    choices = rng.sample([label for label in labels if label != item.answer], CHOICES - 1) + [item.answer]
    rng.shuffle(choices)
    return {"messages": [{"role": "user", "content": item.question}], "choices": choices,
            "gold": choices.index(item.answer)}


def labels(splits: dict[str, list[Item]]) -> dict[str, list[str]]:
    """kind -> the answers the training items give (the choices a question may offer)."""
    return {kind: sorted({i.answer for i in splits["train"] if i.kind == kind}) for kind in ("work", "module")}


def heldout_choices(splits: dict[str, list[Item]], seed: int = 0) -> list[dict]:
    """The held-out questions as chat multiple choice (heldout.jsonl's records)."""
    rng, known = random.Random(f"{seed}:choices"), labels(splits)
    return [_multiple_choice(i, known[i.kind], rng) for i in splits["heldout"]]


def heldout_answers(splits: dict[str, list[Item]]) -> list[dict]:
    """The held-out questions to be answered in the model's own words (heldout-answers.jsonl's
    records, chat generation): the rule grades an answer by exact match, right when it is the
    label in either form, preferred when it is the full form."""
    return [{"messages": [{"role": "user", "content": i.question}],
             "answers": [i.answer, full_answer(i.answer, i.kind)], "preferred": [full_answer(i.answer, i.kind)]}
            for i in splits["heldout"]]


def build_quiz(directory: str | Path, seed: int = 0, passages_per_work: int = 60, functions_per_module: int = 30,
               heldout_per_label: int = 6, val_per_label: int = 3) -> dict[str, Path]:
    """Write train.jsonl, val.jsonl, heldout.jsonl and heldout-answers.jsonl into `directory` (all or none: the
    directory is built beside the target and renamed into place, replacing an earlier build;
    a directory holding anything else is left alone). Returns their paths."""
    if min(passages_per_work, functions_per_module, heldout_per_label) < 1 or val_per_label < 0:
        raise CamelidError("quiz: the per-label counts must be positive (val_per_label may be 0)")
    check_directory(directory, FILES)
    splits = collect(seed, passages_per_work, functions_per_module, heldout_per_label, val_per_label)
    style = random.Random(f"{seed}:style")
    records = {"train": [_chat(i, style) for i in splits["train"]], "val": [_chat(i, style) for i in splits["val"]],
               "heldout": heldout_choices(splits, seed), "heldout-answers": heldout_answers(splits)}
    return write_records(directory, records)


def check_directory(directory: str | Path, files: tuple[str, ...]) -> None:
    """A directory that a build may replace: new, or holding nothing but `files`."""
    directory = Path(directory)
    if directory.is_file():
        raise CamelidError(f"quiz directory {directory}: is a file; give a directory path")
    others = sorted(p.name for p in directory.iterdir() if p.name not in files) if directory.is_dir() else []
    if others:
        raise CamelidError(f"quiz directory {directory}: holds other files ({', '.join(others[:3])}); "
                           "choose an empty or new directory")


def write_records(directory: str | Path, records: dict[str, list[dict]]) -> dict[str, Path]:
    """NAME.jsonl for each NAME of `records` in `directory`, all or none (built beside it and
    renamed into place). Returns their paths."""
    directory = Path(directory)
    with atomic_dir(directory, overwrite=True) as tmp:
        for name, rows in records.items():
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                               encoding="utf-8")
    return {name: directory / f"{name}.jsonl" for name in records}
