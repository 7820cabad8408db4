"""Task kinds and their shared machinery: few-shot prompts, requests, per-document records.

A task supplies documents and says how to turn one into a prompt and an answer; the classes
here build the requests, run them through a Scorer and compute the metrics.

With `Settings.chat_template` (`camelid eval --chat-template`) every task that builds a text
context asks in the model's chat format instead, as lm-evaluation-harness's
`--apply_chat_template --fewshot_as_multiturn --system_instruction` does: a system message (the
system prompt, then the task's description), each few-shot example as a user turn answered by
the assistant, the document as the last user turn, then the template's generation prompt; the
answers are scored or generated as the assistant's (`chat_requests`, `Generate(chat=True)`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from camelid.eval import metrics
from camelid.eval.judges import JudgeSettings
from camelid.eval.requests import Generate, Loglikelihood, Rolling, chat_requests, scored_split
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
    chat_template: bool = False        # ask in the model's chat format (see the module's docstring)
    system_prompt: str | None = None   # a system message; without chat_template, text before the context


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def join_text(first: str, then: str, separator: str = "\n\n") -> str:
    """`first` then `then`, with the separator between them unless either already has whitespace
    at the seam (lm-evaluation-harness joins its system instruction and description so)."""
    if not first or not then:
        return first or then
    return first + then if first[-1].isspace() or then[0].isspace() else first + separator + then


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
    # Settings.chat_template applies (the task kinds below build their contexts through Task);
    # tasks that score fixed sentences or the paper's raw prompts themselves stay as they are
    follows_chat_template: bool = False

    def generation_context(self, doc: Doc, index: int, k: int, seed: int, pool: list[Doc], scorer: Scorer) -> str:
        """What a generation request continues: the few-shot context, or for a chat task the
        conversation rendered with the scorer's chat template."""
        return self.context(doc, index, k, seed, pool)

    # ---- chat form (Settings.chat_template) ----------------------------------------------------
    def chat_prompt(self, doc: Doc) -> str:
        """The user's turn that asks about `doc`."""
        return self.prompt(doc)

    def chat_target(self, doc: Doc) -> str:
        """The assistant's answer to a solved example (the answer alone: the template separates turns)."""
        return self.target(doc)

    def system_messages(self, settings: Settings, description: str = "") -> list[dict[str, str]]:
        """The system message, if there is anything to say: the system prompt, then the task's
        description (lm-eval puts both there, joined by a blank line)."""
        text = join_text(settings.system_prompt or "", description.strip())
        return [{"role": "system", "content": text}] if text else []

    def conversation(self, doc: Doc, index: int, k: int, settings: Settings, pool: list[Doc]) -> list[dict[str, str]]:
        """The system message, the k examples as earlier user/assistant turns (the same examples
        as the text context's), and the document as the last user turn."""
        messages = self.system_messages(settings, self.description_for(doc))
        for e in self.fewshot_examples(doc, index, k, settings.seed, pool):
            messages += [user(self.chat_prompt(e)), assistant(self.chat_target(e))]
        return messages + [user(self.chat_prompt(doc))]

    def with_system_prompt(self, settings: Settings, context: str) -> str:
        """A text context with --system-prompt but no chat template: the prompt goes first, as
        text, a blank line before the rest (as lm-eval prepends its system instruction)."""
        return join_text(settings.system_prompt or "", context)

    def generation_request(self, doc: Doc, index: int, k: int, settings: Settings, pool: list[Doc],
                           scorer: Scorer) -> tuple[str, bool]:
        """(context, whether it is a rendered conversation) for a generation request."""
        if self.chat:     # a chat task file: its own conversation
            return self.generation_context(doc, index, k, settings.seed, pool, scorer), True
        if settings.chat_template:
            messages = self.conversation(doc, index, k, settings, pool)
            return scorer.tok.apply_chat_template(messages, add_generation_prompt=True), True
        return self.with_system_prompt(settings, self.generation_context(doc, index, k, settings.seed, pool,
                                                                         scorer)), False

    def generation_limits(self, chat: bool) -> tuple[tuple[str, ...], int]:
        """(stop strings, max new tokens). In chat form a task keeps its stop strings, which
        delimit the answer that exact match compares (NQ's newline, period, comma); the end of
        the assistant's turn stops generation too (the tokenizer's end-of-turn tokens)."""
        return tuple(getattr(self, "stop", ())), getattr(self, "max_new_tokens", 256)

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

    follows_chat_template = True

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
        each choice's continuation; in chat form, the conversation and each choice as the
        assistant's answer."""
        if settings.chat_template:
            return chat_requests(scorer.tok, self.conversation(doc, index, k, settings, pool), self.choices(doc))
        ctx = self.with_system_prompt(settings, self.context(doc, index, k, settings.seed, pool))
        return [Loglikelihood(ctx, self.continuation(c)) for c in self.choices(doc)]

    def calibration_requests(self, doc: Doc, settings: Settings, scorer: Scorer) -> list[Loglikelihood]:
        """The paper's unconditional requests, P(choice | "Answer:"), asked in the same form as
        the conditional ones so that each choice is the same tokens in both: in chat form
        "Answer:" is the only user turn (after the system message) and the choice is the
        assistant's answer; as text, the system prompt (if any) and "Answer:"."""
        assert self.calibration is not None
        if settings.chat_template:
            return chat_requests(scorer.tok, self.system_messages(settings) + [user(self.calibration)],
                                 self.choices(doc))
        context = self.with_system_prompt(settings, self.calibration)
        return [Loglikelihood(context, self.continuation(c)) for c in self.choices(doc)]

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
                requests += self.calibration_requests(doc, settings, scorer)
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
            contexts, rest = self.partial(doc)
            spans.append((len(requests), len(contexts)))
            if settings.chat_template:
                requests += self.chat_partial_requests(doc, i, k, settings, pool, scorer)
            else:
                prefix = self.with_system_prompt(settings, self.fewshot_prefix(doc, i, k, settings.seed, pool))
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

    def chat_partial_requests(self, doc: Doc, index: int, k: int, settings: Settings, pool: list[Doc],
                              scorer: Scorer) -> list[Loglikelihood]:
        """In chat form, as lm-eval does it: the sentence up to the filled blank is the user's
        last turn, one conversation per option, and the shared rest is the assistant's answer
        (examples: the gold option's sentence start, answered by its rest)."""
        contexts, rest = self.partial(doc)
        *earlier, _ = self.conversation(doc, index, k, settings, pool)
        return [r for c in contexts for r in chat_requests(scorer.tok, earlier + [user(c)], [rest.strip()])]


