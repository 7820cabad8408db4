"""Any OpenAI-compatible server as the model under evaluation (`camelid eval --model
openai:http://HOST:PORT/v1`): camelid's own server, vLLM, llama.cpp's.

Log-likelihoods come from completions with `echo` and `logprobs`, the way lm-evaluation-harness's
`local-completions` gets them: the context and continuation go as token ids (the tokenizer is
read locally, from `--tokenizer`), with `max_tokens: 1`, and the continuation's tokens are read
from the prompt's log-probabilities (the one generated token is not used). A server that takes
no token ids (llama-cpp-python's) gets text instead (`text=True`), and the continuation's
tokens are those whose `text_offset` falls at or after the context's end, as the server
tokenized the whole text. Generation goes
through completions with the task's settings. Requests run concurrently (`concurrency` at a
time), several prompts per request where the server takes lists, at most `rate` requests a
second, and a request that fails for a reason that may pass (no connection, 429, 5xx) is
retried with a growing pause; any other failure is a CamelidError naming the server.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import httpx

from camelid.errors import CamelidError
from camelid.eval.requests import (Encoded, Generate, Loglikelihood, Rolling, encode_chat_pair, encode_pair,
                                   prefix_token, scored_split)
from camelid.tokenizer import Tokenizer

PREFIX = "openai:"
RETRIES = 4            # tries after the first, for failures that may pass
BACKOFF_S = 0.5        # the first pause; doubled each time


class RateLimit:
    """At most `per_second` starts a second, across threads (None: no bound)."""

    def __init__(self, per_second: float | None):
        self.interval = 1.0 / per_second if per_second else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        time.sleep(max(0.0, start - now))


class RemoteScorer:
    """The Scorer interface (`camelid.eval.scoring.Scorer`) over an OpenAI-compatible server."""

    def __init__(self, url: str, tokenizer: Tokenizer, api_key: str | None = None, model: str | None = None,
                 batch_size: int = 8, concurrency: int = 4, rate: float | None = None, max_length: int = 2048,
                 timeout: float = 300.0, text: bool = False):
        self.url = url.rstrip("/")
        self.tok = tokenizer
        self.model = model
        self.batch_size, self.concurrency, self.max_length = max(1, batch_size), max(1, concurrency), max_length
        self.limit = RateLimit(rate)
        self.text = text
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    @property
    def source(self) -> str:
        return self.url

    @property
    def longest(self) -> int:
        """The longest prompt a scoring request sends: the generated token must fit too."""
        return self.max_length - 1

    def context(self) -> int | None:
        """The server's context (max_model_len in /models, as vLLM and camelid give it), if it says;
        the first contact, so an unreachable server or a wrong key is said at once."""
        try:
            r = self.http.get("/models")
        except httpx.TransportError as e:
            raise CamelidError(f"{self.url}: cannot reach the server ({type(e).__name__}: {e})") from None
        if r.status_code != 200:
            raise CamelidError(f"{self.url}/models: HTTP {r.status_code}: {_message(r)}")
        try:
            models = r.json().get("data") or []
        except (ValueError, AttributeError):
            raise CamelidError(f"{self.url}/models: the answer is not an OpenAI model list") from None
        chosen = [m for m in models if isinstance(m, dict) and (self.model is None or m.get("id") == self.model)]
        length = chosen[0].get("max_model_len") if chosen else None
        return length if isinstance(length, int) and length > 1 else None

    # ---- requests ---------------------------------------------------------------------------------
    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /completions, retried while the failure may pass."""
        if self.model is not None:
            body = {**body, "model": self.model}
        for attempt in range(RETRIES + 1):
            self.limit.wait()
            try:
                r = self.http.post("/completions", json=body)
            except httpx.TransportError as e:
                problem = f"cannot reach it ({type(e).__name__}: {e})"
            else:
                if r.status_code == 200:
                    try:
                        return r.json()
                    except ValueError:
                        raise CamelidError(f"{self.url}: the answer to /completions is not JSON") from None
                problem = f"HTTP {r.status_code}: {_message(r)}"
                if r.status_code not in (408, 429) and r.status_code < 500:
                    raise CamelidError(f"{self.url}: /completions refused the request ({problem})")
            if attempt < RETRIES:
                time.sleep(BACKOFF_S * 2 ** attempt)
        raise CamelidError(f"{self.url}: /completions failed {RETRIES + 1} times; last: {problem}")

    def _map(self, fn, items: list) -> list:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    def _batches(self, items: list) -> list[list]:
        return [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]

    # ---- log-likelihood -------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[Loglikelihood]) -> list[tuple[float, bool]]:
        if self.text:
            return self._score_text([scored_split(r.context, r.continuation) for r in requests])
        encoded = [(encode_chat_pair if r.chat else encode_pair)(self.tok, r.context, r.continuation) for r in requests]
        return self.loglikelihood_tokens(encoded)

    def loglikelihood_tokens(self, encoded: Sequence[Encoded]) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether each of its tokens is the most
        likely one), from the prompt's log-probabilities the server echoes."""
        windows = [(list(e.context) + list(e.continuation), len(e.continuation)) for e in encoded]
        return self._score(windows)

    def _score(self, windows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """For each (tokens, n): the log-likelihood of the last n tokens given those before."""
        def one_batch(batch):
            choices = self._echoed([tokens[-self.longest:] for tokens, _ in batch])
            return [self._read(choice, tokens, n) for choice, (tokens, n) in zip(choices, batch)]

        return [r for batch in self._map(one_batch, self._batches(windows)) for r in batch]

    def _echoed(self, prompts: list) -> list[dict]:
        """The choices of one scoring request for `prompts` (token ids or texts), in their order."""
        body = {"prompt": prompts, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
        choices = sorted(self.post(body).get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts):
            raise CamelidError(f"{self.url}: /completions answered {len(choices)} choices for {len(prompts)} prompts")
        return choices

    def _read(self, choice: dict, tokens: list[int], n: int) -> tuple[float, bool]:
        logprobs = choice.get("logprobs") or {}
        values, tops = logprobs.get("token_logprobs"), logprobs.get("top_logprobs")
        sent = min(len(tokens), self.longest)
        if not isinstance(values, list) or len(values) < sent:
            raise CamelidError(f"{self.url}: /completions returned no log-probabilities for the prompt; the server "
                               "must support echo with logprobs (camelid serve, vLLM and llama.cpp's server do)")
        scored = values[sent - n:sent]
        if any(v is None for v in scored):
            raise CamelidError(f"{self.url}: /completions returned a null log-probability inside the prompt")
        greedy = isinstance(tops, list) and all(
            isinstance(top, dict) and top and value >= max(top.values()) - 1e-6
            for value, top in zip(scored, tops[sent - n:sent]))
        return float(sum(scored)), greedy

    def _score_text(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(context, continuation) texts, scored on the server's own tokens."""
        def one_batch(batch):
            out = []
            for choice, (context, continuation) in zip(self._echoed([c + x for c, x in batch]), batch):
                logprobs = choice.get("logprobs") or {}
                offsets = logprobs.get("text_offset")
                if not isinstance(offsets, list):
                    raise CamelidError(f"{self.url}: /completions returned no text_offset, which text prompts need "
                                       "to find the continuation's tokens; send token ids instead")
                span = [i for i, at in enumerate(offsets) if len(context) <= at < len(context) + len(continuation)]
                if not span:
                    raise CamelidError(f"{self.url}: no token of the continuation {continuation!r} in the answer")
                out.append(self._read(choice, list(range(span[-1] + 1)), len(span)))
            return out

        return [r for batch in self._map(one_batch, self._batches(pairs)) for r in batch]

    def loglikelihood_rolling(self, requests: Sequence[Rolling], stride: int | None = None) -> list[tuple[float, int]]:
        """As the in-process Scorer does: windows of max_length, `stride` new tokens each."""
        if self.text:
            raise CamelidError("perplexity over a server needs prompts as token ids, which this one was told it "
                               "does not take (--send-text)")
        stride = min(stride or self.longest, self.longest - 1)   # a window's first token is context only
        windows, owners, counts = [], [], []
        for i, r in enumerate(requests):
            tokens = [prefix_token(self.tok)] + self.tok.encode(r.text, special=False)
            counts.append(len(tokens) - 1)
            for end in range(1, len(tokens), stride):
                stop = min(end + stride, len(tokens))
                begin = max(0, stop - self.longest)
                windows.append((tokens[begin:stop], stop - end))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, self._score(windows)):
            totals[owner] += logp
        return list(zip(totals, counts))

    # ---- generation ---------------------------------------------------------------------------------
    def generate(self, requests: Sequence[Generate]) -> list[str]:
        def one(r: Generate) -> str:
            if self.text:
                return self._complete({"prompt": r.context}, r)
            ids = self.tok.encode_rendered(r.context) if r.chat else \
                self.tok.encode(r.context, bos=self.tok.add_bos, special=False)
            room = self.max_length - r.max_new_tokens
            return self._complete({"prompt": ids[-room:] if 0 < room < len(ids) else ids}, r)

        return self._map(one, list(requests))

    def _complete(self, body: dict[str, Any], r: Generate) -> str:
        body.update(max_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p)
        if r.stop:
            body["stop"] = list(r.stop)
        if r.seed is not None:
            body["seed"] = r.seed
        choices = self.post(body).get("choices") or []
        if not choices or not isinstance(choices[0].get("text"), str):
            raise CamelidError(f"{self.url}: /completions returned no text")
        return choices[0]["text"]


def _message(r: httpx.Response) -> str:
    try:
        error = r.json().get("error")
        return str(error.get("message") if isinstance(error, dict) else error or r.text[:200])
    except (ValueError, AttributeError):
        return r.text[:200] or r.reason_phrase
