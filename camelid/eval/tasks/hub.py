"""The Hugging Face hub copies of the benchmarks, for users whose machines reach it: the
parquet files of a dataset repository, read with pyarrow (no `datasets` dependency)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from camelid.errors import CamelidError


@dataclass(frozen=True)
class Spec:
    repo: str                                   # dataset repository, e.g. "google/boolq"
    splits: dict[str, str]                      # "eval" / "train" -> the hub's split name
    config: str | None = None                   # subset folder, when the repository has several
    adapt: Callable[[dict], dict] | None = None  # hub row -> the local files' record layout
    # A repository that holds only its original files (JSONL, CSV) is read from the parquet copy
    # the hub converts it to, on the branch "refs/convert/parquet" (config/split/NNNN.parquet).
    revision: str | None = None


def load(spec: Spec, split: str) -> list[dict[str, Any]]:
    if split not in spec.splits:
        raise CamelidError(f"{spec.repo}: no {split} split")
    name = spec.splits[split]
    patterns = [f"{spec.config}/{name}-*.parquet", f"{spec.config}/{name}/*.parquet"] if spec.config else []
    patterns += [f"data/{name}-*.parquet", f"{name}-*.parquet", f"*/{name}-*.parquet"]
    try:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(spec.repo, repo_type="dataset", revision=spec.revision,
                                           allow_patterns=patterns))
    except Exception as e:  # offline, unknown repository, gated dataset
        raise CamelidError(f"could not fetch {spec.repo} from the Hugging Face hub ({type(e).__name__})") from None
    files = sorted(f for p in patterns for f in root.glob(p))
    if not files:
        raise CamelidError(f"{spec.repo}: no parquet files for split {name!r}")
    import pyarrow.parquet as pq

    rows = [row for f in dict.fromkeys(files) for row in pq.read_table(f).to_pylist()]
    return [spec.adapt(r) for r in rows] if spec.adapt else rows