class GenerationTask(Task):
    """Free-form answers: greedy decoding until a stop string, exact match against any alias;
    with several samples, the majority answer (maj1@k). A task whose documents name preferred
    answers (a grading rule: right, and among the right answers the preferred ones) reports
    `preferred` too, the share of predictions that match one of them."""

    follows_chat_template = True

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

    follows_chat_template = True

    stop: tuple[str, ...] = ()
    max_new_tokens: int = 384
    sample_temperature: float = 0.8    # the paper: T=0.1 for pass@1 sampling, 0.8 for pass@k
    limits = Limits(timeout=10.0)
    pass_ks: tuple[int, ...] = (1, 10, 100)   # pass@k reported for every k up to the samples drawn
    # An instruct model answers with the whole function, docstring and all, in a Markdown block
    # and then ends its turn: room for a whole function (HumanEval's prompt and reference
    # solution together are at most 580 SmolLM2 tokens, 99% under 470) and a few words around
    # it, and no stop string ("\ndef" would cut the answer at its own first line).
    chat_max_new_tokens: int = 768

    def program(self, doc: Doc, completion: str) -> str:
        raise NotImplementedError

    def chat_program(self, doc: Doc, answer: str) -> str:
        """The program run for an answer in chat form: by default the answer's code (see
        `answer_code`) as the completion."""
        return self.program(doc, answer_code(answer))

    def generation_limits(self, chat: bool) -> tuple[tuple[str, ...], int]:
        return ((), self.chat_max_new_tokens) if chat else (self.stop, self.max_new_tokens)

    def evaluate(self, scorer: Scorer, settings: Settings) -> tuple[dict[str, float], list[dict]]:
        docs, n, outputs = sample_generations(self, scorer, settings)
        chat = settings.chat_template or self.chat
        records = []
        ks = [x for x in self.pass_ks if x <= n]
        for i, doc in enumerate(docs):
            completions = outputs[i * n:(i + 1) * n]
            programs = [(self.chat_program if chat else self.program)(doc, c) for c in completions]
            runs = [run_python(p, self.limits) for p in programs]
            passed = sum(r.passed for r in runs)
            rec = {"doc_id": i, "task_id": doc.get("task_id", i), "completions": completions,
                   "results": [{"status": r.status, "detail": r.detail[-500:]} for r in runs],
                   "passed": passed}
            if chat:   # built from the answer, not simply appended: worth seeing
                rec["programs"] = programs
            for kk in ks:
                rec[f"pass@{kk}"] = metrics.pass_at_k(n, passed, kk)
            records.append(rec)
        return summarize(records, [f"pass@{kk}" for kk in ks]), records


class PerplexityTask(Task):
    """Rolling log-likelihood of whole documents: token, word and byte perplexity, bits per byte."""

    stride: int | None = None

    def fewshot_docs(self) -> list[Doc]:
        return []    # a document's own text is scored, with no examples before it

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
    requests = []
    for i, doc in enumerate(docs):
        context, chat = task.generation_request(doc, i, k, settings, pool, scorer)
        stop, max_new_tokens = task.generation_limits(chat)
        requests += [Generate(context, stop, max_new_tokens, temperature, 1.0 if temperature == 0 else 0.95,
                              seed=settings.seed + s, chat=chat) for s in range(n)]
    return docs, n, scorer.generate(requests)


FENCE = re.compile(r"^[ \t]*```[^\n`]*\n(.*?)(?:^[ \t]*```|\Z)", re.S | re.M)


def code_blocks(text: str) -> list[str]:
    """The Markdown fenced code blocks of an answer, in order; the last may be unclosed (an
    answer cut by the token limit)."""
    return [m.group(1) for m in FENCE.finditer(text)]


def answer_code(text: str) -> str:
    """The code in an answer: its first fenced block, or the whole answer when it has none."""
    blocks = code_blocks(text)
    return blocks[0] if blocks else text
