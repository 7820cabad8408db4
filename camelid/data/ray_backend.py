"""`camelid data prepare` on a Ray cluster: the per-document work -- the doc stages (normalize,
quality, code, langid) and tokenization -- runs as Ray tasks instead of local processes, and the
prepared directory is the same, byte for byte, as a local run's (report.json apart: it records
the recipe and the time taken).

Choose it in the recipe, or with `--ray [ADDRESS]` on the command line:

    [output]
    backend = "ray"
    ray_address = ""        # "" (default): RAY_ADDRESS, else the latest Ray started on this
                            # machine, else start one here; "auto": join, never start; "local":
                            # always start one here; "host:6379" or "ray://host:10001": that cluster

    camelid data prepare recipes/quickstart-data.toml --ray
    camelid data prepare my-data.toml --ray ray://head:10001

The driver (the process running `camelid data prepare`) keeps what needs the whole source or a
fixed order: reading the sources and writing every file, the dedup stages (exact, line and
MinHash near-duplicates: each keeps the first copy in corpus order), tokenizer training, and
the shard writer, which takes the tasks' results in the order they were submitted. Documents
and the tokenizer travel to the workers through Ray's object store, so only the driver needs
the input files and the output directory; the workers need camelid (the same version) and its
dependencies, e.g. `pip install 'camelid[ray]'` on every node. A Ray that the caller started
(ray.init before prepare) is used as it is and left running; one started here is shut down.

Ray is imported only when this backend is chosen; without it the error says what to install.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

from camelid.data.executor import Executor, encode_texts, ordered, pairs_of, stage_batch, texts_of
from camelid.errors import CamelidError


def import_ray():
    try:
        import ray
    except ImportError:
        raise CamelidError("output.backend = \"ray\" needs Ray, which is not installed: "
                           "pip install 'camelid[ray]'") from None
    return ray


class RayExecutor(Executor):
    # scheduling a task costs milliseconds: give each more documents than a local process gets
    batch = 256

    def __init__(self, address: str = "", workers: int = 0):
        ray = self.ray = import_ray()
        self.started = not ray.is_initialized()  # a Ray the caller started is theirs to shut down
        if self.started:
            try:
                ray.init(address=address or None)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise CamelidError(f"output.ray_address {address!r}: cannot start or reach Ray ({e}); start a "
                                   "cluster with `ray start --head`, or leave the address empty to start one "
                                   "here") from None
        cpus = int(ray.cluster_resources().get("CPU", 1))
        # twice as many batches in flight as there are workers: none waits while the driver
        # writes, and the driver holds only a bounded slice of the corpus
        self.window = 2 * (workers or cpus)
        self._stage = ray.remote(stage_batch)
        self._encode = ray.remote(_encode_task)
        self._tokenizer: tuple[str, Any] | None = None

    def stage(self, name, src, batches):
        return ordered(lambda b: self._stage.remote(name, src, pairs_of(b)), self.ray.get, batches, self.window)

    def encode(self, tokenizer_dir, batches):
        key, ref = self._ship(Path(tokenizer_dir))
        # the reference goes inside a list so that Ray does not fetch the files for every task:
        # a worker fetches them once and keeps the loaded tokenizer
        return ordered(lambda b: self._encode.remote(key, [ref], texts_of(b)), self.ray.get, batches, self.window)

    def _ship(self, directory: Path) -> tuple[str, Any]:
        files = {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
        digest = hashlib.blake2b(digest_size=16)
        for name, data in files.items():
            digest.update(name.encode() + b"\0" + hashlib.blake2b(data).digest())
        key = digest.hexdigest()
        if self._tokenizer is None or self._tokenizer[0] != key:
            self._tokenizer = (key, self.ray.put(files))
        return self._tokenizer

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
            self.started = False


_TOKENIZERS: dict[str, Any] = {}  # in each worker process: files digest -> loaded tokenizer


def _encode_task(key: str, ref: list, texts: list[str]) -> list:
    tok = _TOKENIZERS.get(key)
    if tok is None:
        import ray

        from camelid.tokenizer import load_tokenizer

        with tempfile.TemporaryDirectory(prefix="camelid-tokenizer-") as d:
            for name, data in ray.get(ref[0]).items():
                path = Path(d) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            tok = _TOKENIZERS[key] = load_tokenizer(Path(d))  # reads everything now: the files may go
    return encode_texts(tok, texts)
