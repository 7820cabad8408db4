"""Task kinds and their shared machinery: few-shot prompts, requests, per-document records.

A task supplies documents and says how to turn one into a prompt and an answer; the classes
here build the requests, run them through a Scorer and compute the metrics.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from camelid.eval import metrics
from camelid.eval.judges import JudgeSettings
from camelid.eval.requests import Generate, Loglikelihood, Rolling, scored_split
from camelid.eval.sandbox import Limits, run_python
from camelid.eval.scoring import Scorer

Doc = dict[str, Any]


@dataclass
class Settings:
    num_fewshot: int | None = None     # None: the task's default (the paper's setting)
    limit: int | None = None           # evaluate only the first N documents
    seed: int = 1234                   # few-shot sampling
    samples: int = 1                   # generations per document (pass@k, maj1@k)
    temperature: float | None = None   # None: greedy for one sample, the task's for several
    judges: JudgeSettings = field(default_factory=JudgeSettings)   # truthfulqa_gen, realtoxicityprompts


class Task:
    name: str = ""
    default_fewshot: int = 0
    fewshot_first_n: bool = False      # MMLU takes the first k dev examples, not random ones
    description: str = ""              # text before the examples
    example_separator: str = "\n\n"

    def docs(self) -> list[Doc]:
        raise NotImplementedError

    def fewshot_docs(self) -> list[Doc]:
        """Where examples come from (train or dev); by default the evaluated documents, in which
        case the evaluated document itself is never its own example."""
        return self.docs()

    def prompt(self, doc: Doc) -> str:
        raise NotImplementedError

    def target(self, doc: Doc) -> str:
        """The answer as written after a few-shot example's prompt."""
        raise NotImplementedError

    def description_for(self, doc: Doc) -> str:
        return self.description

    # ---- few-shot contexts --------------------------------------------------------------------
    target_delimiter: str = " "
    # Task files may hold answers written with their leading space, as lm-evaluation-harness
    # writes them (" Paris"); the built-in tasks keep lm-eval's plain delimiter + answer,
    # which their published numbers assume.
    keep_leading_whitespace: bool = False

    def continuation(self, answer: str) -> str:
        """What follows the prompt: target_delimiter + answer, or the answer alone when it
        already starts with whitespace and the task keeps it."""
        if self.keep_leading_whitespace and answer[:1].isspace():
            return answer
        return self.target_delimiter + answer

    def fewshot_examples(self, doc: Doc, index: int, k: int, seed: int, pool: list[Doc]) -> list[Doc]:
        """k solved examples, drawn with a seed that depends on the document, never the document itself."""
        if not k:
            return []
        candidates = [d for d in pool if d is not doc and d != doc]
        if self.fewshot_first_n:
            return candidates[:k]
        rng = random.Random(f"{seed}:{self.name}:{index}")
        return rng.sample(candidates, min(k, len(candidates)))

    def fewshot_prefix(self, doc: Doc, index: int, k: int, seed: int, pool: list[Doc]) -> str:
        """The description and k solved examples (joined by example_separator)."""
        examples = self.fewshot_examples(doc, index, k, seed, pool)
        shots = [self.prompt(e) + self.continuation(self.target(e)) for e in examples]
        return self.description_for(doc) + "".join(s + self.example_separator for s in shots)

    def context(self, doc: Doc, index: int, k: int, seed: int, pool: list[Doc]) -> str:
        return self.fewshot_prefix(doc, index, k, seed, pool) + self.prompt(doc)

    chat: bool = False   # generation_context renders a conversation with the model's chat template

    def generation_context(self, doc: Doc, index: int, k: int, seed: int, pool: list[Doc], scorer: Scorer) -> str:
        """What a generation request continues: the few-shot context, or for a chat task the
        conversation rendered with the scorer's chat template."""
        return self.context(doc, index, k, seed, pool)

    def selected(self, settings: Settings) -> list[Doc]:
        docs = self.docs()
        return docs[: settings.limit] if settings.limit else docs

    def evaluate(self, scorer: Scorer, settings: Settings) -> tuple[dict[str, float], list[dict]]:
        raise NotImplementedError


def summarize(records: list[dict], keys: list[str]) -> dict[str, float | None]:
    """The mean of each metric and its bootstrap standard error; None (null in JSON, "–" in the
    table) where one document gives no spread to measure."""
    out: dict[str, float | None] = {}
    for key in keys:
        values = [r[key] for r in records if key in r]
        if values:
            out[key] = float(np.mean(values))
            out[f"{key}_stderr"] = metrics.bootstrap_stderr(values) if len(values) > 1 else None
    return out


