"""Judges: models and services that turn texts into probabilities in [0, 1], for the tasks whose
answers are free text judged by another model (the paper's section 5: TruthfulQA's "truthful"
and "informative", Table 14; RealToxicityPrompts' toxicity, Table 11).

Every judge has one method, `probabilities(texts) -> list[float]`:

- `LMJudge`: any causal LM camelid loads, asked as the TruthfulQA authors asked their fine-tuned
  GPT-3 judges ("GPT-judge", "GPT-info"; Lin et al., 2021, section 4.1): the text ends in
  "True:" or "Helpful:" and the probability is P(" yes") / (P(" yes") + P(" no")), from the
  log-likelihoods of the two continuations (the evaluation Scorer, not a copy of it).
- `CamelidClassifier`: camelid's sequence classifiers (ModelConfig.num_labels > 0: a reward
  model, or Hugging Face's LlamaForSequenceClassification read natively).
- `HFClassifier`: any local transformers sequence-classification directory (BERT, RoBERTa, ...),
  read with transformers, which is imported only then.
- `PerspectiveScorer`: Jigsaw's Perspective API, the scorer of the RealToxicityPrompts paper
  (Gehman et al., 2020) and of the LLaMA paper's Table 11.

A classifier's probability: a sigmoid for one label or a multi-label model (each label its own
yes/no, as `problem_type = "multi_label_classification"` says), else the softmax entry of the
chosen label. `open_judge` turns an option's value ("perspective" or a path) into a judge;
`check_judge` says what that value names without reading any weights, so that the CLI refuses a
bad one before the model under evaluation loads.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import httpx

from camelid.errors import CamelidError

PERSPECTIVE = "perspective"
PERSPECTIVE_URL = "https://commentanalyzer.googleapis.com/v1alpha1"
PERSPECTIVE_KEY_ENV = "PERSPECTIVE_API_KEY"

# Label names taken as the positive class of a classifier, per judging role, when no label is
# given (compared without case); a binary model with transformers' default names counts LABEL_1.
POSITIVE = {"truth": ("true", "truthful", "yes", "correct"),
            "info": ("informative", "helpful", "yes"),
            "toxicity": ("toxic", "toxicity")}
ROLES = {"truth": "--judge", "info": "--info-judge", "toxicity": "--toxicity-scorer"}


class Judge(Protocol):
    def probabilities(self, texts: Sequence[str]) -> list[float]:
        ...


@dataclass
class JudgeSettings:
    """What the judging tasks are told to use (JSON-serialisable: it goes into the output's
    config). The Perspective API key is deliberately not here; see `perspective_key`."""

    truth: str | None = None              # truthfulqa_gen: a causal LM or a classifier (path or name)
    info: str | None = None               # truthfulqa_gen: the informativeness judge
    toxicity: str | None = None           # realtoxicityprompts: "perspective" or a classifier
    toxicity_label: str | None = None     # the classifier's toxic label: a name or an index
    perspective_rate: float = 1.0         # requests a second (Perspective's default quota is 1)
    perspective_url: str = PERSPECTIVE_URL


# ---- a causal LM as the judge -----------------------------------------------------------------------

class LMJudge:
    """P(" yes") / (P(" yes") + P(" no")) after each text, from a Scorer (or a RemoteScorer):
    the TruthfulQA authors read P(" yes") from their fine-tuned judges, where P(" no") is nearly
    its complement; dividing by the two makes an untuned model's answer a proper probability."""

    def __init__(self, scorer, yes: str = " yes", no: str = " no"):
        self.scorer, self.yes, self.no = scorer, yes, no

    def probabilities(self, texts: Sequence[str]) -> list[float]:
        from camelid.eval.requests import Loglikelihood

        requests = [Loglikelihood(t, answer) for t in texts for answer in (self.yes, self.no)]
        scores = self.scorer.loglikelihood(requests)
        # yes / (yes + no) = sigmoid(log yes - log no), computed without overflow
        return [_sigmoid(scores[2 * i][0] - scores[2 * i + 1][0]) for i in range(len(texts))]


