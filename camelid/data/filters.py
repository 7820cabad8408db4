"""Per-document stages: normalisation, quality heuristics (C4 and Gopher, as the paper's
pipeline borrows them), code filters (the paper's GitHub processing) and language
identification. Each stage is a callable that returns the (possibly rewritten) text, or a
`Drop` naming why the document goes.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Drop:
    reason: str


# ---- Unicode and whitespace normalisation ---------------------------------------------------------

@dataclass
class NormalizeConfig:
    form: str = "NFC"                 # Unicode normal form
    max_blank_lines: int = 2          # longer runs of empty lines are shortened
    strip_trailing_spaces: bool = True


_ODD_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufeff\u200b]")


class Normalize:
    def __init__(self, cfg: NormalizeConfig):
        self.cfg = cfg
        self.blank_run = re.compile(r"\n{%d,}" % (cfg.max_blank_lines + 2))

    def __call__(self, text: str) -> str | Drop:
        text = unicodedata.normalize(self.cfg.form, text)
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = _CONTROL.sub("", _ODD_SPACES.sub(" ", text))
        if self.cfg.strip_trailing_spaces:
            text = "\n".join(line.rstrip() for line in text.split("\n"))
        text = self.blank_run.sub("\n" * (self.cfg.max_blank_lines + 1), text).strip("\n")
        return text if text.strip() else Drop("empty")


# ---- quality heuristics ------------------------------------------------------------------------------

STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
TERMINAL = ('.', '!', '?', '"', "'", '\u201d', '\u2019')


@dataclass
class QualityConfig:
    # Gopher (Rae et al., 2021, appendix A.1.1), document level
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_ratio: float = 0.1          # '#' and '...' per word
    max_bullet_line_fraction: float = 0.9
    max_ellipsis_line_fraction: float = 0.3
    min_alpha_word_fraction: float = 0.8
    min_stop_words: int = 2
    # C4 (Raffel et al., 2020)
    c4_lines: bool = False                 # keep only lines ending in terminal punctuation ...
    min_line_words: int = 3                # ... with at least this many words
    min_sentences: int = 0                 # drop documents with fewer sentences (C4 used 3)
    drop_lorem_ipsum: bool = True
    drop_curly_braces: bool = False        # C4 dropped pages containing '{' (code)
    bad_line_words: list[str] = field(default_factory=lambda: ["javascript", "cookie policy",
                                                              "terms of use", "privacy policy"])


class Quality:
    def __init__(self, cfg: QualityConfig):
        self.cfg = cfg

    def __call__(self, text: str) -> str | Drop:
        c = self.cfg
        if c.c4_lines:
            kept = []
            for line in text.split("\n"):
                s = line.strip()
                low = s.lower()
                if s.endswith(TERMINAL) and len(s.split()) >= c.min_line_words and \
                        not any(w in low for w in c.bad_line_words):
                    kept.append(line)
            text = "\n".join(kept)
            if not text:
                return Drop("c4_no_lines")
        low = text.lower()
        if c.drop_lorem_ipsum and "lorem ipsum" in low:
            return Drop("lorem_ipsum")
        if c.drop_curly_braces and "{" in text:
            return Drop("curly_brace")
        words = text.split()
        n = len(words)
        if n < c.min_words:
            return Drop("too_few_words")
        if n > c.max_words:
            return Drop("too_many_words")
        mean = sum(len(w) for w in words) / n
        if not c.min_mean_word_length <= mean <= c.max_mean_word_length:
            return Drop("mean_word_length")
        if (text.count("#") + text.count("...") + text.count("\u2026")) / n > c.max_symbol_ratio:
            return Drop("symbol_ratio")
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if lines:
            bullets = sum(ln.lstrip().startswith(("*", "-", "\u2022")) for ln in lines)
            if bullets / len(lines) > c.max_bullet_line_fraction:
                return Drop("bullet_lines")
            ellipsis = sum(ln.rstrip().endswith(("...", "\u2026")) for ln in lines)
            if ellipsis / len(lines) > c.max_ellipsis_line_fraction:
                return Drop("ellipsis_lines")
        if sum(any(ch.isalpha() for ch in w) for w in words) / n < c.min_alpha_word_fraction:
            return Drop("alpha_words")
        if len(STOP_WORDS.intersection(w.strip(".,;:!?\"'()").lower() for w in words)) < c.min_stop_words:
            return Drop("stop_words")
        if c.min_sentences and len(re.findall(r"[.!?](\s|$)", text)) < c.min_sentences:
            return Drop("too_few_sentences")
        return text


# ---- code (the paper's GitHub processing) --------------------------------------------------------------

@dataclass
class CodeConfig:
    max_line_length: int = 1000
    max_mean_line_length: float = 100.0
    min_alphanumeric_fraction: float = 0.25
    licenses: list[str] = field(default_factory=lambda: ["mit", "apache-2.0", "bsd-2-clause", "bsd-3-clause",
                                                          "isc", "psf-2.0", "unlicense"])
    license_field: str = "license"         # the document's metadata field holding its licence, if any
    strip_license_header: bool = True
    drop_autogenerated: bool = True


_HEADER = re.compile(r"\A(?:[ \t]*(?:#|//|/\*|\*|--|;)[^\n]*\n|[ \t]*\n)+")
_LICENSE_WORDS = re.compile(r"copyright|licen[cs]e|all rights reserved|permission is hereby granted|spdx", re.I)
_GENERATED = re.compile(r"(auto-?generated|generated by|do not edit)", re.I)


class Code:
    def __init__(self, cfg: CodeConfig):
        self.cfg = cfg
        self.allowed = {x.lower() for x in cfg.licenses}

    def __call__(self, text: str, meta: dict | None = None) -> str | Drop:
        c = self.cfg
        license_ = (meta or {}).get(c.license_field)
        if license_ is not None and str(license_).lower() not in self.allowed:
            return Drop("license")
        head = text[:2000]
        if c.drop_autogenerated and _GENERATED.search(head[:500]):
            return Drop("autogenerated")
        if c.strip_license_header:
            m = _HEADER.match(text)
            if m and _LICENSE_WORDS.search(m.group(0)):
                text = text[m.end():]
        lines = text.split("\n")
        if not text.strip():
            return Drop("empty")
        if max(len(ln) for ln in lines) > c.max_line_length:
            return Drop("long_line")
        if len(text) / len(lines) > c.max_mean_line_length:
            return Drop("mean_line_length")
        if sum(ch.isalnum() for ch in text) / len(text) < c.min_alphanumeric_fraction:
            return Drop("alphanumeric_fraction")
        return text


# ---- language identification ---------------------------------------------------------------------------

@dataclass
class LangIdConfig:
    languages: list[str] = field(default_factory=lambda: ["en"])
    min_confidence: float = 0.5
    sample_chars: int = 2000               # classify the start of long documents


class LangId:
    """langid.py (Lui & Baldwin, 2012): its model ships inside the PyPI package."""

    _identifier = None

    def __init__(self, cfg: LangIdConfig):
        self.cfg = cfg
        self.allowed = set(cfg.languages)

    @classmethod
    def identifier(cls):
        if cls._identifier is None:
            from langid.langid import LanguageIdentifier, model

            cls._identifier = LanguageIdentifier.from_modelstring(model, norm_probs=True)
        return cls._identifier

    def classify(self, text: str) -> tuple[str, float]:
        lang, prob = self.identifier().classify(text[: self.cfg.sample_chars])
        return lang, float(prob)

    def __call__(self, text: str) -> str | Drop:
        lang, prob = self.classify(text)
        if lang not in self.allowed:
            return Drop(f"language_{lang}")
        if prob < self.cfg.min_confidence:
            return Drop("language_uncertain")
        return text