class MultipleChoiceTask(Task):
    """Each choice is scored as the continuation target_delimiter + choice after the prompt
    (see `continuation`); acc, acc_norm, and the paper's calibrated accuracy where
    `calibration` is set. Records carry the exact strings scored."""

    calibration: str | None = None     # e.g. "Answer:" (OpenBookQA, BoolQ)

    def choices(self, doc: Doc) -> list[str]:
        raise NotImplementedError

    def gold(self, doc: Doc) -> int:
        raise NotImplementedError

    def target(self, doc: Doc) -> str:
        return self.choices(doc)[self.gold(doc)]

    def choice_requests(self, doc: Doc, index: int, k: int, settings: Settings, pool: list[Doc],
                        scorer: Scorer) -> list[Loglikelihood]:
        """One request per choice: the context (few-shot examples and the prompt) followed by
        each choice's continuation."""
        ctx = self.context(doc, index, k, settings.seed, pool)
        return [Loglikelihood(ctx, self.continuation(c)) for c in self.choices(doc)]

    def evaluate(self, scorer: Scorer, settings: Settings) -> tuple[dict[str, float], list[dict]]:
        docs = self.selected(settings)
        k = self.default_fewshot if settings.num_fewshot is None else settings.num_fewshot
        pool = self.fewshot_docs() if k else []
        requests, spans = [], []
        for i, doc in enumerate(docs):
            options = self.choices(doc)
            start = len(requests)
            requests += self.choice_requests(doc, i, k, settings, pool, scorer)
            if self.calibration is not None:
                requests += [Loglikelihood(self.calibration, self.continuation(c)) for c in options]
            spans.append((start, len(options)))
        scores = scorer.loglikelihood(requests)
        records = []
        for i, (doc, (start, n)) in enumerate(zip(docs, spans)):
            options, gold = self.choices(doc), self.gold(doc)
            ll = [scores[start + j][0] for j in range(n)]
            rec = {"doc_id": i, "choices": options, "gold": gold, "loglikelihoods": ll,
                   "is_greedy": [scores[start + j][1] for j in range(n)],
                   "acc": metrics.acc(ll, gold), "acc_norm": metrics.acc_norm(ll, options, gold)}
            rec.update(_scored(requests[start:start + n]))
            rec["prediction"] = int(np.argmax(ll))
            if self.calibration is not None:
                unconditional = [scores[start + n + j][0] for j in range(n)]
                rec["unconditional_loglikelihoods"] = unconditional
                rec["unconditional_scored"] = _scored(requests[start + n:start + 2 * n])
                rec["acc_calibrated"] = metrics.acc_calibrated(ll, unconditional, gold)
            records.append(rec)
        return summarize(records, ["acc", "acc_norm", "acc_calibrated"]), records


def _scored(requests: list[Loglikelihood]) -> dict[str, object]:
    """The exact strings scored for one document's choices (after the trailing spaces of the
    context have moved into the continuation): one context and a continuation per choice, or,
    for partial scoring, a context per choice and one shared continuation."""
    pairs = [scored_split(r.context, r.continuation) for r in requests]
    contexts, continuations = [c for c, _ in pairs], [c for _, c in pairs]
    if len(set(contexts)) == 1:
        return {"context": contexts[0], "continuations": continuations}
    if len(set(continuations)) == 1:
        return {"contexts": contexts, "continuation": continuations[0]}
    return {"contexts": contexts, "continuations": continuations}


class PartialScoringTask(MultipleChoiceTask):
    """WinoGrande: each option fills the blank inside the context, and only the shared rest of
    the sentence is scored (Sakaguchi et al.; the paper follows lm-eval's 'partial' scoring)."""

    def partial(self, doc: Doc) -> tuple[list[str], str]:
        """(context for each option, the shared continuation)."""
        raise NotImplementedError

    def evaluate(self, scorer: Scorer, settings: Settings) -> tuple[dict[str, float], list[dict]]:
        docs = self.selected(settings)
        k = self.default_fewshot if settings.num_fewshot is None else settings.num_fewshot
        pool = self.fewshot_docs() if k else []
        requests, spans = [], []
        for i, doc in enumerate(docs):
            prefix = self.fewshot_prefix(doc, i, k, settings.seed, pool)
            contexts, rest = self.partial(doc)
            spans.append((len(requests), len(contexts)))
            requests += [Loglikelihood(prefix + c, rest) for c in contexts]
        scores = scorer.loglikelihood(requests)
        records = []
        for i, (doc, (start, n)) in enumerate(zip(docs, spans)):
            ll = [scores[start + j][0] for j in range(n)]
            gold = self.gold(doc)
            records.append({"doc_id": i, "choices": self.choices(doc), "gold": gold, "loglikelihoods": ll,
                            **_scored(requests[start:start + n]),
                            "prediction": int(np.argmax(ll)), "acc": metrics.acc(ll, gold)})
        return summarize(records, ["acc"]), records


