"""Where the per-document work of `camelid data prepare` runs, and that work itself.

The per-batch functions -- a doc stage over (text, meta) pairs (`stage_batch`) and tokenization
(`encode_texts`) -- are what a worker runs, on this machine or on a Ray cluster. An `Executor`
runs them over batches of documents and yields the results in corpus order: `LocalExecutor`
here, `camelid.data.ray_backend.RayExecutor` on Ray. Both backends import this module; the
pipeline imports both (Ray only when the recipe asks for it).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from camelid.data import dedup, filters
from camelid.data.recipe import SourceConfig
from camelid.data.sources import Document
from camelid.errors import CamelidError

# ---- the work ------------------------------------------------------------------------------------------

def make_stage(name: str, src: SourceConfig, workdir: Path) -> Any:
    if name == "normalize":
        return filters.Normalize(src.normalize)
    if name == "quality":
        return filters.Quality(src.quality)
    if name == "code":
        return filters.Code(src.code)
    if name == "langid":
        return filters.LangId(src.langid)
    if name == "exact_dedup":
        return dedup.ExactDedup(src.exact_dedup, workdir)
    if name == "line_dedup":
        return dedup.LineDedup(src.line_dedup, workdir)
    if name == "near_dedup":
        return dedup.NearDedup(src.near_dedup, workdir)
    raise CamelidError(f"unknown stage {name!r}")


def stage_batch(name: str, src: SourceConfig, batch: list[tuple[str, dict | None]]) -> list[str | filters.Drop]:
    """A per-document stage over (text, meta) pairs: what a worker runs. Building the stage is
    cheap (langid's model is loaded once per process), so workers need no state of their own."""
    stage = make_stage(name, src, Path())
    if name == "code":
        return [stage(text, meta) for text, meta in batch]
    return [stage(text) for text, _ in batch]


def encode_texts(tok, texts: list[str]) -> list[np.ndarray]:
    bos = [tok.bos_id] if tok.bos_id is not None else []
    eos = [tok.eos_id] if tok.eos_id is not None else []
    # special=False: markup such as "<s>" inside the corpus is text, not a control token
    return [np.array(bos + tok.encode(t, special=False) + eos, dtype=np.int64) for t in texts]


# ---- executors: where it runs -------------------------------------------------------------------------

def ordered(submit: Callable[[Any], Any], wait: Callable[[Any], Any], items: Iterable[Any],
            window: int) -> Iterator[tuple[Any, Any]]:
    """(item, wait(submit(item))) in the order of `items`, whichever worker finishes first. At
    most `window` items are in flight, so memory stays bounded whatever the corpus size."""
    pending: deque = deque()
    for item in items:
        pending.append((item, submit(item)))
        if len(pending) >= window:
            head, handle = pending.popleft()
            yield head, wait(handle)
    while pending:
        head, handle = pending.popleft()
        yield head, wait(handle)


def texts_of(batch: list[Document]) -> list[str]:
    return [d.text for d in batch]


def pairs_of(batch: list[Document]) -> list[tuple[str, dict | None]]:
    return [(d.text, d.meta) for d in batch]


class Executor:
    """Runs batches of documents through a doc stage or the tokenizer and yields (batch, results)
    in corpus order; `batch` is how many documents a worker gets at a time. Everything else
    stays in the calling process."""

    batch = 64

    def stage(self, name: str, src: SourceConfig, batches: Iterable[list[Document]]) -> Iterator[tuple[list, list]]:
        raise NotImplementedError

    def encode(self, tokenizer_dir: Path, batches: Iterable[list[Document]]) -> Iterator[tuple[list, list]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_WORKER_TOKENIZER = None


def _worker_init(tokenizer_dir: str) -> None:
    global _WORKER_TOKENIZER
    from camelid.tokenizer import load_tokenizer

    _WORKER_TOKENIZER = load_tokenizer(Path(tokenizer_dir))


def _worker_encode(texts: list[str]) -> list[np.ndarray]:
    return encode_texts(_WORKER_TOKENIZER, texts)


class LocalExecutor(Executor):
    """This machine: doc stages in this process (they cost little next to reading and writing
    the intermediate files), tokenization on a pool of `workers` spawned processes."""

    def __init__(self, workers: int):
        self.workers = workers or os.cpu_count() or 1
        self.pool = None

    def stage(self, name, src, batches):
        return ordered(lambda b: stage_batch(name, src, pairs_of(b)), lambda r: r, batches, 1)

    def encode(self, tokenizer_dir, batches):
        if self.pool is None:  # started on first use: a run that fails while cleaning never pays for it
            ctx = mp.get_context("spawn")  # no fork: torch and friends are already loaded here
            self.pool = ctx.Pool(self.workers, initializer=_worker_init, initargs=(str(tokenizer_dir),))
        pool = self.pool
        return ordered(lambda b: pool.apply_async(_worker_encode, (texts_of(b),)), lambda r: r.get(), batches,
                       4 * self.workers)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None