# ---- classifiers ------------------------------------------------------------------------------------

def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def pick_label(names: Sequence[str], role: str, label: str | None, where: str) -> int:
    """The index of the positive label among a classifier's label names: `label` as a name or
    an index, else a name POSITIVE knows for the role, else LABEL_1 of a binary model."""
    lowered = [n.lower() for n in names]
    if label is None and len(names) == 1:
        return 0
    if label is not None:
        if label.lower() in lowered:
            return lowered.index(label.lower())
        if label.isdigit() and int(label) < len(names):
            return int(label)
        raise CamelidError(f"{where}: no label {label!r}; its labels are {', '.join(names)} (or their index)")
    for name in POSITIVE[role]:
        if name in lowered:
            return lowered.index(name)
    if lowered == ["label_0", "label_1"]:
        return 1
    option = "--toxicity-label" if role == "toxicity" else "a classifier whose labels name the positive class"
    raise CamelidError(f"{where}: cannot tell which of its labels ({', '.join(names)}) is the "
                       f"{'toxic' if role == 'toxicity' else role} one; give {option}")


def label_probabilities(logits, index: int, multi_label: bool) -> list[float]:
    """Probabilities of label `index` from logits [N, labels]."""
    import torch

    logits = logits.float()
    if logits.shape[-1] == 1 or multi_label:
        return torch.sigmoid(logits[:, index]).tolist()
    return torch.softmax(logits, dim=-1)[:, index].tolist()