class GenerationTask(Task):
    """Free-form answers: greedy decoding until a stop string, exact match against any alias;
    with several samples, the majority answer (maj1@k). A task whose documents name preferred
    answers (a grading rule: right, and among the right answers the preferred ones) reports
    `preferred` too, the share of predictions that match one of them."""

    stop: tuple[str, ...] = ("\n",)
    max_new_tokens: int = 64
    sample_temperature: float = 0.6

    def answers(self, doc: Doc) -> list[str]:
        raise NotImplementedError

    def preferred(self, doc: Doc) -> list[str]:
        """The right answers that the task's rule ranks above the others (none: no ranking)."""
        return []

    def target(self, doc: Doc) -> str:
        return self.answers(doc)[0]

    def extract(self, text: str) -> str:
        return text.strip()

    def normalize(self, answer: str) -> str:
        return metrics.normalize_answer(answer)

    def correct(self, prediction: str, doc: Doc, answers: list[str] | None = None) -> float:
        p = self.normalize(prediction)
        return float(any(p == self.normalize(a) for a in (self.answers(doc) if answers is None else answers)))

    def evaluate(self, scorer: Scorer, settings: Settings) -> tuple[dict[str, float], list[dict]]:
        docs, n, outputs = sample_generations(self, scorer, settings)
        ranked = any(self.preferred(doc) for doc in docs)
        records = []
        for i, doc in enumerate(docs):
            texts = outputs[i * n:(i + 1) * n]
            extracted = [self.extract(t) for t in texts]
            prediction = metrics.majority(extracted, self.normalize) if n > 1 else self.normalize(extracted[0])
            rec = {"doc_id": i, "generations": texts, "prediction": prediction, "gold": self.answers(doc),
                   "exact_match": self.correct(prediction, doc)}
            if n > 1:
                rec[f"maj1@{n}"] = rec["exact_match"]
            if ranked:
                rec["preferred"] = self.correct(prediction, doc, self.preferred(doc))
            records.append(rec)
        names = ["exact_match"] + ([f"maj1@{n}"] if n > 1 else []) + (["preferred"] if ranked else [])
        return summarize(records, names), records


class CodeTask(Task):
    """Programs completed by the model, run against the task's tests in the sandbox; pass@k with
    the unbiased estimator over `samples` completions per problem."""

    stop: tuple[str, ...] = ()
    max_new_tokens: int = 384
    sample_temperature: float = 0.8    # the paper: T=0.1 for pass@1 sampling, 0.8 for pass@k
    limits = Limits(timeout=10.0)
    pass_ks: tuple[int, ...] = (1, 10, 100)   # pass@k reported for every k up to the samples drawn

    def program(self, doc: Doc, completion: str) -> str:
        raise NotImplementedError

    def evaluate(self, scorer: Scorer, settings: Settings) -> tuple[dict[str, float], list[dict]]:
        docs, n, outputs = sample_generations(self, scorer, settings)
        records = []
        ks = [x for x in self.pass_ks if x <= n]
        for i, doc in enumerate(docs):
            completions = outputs[i * n:(i + 1) * n]
            runs = [run_python(self.program(doc, c), self.limits) for c in completions]
            passed = sum(r.passed for r in runs)
            rec = {"doc_id": i, "task_id": doc.get("task_id", i), "completions": completions,
                   "results": [{"status": r.status, "detail": r.detail[-500:]} for r in runs],
                   "passed": passed}
            for kk in ks:
                rec[f"pass@{kk}"] = metrics.pass_at_k(n, passed, kk)
            records.append(rec)
        return summarize(records, [f"pass@{kk}" for kk in ks]), records


class PerplexityTask(Task):
    """Rolling log-likelihood of whole documents: token, word and byte perplexity, bits per byte."""

    stride: int | None = None

    def text(self, doc: Doc) -> str:
        return doc["text"]

    def evaluate(self, scorer: Scorer, settings: Settings) -> tuple[dict[str, float], list[dict]]:
        docs = self.selected(settings)
        scores = scorer.loglikelihood_rolling([Rolling(self.text(d)) for d in docs], stride=self.stride)
        records = []
        for i, (doc, (ll, tokens)) in enumerate(zip(docs, scores)):
            text = self.text(doc)
            records.append({"doc_id": i, "loglikelihood": ll, "tokens": tokens, "words": len(text.split()),
                            "bytes": len(text.encode())})
        total = sum(r["loglikelihood"] for r in records)
        count = lambda key: sum(r[key] for r in records)  # noqa: E731
        results = {"token_perplexity": float(np.exp(-total / count("tokens"))),
                   "word_perplexity": float(np.exp(-total / count("words"))),
                   "byte_perplexity": float(np.exp(-total / count("bytes"))),
                   "bits_per_byte": float(-total / count("bytes") / np.log(2))}
        return results, records


def sample_generations(task, scorer: Scorer, settings: Settings) -> tuple[list[Doc], int, list[str]]:
    """The selected docs, the samples per doc n, and n completions per doc in doc order (greedy
    for one sample, else the task's sampling temperature), shared by generation and code tasks."""
    docs = task.selected(settings)
    k = task.default_fewshot if settings.num_fewshot is None else settings.num_fewshot
    pool = task.fewshot_docs() if k else []
    n = max(1, settings.samples)
    temperature = settings.temperature if settings.temperature is not None else \
        (0.0 if n == 1 else task.sample_temperature)
    requests = [Generate(task.generation_context(doc, i, k, settings.seed, pool, scorer), task.stop,
                         task.max_new_tokens, temperature, 1.0 if temperature == 0 else 0.95, seed=settings.seed + s,
                         chat=task.chat)
                for i, doc in enumerate(docs) for s in range(n)]
    return docs, n, scorer.generate(requests)
