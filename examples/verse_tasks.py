"""Two evaluation tasks from the HELD-OUT books of a prepared corpus (the documents that
`camelid data prepare` put in the validation split, which training never reads), for following a
run's progress the way the paper's Figure 2 does:

  verse_word_order.jsonl multiple choice (camelid eval's JSONL format): the query is the first
                         half of a line of verse, the choices are its true ending and the same
                         words in other orders
  heldout_verse.txt      a slice of the held-out books, for perplexity (bits per byte)

Deterministic for a given corpus, recipe and seed. For the quickstart's run:

  python examples/verse_tasks.py runs/quickstart/data runs/quickstart/tasks
  camelid eval --model runs/quickstart/train --output runs/quickstart/over_training.json \\
      --tasks runs/quickstart/tasks/verse_word_order.jsonl,runs/quickstart/tasks/heldout_verse.txt
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from camelid.atomic import write_text_atomic
from camelid.data import load_recipe
from camelid.data.pipeline import is_validation, read_docs

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart-data.toml"
SPEAKER = re.compile(r"^[A-Z][A-Z ,.'-]+\.?$")      # "CHARMIAN." and other speaker headings


def verse_lines(text: str) -> list[str | None]:
    """The text's lines, with None for anything that is not a line of speech or verse: blank
    lines, speaker headings, stage directions ([Enter ...]), indented speaker turns of the
    Folio spelling ("   Pros. The howr's now come") and short fragments."""
    out: list[str | None] = []
    for line in text.splitlines():
        keep = (len(line.strip()) >= 20 and not line[:1].isspace() and not SPEAKER.match(line.strip())
                and not line.lstrip().startswith(("[", "(", "Enter", "Exit", "Exeunt")))
        out.append(line.rstrip() if keep else None)
    return out


def heldout_books(data_dir: Path, recipe: Path) -> list[str]:
    """The books source's documents that the data recipe held out for validation, in corpus order."""
    output = load_recipe(recipe).output
    clean = data_dir / "clean" / "books.jsonl.zst"
    return [d.text for i, d in enumerate(read_docs(clean, "books"))
            if is_validation(output.seed, "books", i, output.val_fraction)]


def word_order_task(books: list[str], count: int, distractors: int, rng: random.Random) -> list[dict]:
    """The query is the first half of a line of verse (its words up to the middle); the choices
    are the line's true ending and the same words in other orders. Every choice holds the same
    words, so a model that knows only how often each token occurs scores at chance: what lifts
    the accuracy over training is what the model learns of word order (the true ending against
    other lines' endings needs more than the quickstart's model learns in 350 steps)."""
    halves = []
    for text in books:
        for line in verse_lines(text):
            words = line.split() if line else []
            if len(words) >= 7:
                cut = len(words) // 2
                halves.append((" ".join(words[:cut]), words[cut:]))
    records = []
    for start, words in rng.sample(halves, min(count, len(halves))):
        truth, choices = " ".join(words), [" ".join(words)]
        while len(choices) < distractors + 1:
            shuffled = " ".join(rng.sample(words, len(words)))
            if shuffled not in choices:
                choices.append(shuffled)
        rng.shuffle(choices)
        records.append({"query": start, "choices": choices, "gold": choices.index(truth)})
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", type=Path, help="a prepared corpus (camelid data prepare's output.dir)")
    p.add_argument("out_dir", type=Path, help="where the two task files go")
    p.add_argument("--recipe", type=Path, default=RECIPE, help="the data recipe it was prepared with "
                                                                "(default: the quickstart's)")
    p.add_argument("--count", type=int, default=300, help="multiple-choice questions (default 300)")
    p.add_argument("--choices", type=int, default=4, help="choices per question (default 4)")
    p.add_argument("--text-chars", type=int, default=10_000, help="characters of held-out text (default 10000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    books = heldout_books(args.data_dir, args.recipe)
    if not books:
        raise SystemExit(f"{args.data_dir}: no held-out books (is the recipe's output.val_fraction 0?)")
    records = word_order_task(books, args.count, args.choices - 1, random.Random(args.seed))
    mc = args.out_dir / "verse_word_order.jsonl"
    write_text_atomic(mc, "".join(json.dumps(r) + "\n" for r in records))
    text = args.out_dir / "heldout_verse.txt"
    # from the middle of the first held-out book, past its front matter
    first = books[0]
    start = first.find("\n", len(first) // 3) + 1
    write_text_atomic(text, first[start:start + args.text_chars])
    print(f"wrote {mc} ({len(records)} questions from {len(books)} held-out books) and {text}")


if __name__ == "__main__":
    main()