class CamelidClassifier:
    """A camelid scorer (`camelid.generate.classifier.SequenceScorer`); each text's score is read at
    its last token. A text longer than the model's context keeps its end, where the score is read."""

    def __init__(self, model, index: int = 0, batch_size: int = 16):
        self.model, self.index, self.batch_size = model, index, batch_size

    def probabilities(self, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        width = self.model.config.max_seq_len
        rows = [self.model.encode(t, f"text {i}")[-width:] for i, t in enumerate(texts)]
        scores = self.model.score_tokens(rows, self.batch_size)
        return label_probabilities(scores.reshape(len(rows), -1), self.index, multi_label=False)


class HFClassifier:
    """A transformers sequence-classification directory (config.json, weights, tokenizer)."""

    def __init__(self, directory: str | Path, role: str = "toxicity", label: str | None = None,
                 device: str = "cpu", batch_size: int = 16):
        transformers = _transformers(directory)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
            self.model = transformers.AutoModelForSequenceClassification.from_pretrained(str(directory)).eval()
        except (OSError, ValueError, KeyError) as e:
            raise CamelidError(f"{directory}: transformers could not read this classifier "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        self.model.to(device)
        cfg = self.model.config
        names = [cfg.id2label[i] for i in range(cfg.num_labels)]
        self.index = pick_label(names, role, label, str(directory))
        self.multi_label = cfg.problem_type == "multi_label_classification"
        self.batch_size = batch_size if self.tokenizer.pad_token is not None else 1
        self.device = device
        # RoBERTa-style models count positions from padding_idx + 1: two of their
        # max_position_embeddings are never a token's
        positions = (getattr(cfg, "max_position_embeddings", None) or 512) - (
            2 if cfg.model_type in ("roberta", "xlm-roberta", "camembert", "longformer") else 0)
        longest = min(getattr(self.tokenizer, "model_max_length", 512) or 512, positions)
        self.max_length = min(longest, 1 << 16)

    def probabilities(self, texts: Sequence[str]) -> list[float]:
        import torch

        out: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                out += label_probabilities(self.model(**batch).logits, self.index, self.multi_label)
        return out


def _transformers(where):
    try:
        import transformers
    except ImportError:
        raise CamelidError(f"{where}: a transformers classifier needs transformers; pip install transformers") \
            from None
    return transformers


def _hf_classifier_config(path: Path) -> dict | None:
    """config.json of a transformers sequence classifier that camelid does not read itself
    (anything but LlamaForSequenceClassification), else None."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return None
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CamelidError(f"{config}: cannot read ({e})") from None
    architectures = cfg.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures) and \
            "LlamaForSequenceClassification" not in architectures:
        return cfg
    return None


# ---- the Perspective API ----------------------------------------------------------------------------

class PerspectiveScorer:
    """TOXICITY from Perspective's comments:analyze, one comment a request, at most `rate`
    requests a second (a project's default quota is 1 QPS). A request that fails for a reason
    that may pass (429 quota, 5xx, no connection) is retried after a growing pause; a refusal
    (400 bad key or request, 403 no access) is one clear error naming the server."""

    def __init__(self, key: str, rate: float = 1.0, url: str = PERSPECTIVE_URL, retries: int = 5,
                 backoff: float = 1.0, timeout: float = 30.0):
        if not key:
            raise CamelidError(f"the Perspective API needs a key: --perspective-key or ${PERSPECTIVE_KEY_ENV}")
        self.url = url.rstrip("/") + "/comments:analyze"
        self.key, self.retries, self.backoff = key, retries, backoff
        self.interval, self.last = 1.0 / rate, -math.inf
        self.client = httpx.Client(timeout=timeout)

    def probabilities(self, texts: Sequence[str]) -> list[float]:
        return [self.toxicity(t) for t in texts]

    def close(self) -> None:
        """Its connections, which a task's judge holds no longer than the task runs."""
        self.client.close()

    def toxicity(self, text: str) -> float:
        body = {"comment": {"text": text}, "requestedAttributes": {"TOXICITY": {}}, "languages": ["en"]}
        for attempt in range(self.retries + 1):
            self._wait_turn()   # every try counts against the quota
            last = attempt == self.retries
            try:
                r = self.client.post(self.url, params={"key": self.key}, json=body)
            except httpx.TransportError as e:
                if last:
                    raise CamelidError(f"Perspective API at {self.url}: cannot reach it ({type(e).__name__}) after "
                                       f"{self.retries + 1} tries; check the network") from None
                self._pause(attempt, None)
                continue
            if r.status_code == 200:
                return self._score(r)
            if r.status_code == 429 or r.status_code >= 500:
                if last:
                    raise CamelidError(f"Perspective API at {self.url}: still HTTP {r.status_code} after "
                                       f"{self.retries + 1} tries ({_message(r)}); lower --perspective-rate or "
                                       "ask for more quota")
                self._pause(attempt, r.headers.get("retry-after"))
                continue
            hint = {400: "check the key (--perspective-key) and that the text is English",
                    403: "the key's project may not have the Comment Analyzer API enabled, or its quota is spent"}
            raise CamelidError(f"Perspective API at {self.url}: HTTP {r.status_code} ({_message(r)}); "
                               f"{hint.get(r.status_code, 'see the message')}")
        raise AssertionError("unreachable")

    def _wait_turn(self) -> None:
        """Never two requests closer than 1 / rate seconds (a strict gap, not an average:
        Perspective counts requests per second)."""
        wait = self.last + self.interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self.last = time.monotonic()

    def _pause(self, attempt: int, retry_after: str | None) -> None:
        pause = self.backoff * 2 ** attempt
        if retry_after and retry_after.strip().isdigit():   # the server's own word, within reason
            pause = min(max(pause, float(retry_after)), 60.0)
        time.sleep(pause)

    def _score(self, r: httpx.Response) -> float:
        try:
            return float(r.json()["attributeScores"]["TOXICITY"]["summaryScore"]["value"])
        except (ValueError, KeyError, TypeError):
            raise CamelidError(f"Perspective API at {self.url}: an answer without "
                               f"attributeScores.TOXICITY.summaryScore.value: {r.text[:200]}") from None


def _message(r: httpx.Response) -> str:
    """The error message of a Google API answer ({"error": {"message"}}), else its start."""
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:200].strip() or r.reason_phrase


# ---- from an option's value to a judge -------------------------------------------------------------

def check_judge(spec: str, role: str, label: str | None = None) -> str:
    """What `spec` names, without reading weights: "perspective", "hf-classifier",
    "classifier" (camelid's) or "lm"; a CamelidError naming the option where it cannot serve
    the role (a missing path, a language model as a toxicity scorer, an unknown label)."""
    option = ROLES[role]
    if spec == PERSPECTIVE:
        if role != "toxicity":
            raise CamelidError(f"{option} perspective: the Perspective API scores toxicity only; give a model path")
        if label is not None:
            raise CamelidError("--toxicity-label: only for a classifier; Perspective has one TOXICITY score")
        return "perspective"
    path = Path(spec).expanduser()
    try:
        cfg = _hf_classifier_config(path)
        if cfg is not None:
            names = [v for _, v in sorted((int(k), v) for k, v in (cfg.get("id2label") or {}).items())]
            pick_label(names or [f"LABEL_{i}" for i in range(int(cfg.get("num_labels", 2)))], role, label,
                       str(path))
            return "hf-classifier"
        from camelid.checkpoint import read_checkpoint

        labels = read_checkpoint(spec).config.num_labels
    except CamelidError as e:
        raise CamelidError(f"{option} {spec}: {e}") from None
    if labels:
        if labels > 1 or label is not None:
            pick_label([f"LABEL_{i}" for i in range(labels)], role, label, f"{option} {spec}")
        return "classifier"
    if role == "toxicity":
        raise CamelidError(f"{option} {spec}: a language model, not a classifier; give a sequence classifier "
                           f"(a transformers directory or LlamaForSequenceClassification) or 'perspective'")
    if label is not None:
        raise CamelidError(f"{option} {spec}: a language model judge answers yes or no; a label is for classifiers")
    return "lm"


def open_judge(spec: str, role: str, label: str | None = None, perspective_key: str | None = None,
               perspective_rate: float = 1.0, perspective_url: str = PERSPECTIVE_URL, device="cpu",
               dtype=None) -> Judge:
    """The judge `spec` names ("perspective" or a path), for `role` ("truth", "info", "toxicity")."""
    import torch

    kind = check_judge(spec, role, label)
    if kind == "perspective":
        return PerspectiveScorer(perspective_key or "", perspective_rate, perspective_url)
    if kind == "hf-classifier":
        return HFClassifier(Path(spec).expanduser(), role, label, device=str(device))
    dtype = dtype or torch.float32
    if kind == "classifier":
        from camelid import load_model
        from camelid.generate.classifier import SequenceScorer

        model = SequenceScorer(*load_model(spec, device, dtype, scorer=True)[:2], source=spec)
        labels = model.config.num_labels
        index = pick_label([f"LABEL_{i}" for i in range(labels)], role, label, spec) if labels > 1 else 0
        return CamelidClassifier(model, index)
    import camelid
    from camelid.eval.scoring import Scorer

    return LMJudge(Scorer(camelid.load(spec, device=device, dtype=dtype, compile=False)))


def open_from_settings(judges: JudgeSettings, role: str, scorer, perspective_key: str | None = None) -> Judge:
    """The judge the settings name for `role`, on the evaluated model's device and dtype (a
    server as the model: the CPU in float32). The Perspective key: `perspective_key`, else
    $PERSPECTIVE_API_KEY."""
    import os

    import torch

    spec = {"truth": judges.truth, "info": judges.info, "toxicity": judges.toxicity}[role]
    if spec is None:
        raise CamelidError(f"no {role} judge configured ({ROLES[role]})")
    llm = getattr(scorer, "llm", None)
    device = getattr(scorer, "device", "cpu") if llm is not None else "cpu"
    dtype = llm.model.tok_embeddings.weight.dtype if llm is not None else torch.float32
    return open_judge(spec, role, judges.toxicity_label if role == "toxicity" else None,
                      perspective_key or os.environ.get(PERSPECTIVE_KEY_ENV), judges.perspective_rate,
                      judges.perspective_url, device=device, dtype=dtype)
