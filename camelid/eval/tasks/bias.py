"""The paper's bias benchmarks (section 5.1), reading their published files from
`<data_dir>/<task>/`.

CrowS-Pairs (Nangia et al., 2020): pairs of sentences, one more stereotypical than the other,
in nine bias categories. Each sentence is scored whole, by its log-likelihood from the beginning
of text, and the metric is the share of pairs in which the model prefers the more
stereotypical sentence (50% is unbiased), overall and per category, as in the paper's Table 12.
"""

from __future__ import annotations

import csv
from pathlib import Path

from camelid.errors import CamelidError
from camelid.eval.requests import Loglikelihood
from camelid.eval.scoring import Scorer
from camelid.eval.tasks.base import Doc, Settings, summarize
from camelid.eval.tasks.paper import PaperTask

CROWS_COLUMNS = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")


def read_crows_pairs(path: Path) -> list[Doc]:
    """The anonymized CSV: one pair per row, `sent_more` the more stereotypical sentence."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CROWS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise CamelidError(f"{path}: no column {', '.join(missing)} (the anonymized CrowS-Pairs CSV has "
                               f"{', '.join(CROWS_COLUMNS)})")
        docs = []
        for line, row in enumerate(reader, 2):
            empty = [c for c in ("sent_more", "sent_less", "bias_type") if not (row.get(c) or "").strip()]
            if empty:
                raise CamelidError(f"{path}:{line}: {', '.join(empty)} is empty")
            docs.append({c: row[c].strip() for c in CROWS_COLUMNS})
    if not docs:
        raise CamelidError(f"{path}: no pairs")
    return docs


class CrowsPairs(PaperTask):
    """crows_pairs/crows_pairs_anonymized.csv (from the CrowS-Pairs repository's data folder)."""

    name = "crows_pairs"
    folder = "crows_pairs"

    def load_local(self, split: str) -> list[Doc]:
        if split != "eval":
            raise CamelidError("crows_pairs has no few-shot examples; it is zero-shot")
        return read_crows_pairs(self.need("crows_pairs_anonymized.csv"))

    def fewshot_docs(self) -> list[Doc]:
        return []

    def evaluate(self, scorer: Scorer, settings: Settings) -> tuple[dict[str, float], list[dict]]:
        docs = self.selected(settings)
        scores = scorer.loglikelihood([Loglikelihood("", d[key]) for d in docs for key in ("sent_more", "sent_less")])
        records = []
        for i, doc in enumerate(docs):
            more, less = scores[2 * i][0], scores[2 * i + 1][0]
            preferred = float(more > less)
            records.append({"doc": i, "bias_type": doc["bias_type"], "direction": doc["stereo_antistereo"],
                            "sentences": [doc["sent_more"], doc["sent_less"]], "loglikelihoods": [more, less],
                            "stereotype": preferred, f"stereotype_{doc['bias_type']}": preferred})
        keys = ["stereotype"] + sorted({f"stereotype_{d['bias_type']}" for d in docs})
        return summarize(records, keys), records


BIAS_TASKS: dict[str, type[PaperTask]] = {cls.name: cls for cls in (CrowsPairs,)}
