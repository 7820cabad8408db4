"""`camelid data prepare`: sources -> stages -> cleaned text -> tokenizer -> token shards.

Each stage reads the previous stage's output from disk and writes its own (zstd-compressed
JSONL), so memory stays bounded whatever the corpus size, and every stage can be inspected.
A report counts documents and bytes in and out of every stage of every source, with the
reasons documents were dropped and where the first few came from.

Per-document work (the "doc" stages and tokenization, `camelid.data.executor`) goes through an
executor: this machine (`LocalExecutor`) or a Ray cluster (`camelid.data.ray_backend`,
`output.backend = "ray"`). This process keeps everything that needs the whole corpus or a fixed
order -- reading the sources, the dedup stages, tokenizer training and shard writing -- and gets
results back in corpus order, so both backends write the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tqdm import tqdm

from camelid.atomic import check_destination, write_text_atomic
from camelid.data import dedup, filters
from camelid.data.executor import Executor, LocalExecutor, make_stage
from camelid.data.recipe import STAGES, Recipe, SourceConfig
from camelid.data.shards import MANIFEST, Manifest, ShardWriter, SourceShards, table1, token_dtype
from camelid.data.sources import Document, expand_paths, read_documents
from camelid.errors import CamelidError

EXAMPLES = 3  # where-from examples kept per drop reason
TOKENIZER_KEYS = {"vocab_size": "tokenizer.vocab_size", "character_coverage": "tokenizer.character_coverage"}


@dataclass
class StageReport:
    source: str
    stage: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < EXAMPLES:
            seen.append(where)


# ---- intermediate files -------------------------------------------------------------------------------

def write_docs(path: Path, docs: Iterator[Document]) -> None:
    import zstandard

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as out:
        for d in docs:
            out.write((json.dumps({"text": d.text, "where": d.where, "meta": d.meta}, ensure_ascii=False) + "\n").encode())
    os.replace(tmp, path)


def read_docs(path: Path, source: str) -> Iterator[Document]:
    for d in read_documents(path, source, fmt="jsonl"):
        meta = d.meta or {}
        yield Document(d.text, source, meta.get("where", d.where), meta.get("meta"))


# ---- stages ----------------------------------------------------------------------------------------------

def run_stage(name: str, src: SourceConfig, workdir: Path, docs: Callable[[], Iterator[Document]], out: Path,
              report: StageReport, progress: bool, executor: Executor) -> None:
    stage = make_stage(name, src, workdir) if STAGES[name] == "global" else None
    if stage is not None:
        # global stages need the whole source, seen in order: they run here, whatever the backend
        for i, d in enumerate(tqdm(docs(), desc=f"{report.source}: {name} (scan)", unit="doc",
                                   disable=not progress, leave=False)):
            stage.observe(i, d.text)
        stage.finish()

    def results() -> Iterator[tuple[Document, str | filters.Drop]]:
        stream = tqdm(docs(), desc=f"{report.source}: {name}", unit="doc", disable=not progress, leave=False)
        if stage is not None:
            yield from ((d, stage(i, d.text)) for i, d in enumerate(stream))
            return
        for batch, out_ in executor.stage(name, src, _batches(stream, executor.batch)):
            yield from zip(batch, out_)

    def kept() -> Iterator[Document]:
        for d, result in results():
            report.docs_in += 1
            report.bytes_in += len(d.text.encode())
            if isinstance(result, filters.Drop):
                report.drop(result.reason, d.where)
                continue
            report.docs_out += 1
            report.bytes_out += len(result.encode())
            yield Document(result, d.source, d.where, d.meta)

    write_docs(out, kept())


def clean_source(src: SourceConfig, work: Path, progress: bool,
                 executor: Executor) -> tuple[Path, list[StageReport]]:
    files = expand_paths(src.paths, Path.cwd(), src.name)
    sdir = work / src.name
    shutil.rmtree(sdir, ignore_errors=True)
    sdir.mkdir(parents=True)
    reports = []

    def raw() -> Iterator[Document]:
        for f in files:
            n = 0
            for d in read_documents(f, src.name, src.format, src.text_field, src.split, src.on_error):
                n += 1
                yield d
            if n == 0:
                print(f"warning: {f}: no documents (empty file?)", file=sys.stderr)

    # The input stage only reads: it counts what the source holds before any processing.
    current = sdir / "00-input.jsonl.zst"
    read_report = StageReport(src.name, "read")
    write_docs(current, _count(raw(), read_report))
    reports.append(read_report)
    if read_report.docs_out == 0:
        raise CamelidError(f"source {src.name!r}: its files ({len(files)}) hold no documents")
    for k, name in enumerate(src.stages, 1):
        out = sdir / f"{k:02d}-{name}.jsonl.zst"
        report = StageReport(src.name, name)
        previous = current
        run_stage(name, src, sdir / f"{k:02d}-{name}.work", lambda p=previous: read_docs(p, src.name), out, report,
                  progress, executor)
        reports.append(report)
        current = out
        if report.docs_out == 0:
            raise CamelidError(f"source {src.name!r}: stage {name!r} dropped every document "
                               f"({_reasons(report)}); loosen its settings in the recipe")
    return current, reports


def _count(docs: Iterator[Document], report: StageReport) -> Iterator[Document]:
    for d in docs:
        n = len(d.text.encode())
        report.docs_in += 1
        report.docs_out += 1
        report.bytes_in += n
        report.bytes_out += n
        yield d


def _reasons(report: StageReport) -> str:
    return ", ".join(f"{r}: {n}" for r, n in sorted(report.dropped.items(), key=lambda x: -x[1]))


def format_reports(reports: list[StageReport]) -> str:
    lines = [f"{'source':12s} {'stage':12s} {'docs in':>9s} {'docs out':>9s} {'MB in':>8s} {'MB out':>8s}  dropped"]
    for r in reports:
        lines.append(f"{r.source:12s} {r.stage:12s} {r.docs_in:9,d} {r.docs_out:9,d} {r.bytes_in / 1e6:8.2f} "
                     f"{r.bytes_out / 1e6:8.2f}  {_reasons(r)}")
    return "\n".join(lines)


# ---- tokenizer and tokens -------------------------------------------------------------------------------

def tokenizer_lines(clean: dict[str, Path], recipe: Recipe) -> Iterator[str]:
    """Lines for tokenizer training, each source contributing in proportion to its weight."""
    total = sum(s.weight for s in recipe.sources)
    for s in recipe.sources:
        quota = int(recipe.tokenizer.max_sentences * s.weight / total)
        lines = sum(d.text.count("\n") + 1 for d in read_docs(clean[s.name], s.name))
        stride = max(1, lines // max(quota, 1))
        k = 0
        for d in read_docs(clean[s.name], s.name):
            for line in d.text.split("\n"):
                if k % stride == 0:
                    yield line
                k += 1


def get_tokenizer(recipe: Recipe, clean: dict[str, Path], out: Path):
    from camelid.tokenizer import has_tokenizer, load_tokenizer
    from camelid.tokenizer.train import shortfall, train_sentencepiece

    target = out / "tokenizer"
    if recipe.tokenizer.path:
        src = Path(recipe.tokenizer.path)
        src_dir = src.parent if src.is_file() else src
        if not has_tokenizer(src_dir):
            raise CamelidError(f"tokenizer.path {src}: no tokenizer.model or tokenizer.json there")
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        tok = load_tokenizer(src_dir)
        tok.save(target)
        return load_tokenizer(target)
    t0 = time.perf_counter()
    tok = train_sentencepiece(tokenizer_lines(clean, recipe), target, recipe.tokenizer.vocab_size,
                              recipe.tokenizer.character_coverage, threads=max(1, os.cpu_count() or 1),
                              names=TOKENIZER_KEYS)
    print(f"trained a SentencePiece BPE tokenizer ({tok.vocab_size} pieces) in {time.perf_counter() - t0:.1f}s "
          f"-> {target}", file=sys.stderr)
    short = shortfall(recipe.tokenizer.vocab_size, tok.vocab_size, TOKENIZER_KEYS["vocab_size"])
    if short:
        print(f"warning: {short}", file=sys.stderr)
    return tok


def _batches(docs: Iterable[Document], size: int, max_chars: int = 1 << 24) -> Iterator[list[Document]]:
    """Consecutive documents, `size` at a time (fewer when they are long: whole books)."""
    batch: list[Document] = []
    chars = 0
    for d in docs:
        batch.append(d)
        chars += len(d.text)
        if len(batch) == size or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def make_executor(recipe: Recipe) -> Executor:
    if recipe.output.backend == "ray":
        from camelid.data.ray_backend import RayExecutor  # imports ray, so only when asked for

        return RayExecutor(recipe.output.ray_address, recipe.output.workers)
    return LocalExecutor(recipe.output.workers)


def is_validation(seed: int, source: str, index: int, fraction: float) -> bool:
    return dedup.hash64(f"{seed}:{source}:{index}") % 1_000_000 < fraction * 1_000_000


def tokenize(recipe: Recipe, clean: dict[str, Path], tok, out: Path, progress: bool,
             executor: Executor) -> Manifest:
    dtype = token_dtype(tok.vocab_size)
    tokens_dir = out / "tokens"
    shutil.rmtree(tokens_dir, ignore_errors=True)
    sources = {}
    for s in recipe.sources:
        writers = {split: ShardWriter(tokens_dir / s.name, split, dtype, recipe.output.shard_tokens, out)
                   for split in ("train", "val")}
        index = 0
        bar = tqdm(desc=f"tokenizing {s.name}", unit="doc", disable=not progress, leave=False)
        # results arrive in corpus order, so the split and the shards do not depend on the backend
        batches = _batches(read_docs(clean[s.name], s.name), executor.batch)
        for _, encoded in executor.encode(out / "tokenizer", batches):
            for ids in encoded:
                split = "val" if is_validation(recipe.output.seed, s.name, index, recipe.output.val_fraction) \
                    else "train"
                writers[split].add(ids)
                index += 1
            bar.update(len(encoded))
        bar.close()
        for w in writers.values():
            w.flush()
        sources[s.name] = SourceShards(weight=s.weight, train=writers["train"].shards, val=writers["val"].shards)
        if not sources[s.name].train:
            raise CamelidError(f"source {s.name!r}: no training documents left after the validation split")
    return Manifest(vocab_size=tok.vocab_size, dtype=dtype.name, tokenizer="tokenizer", bos_id=tok.bos_id,
                    eos_id=tok.eos_id, sources=sources, directory=out)


# ---- the whole job -------------------------------------------------------------------------------------

def prepare(recipe: Recipe, progress: bool | None = None, keep_work: bool = False) -> Manifest:
    progress = sys.stderr.isatty() if progress is None else progress
    out = check_destination(recipe.output.dir, "recipe: output.dir", directory=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a half-prepared directory must not look complete
    work = out / "work"
    t0 = time.perf_counter()
    reports: list[StageReport] = []
    clean: dict[str, Path] = {}
    (out / "clean").mkdir(exist_ok=True)
    with make_executor(recipe) as executor:
        for src in recipe.sources:
            final, rep = clean_source(src, work, progress, executor)
            reports.extend(rep)
            clean[src.name] = out / "clean" / f"{src.name}.jsonl.zst"
            shutil.copyfile(final, clean[src.name])
        print(format_reports(reports), file=sys.stderr)
        tok = get_tokenizer(recipe, clean, out)
        manifest = tokenize(recipe, clean, tok, out, progress, executor)
    manifest.save()
    report = {"recipe": asdict(recipe), "stages": [asdict(r) for r in reports],
              "seconds": time.perf_counter() - t0}
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print(table1(manifest, recipe.budget_tokens), file=sys.stderr)
    print(f"prepared {out} in {time.perf_counter() - t0:.0f}s: manifest {out / MANIFEST}, report {out / 'report.json'}",
          file=sys.stderr)
    return manifest


