"""Metrics of the paper's protocol, as pure functions of model scores."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Sequence

import numpy as np


def acc(loglikelihoods: Sequence[float], gold: int) -> float:
    return float(int(np.argmax(loglikelihoods)) == gold)


def acc_norm(loglikelihoods: Sequence[float], choices: Sequence[str], gold: int) -> float:
    """Log-likelihood divided by the choice's length in characters (without the leading space),
    as lm-evaluation-harness does, so numbers compare with its published ones."""
    normed = [ll / max(len(c.lstrip(" ")), 1) for ll, c in zip(loglikelihoods, choices)]
    return float(int(np.argmax(normed)) == gold)


def acc_calibrated(loglikelihoods: Sequence[float], unconditional: Sequence[float], gold: int) -> float:
    """The paper's score for OpenBookQA and BoolQ: P(completion | context) / P(completion | "Answer:")."""
    scores = [a - b for a, b in zip(loglikelihoods, unconditional)]
    return float(int(np.argmax(scores)) == gold)


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, aliases: Sequence[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in aliases))


def majority(answers: Sequence[str], normalize: Callable[[str], str] = lambda s: s) -> str:
    """The most common answer among k samples (maj1@k); ties go to the earliest."""
    counted = Counter(normalize(a) for a in answers if a)
    if not counted:
        return ""
    best = max(counted.values())
    return next(normalize(a) for a in answers if a and counted[normalize(a)] == best)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): 1 - C(n - c, k) / C(n, k), computed stably."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def bootstrap_stderr(values: Sequence[float], iterations: int = 1000, seed: int = 1234,
                     statistic: Callable[[np.ndarray], float] = np.mean) -> float:
    """Standard deviation of the statistic over resamples of the per-document values."""
    data = np.asarray(values, dtype=np.float64)
    if len(data) < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(data), size=(iterations, len(data)))
    return float(np.std([statistic(data[d]) for d in draws], ddof=1))


# ---- answers in generated text ----------------------------------------------------------------------

_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def last_number(text: str) -> str:
    """GSM8k: the last number in the text, without thousands separators or trailing zeros."""
    found = _NUMBER.findall(text)
    if not found:
        return ""
    value = found[-1].replace(",", "").rstrip(".")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def boxed(text: str) -> str:
    """MATH: the content of the last \\boxed{...} (balanced braces), else of the last $...$."""
    start = text.rfind("\\boxed")
    if start < 0:
        m = re.findall(r"\$([^$]+)\$", text)
        return m[-1].strip() if m else text.strip()
    i = text.find("{", start)
    if i < 0:
        return text[start + len("\\boxed"):].strip().split("$")[0].strip()
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return text[i + 1:]


def normalize_math(answer: str) -> str:
    """A light version of the MATH paper's answer normalisation (Hendrycks et al., 2021)."""
    s = answer.strip().replace(" ", "").replace("\\!", "").replace("\\left", "").replace("\\right", "")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("^\\circ", "").replace("^{\\circ}", "")
    s = s.replace("\\$", "").replace("$", "").rstrip(".")
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    if re.fullmatch(r"\.\d+", s):
        s = "0" + s
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s
