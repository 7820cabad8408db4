"""The data recipe (TOML): where each source is, how much it weighs in the mixture, which
processing stages it goes through, and where the prepared data goes.

    [output]
    dir = "runs/data"
    # backend = "ray"             # run the per-document work on a Ray cluster (pip install 'camelid[ray]')
    # ray_address = ""            # RAY_ADDRESS or a running Ray, else one started here; or "ray://head:10001"

    [tokenizer]
    vocab_size = 32000            # train SentencePiece BPE on the cleaned text ...
    # path = "path/to/tokenizer"  # ... or use an existing tokenizer

    [[sources]]
    name = "books"
    paths = ["/data/books/**/*.txt.gz"]
    weight = 0.045
    stages = ["normalize", "exact_dedup", "near_dedup", "langid", "quality"]
    near_dedup = { threshold = 0.9 }
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from camelid.data.dedup import ExactDedupConfig, LineDedupConfig, NearDedupConfig
from camelid.data.filters import CodeConfig, LangIdConfig, NormalizeConfig, QualityConfig
from camelid.errors import CamelidError
from camelid.schema import apply_overrides, build, load_toml
from camelid.tokenizer.train import check_settings as check_tokenizer_settings

# Stage name -> (kind, config field): "doc" stages look at one document, "global" stages look
# at the whole source first (two passes).
STAGES = {
    "normalize": "doc", "quality": "doc", "code": "doc", "langid": "doc",
    "exact_dedup": "global", "line_dedup": "global", "near_dedup": "global",
}
FORMATS = ("auto", "text", "jsonl", "parquet")
SPLITS = ("file", "paragraph", "line")
BACKENDS = ("local", "ray")  # where the per-document work runs (pipeline.make_executor)
CORPUS = Path(__file__).parent / "corpus"  # the corpus embedded in camelid (see its LICENSES.md)


@dataclass
class SourceConfig:
    name: str
    paths: list[str]
    weight: float = 1.0
    format: str = "auto"            # auto (from the extension), text, jsonl, parquet
    text_field: str = "text"        # JSONL key / Parquet column holding the text
    split: str = "file"             # plain text: one document per file, paragraph or line
    on_error: str = "raise"         # undecodable bytes, broken JSON lines: raise, skip or replace
    stages: list[str] = field(default_factory=lambda: ["normalize", "exact_dedup"])
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    code: CodeConfig = field(default_factory=CodeConfig)
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    line_dedup: LineDedupConfig = field(default_factory=LineDedupConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)


@dataclass
class OutputConfig:
    dir: str = "data"
    val_fraction: float = 0.01      # documents held out for validation, chosen by hash
    shard_tokens: int = 1 << 27     # tokens per shard file
    workers: int = 0                # tokenizer processes (Ray: 2x this many batches in flight); 0 = per CPU
    seed: int = 0
    backend: str = "local"          # local (processes on this machine) or ray: the same output either way
    ray_address: str = ""           # "" joins RAY_ADDRESS or the latest Ray on this machine, else starts
                                    # one; "auto" only joins; "local" always starts one; "host:port",
                                    # "ray://host:10001" name a cluster


@dataclass
class TokenizerConfig:
    path: str = ""                  # an existing tokenizer (directory, tokenizer.model/json, checkpoint)
    vocab_size: int = 32000         # otherwise train SentencePiece BPE with LLaMA's settings
    max_sentences: int = 5_000_000  # lines sampled from the cleaned text for training
    character_coverage: float = 0.99995


@dataclass
class Recipe:
    sources: list[SourceConfig]
    output: OutputConfig = field(default_factory=OutputConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    budget_tokens: int = 0          # training budget, for the epochs column of Table 1

    def __post_init__(self) -> None:
        names = [s.name for s in self.sources]
        if not names:
            raise CamelidError("recipe: no [[sources]]")
        if self.output.backend not in BACKENDS:
            raise CamelidError(f"recipe: output.backend must be one of {list(BACKENDS)} (got {self.output.backend!r})")
        if len(set(names)) != len(names):
            raise CamelidError(f"recipe: source names must be unique (got {names})")
        check_mixture({s.name: s.weight for s in self.sources}, lambda name: f"recipe: source {name!r}: weight",
                      "delete its [[sources]] entry")
        for s in self.sources:
            unknown = [st for st in s.stages if st not in STAGES]
            if unknown:
                raise CamelidError(f"recipe: source {s.name!r}: unknown stage(s) {unknown}; known: {list(STAGES)}")
            if s.on_error not in ("raise", "skip", "replace"):
                raise CamelidError(f"recipe: source {s.name!r}: on_error must be raise, skip or replace")
            if s.format not in FORMATS:
                raise CamelidError(f"recipe: source {s.name!r}: format must be one of {list(FORMATS)} "
                                   f"(got {s.format!r})")
            if s.split not in SPLITS:
                raise CamelidError(f"recipe: source {s.name!r}: split must be one of {list(SPLITS)} (got {s.split!r})")
        out = self.output
        if not 0 <= out.val_fraction < 1:
            raise CamelidError(f"recipe: output.val_fraction must be at least 0 and below 1 (got {out.val_fraction})")
        if out.shard_tokens < 1:
            raise CamelidError(f"recipe: output.shard_tokens must be at least 1 (got {out.shard_tokens})")
        if out.workers < 0:
            raise CamelidError(f"recipe: output.workers must be 0 (one per CPU) or more (got {out.workers})")
        if self.budget_tokens < 0:
            raise CamelidError(f"recipe: budget_tokens must be 0 (unset) or more (got {self.budget_tokens})")
        if not self.tokenizer.path:
            check_tokenizer_settings(self.tokenizer.vocab_size, self.tokenizer.character_coverage,
                                     {"vocab_size": "recipe: tokenizer.vocab_size",
                                      "character_coverage": "recipe: tokenizer.character_coverage"})
            if self.tokenizer.max_sentences < 1:
                raise CamelidError(f"recipe: tokenizer.max_sentences must be at least 1 "
                                   f"(got {self.tokenizer.max_sentences})")


def check_mixture(weights: Mapping[str, object], label: Callable[[str], str], leave_out: str,
                  known: Collection[str] | None = None, known_in: str = "the data") -> None:
    """The one check of mixture weights, for a recipe's sources and for `train`'s data.weights:
    each a positive finite number (a share of 0 or less cannot be sampled, and 0 for every source
    leaves nothing to draw), and, given `known`, each name one of those sources. `label(name)`
    names the setting at fault; `leave_out` says how a source is dropped instead."""
    if known is not None:
        unknown = [name for name in weights if name not in known]
        if unknown:
            raise CamelidError(f"{label(unknown[0])}: {known_in} has no source {unknown[0]!r}; "
                               f"its sources are {', '.join(known)}")
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w > 0):
            raise CamelidError(f"{label(name)} must be a positive number (got {w!r}); to leave a source out, "
                               f"{leave_out}")


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    if Path(path).is_dir():
        raise CamelidError(f"{path}: is a directory; give the recipe's .toml file")
    data = apply_overrides(load_toml(path), list(overrides))
    recipe = build(Recipe, data, str(path))
    for s in recipe.sources:  # "@corpus/..." names the corpus that ships with camelid
        s.paths = [str(CORPUS / p[len("@corpus/"):]) if p.startswith("@corpus/") else p for p in s.paths]
    return recipe
