"""The LLM object: a model and its tokenizer, with generate, stream and chat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from camelid.errors import CamelidError
from camelid.generate.compiled import CompiledDecoder
from camelid.generate.engine import Stats, TokenGenerator
from camelid.generate.sampling import SamplingParams
from camelid.generate.speculative import SpeculativeGenerator
from camelid.model import Transformer
from camelid.tokenizer import StreamDecoder, Tokenizer


class TextStream:
    """One row's text: streamed detokenization plus stop strings. Text that might be the start
    of a stop string is held back until it is clearly not."""

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int], stop: Sequence[str]):
        self.decoder = StreamDecoder(tokenizer, context)
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.stopped = False  # a stop string was found

    def push(self, token_id: int) -> str:
        self.pending += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.pending += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        keep = 0 if final else max((k for s in self.stop for k in range(1, len(s))
                                    if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (stop token or string) or "length"


class LLM:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, source: str = "", compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.stats = Stats()  # of the last call
        self.decoder: CompiledDecoder | None = None
        self.draft: LLM | None = None
        self.num_draft = 4
        if compile:
            self.compile()

    def use_draft(self, draft: "LLM | None", num_draft: int = 4) -> "LLM":
        """Speculative decoding from now on (single prompts): `draft`, a smaller model with the
        same tokenizer, proposes `num_draft` tokens per round and this model checks them in one
        forward. Output is unchanged: greedy gives the same tokens, sampling the same
        distribution. `generator.rounds.acceptance` after a call says how often the draft was right."""
        if draft is not None and draft.tokenizer.vocab_size != self.tokenizer.vocab_size:
            raise CamelidError(f"draft model {draft.source}: its vocabulary ({draft.tokenizer.vocab_size}) differs "
                               f"from this model's ({self.tokenizer.vocab_size}); use a draft with the same tokenizer")
        self.draft, self.num_draft = draft, num_draft
        return self

    def compile(self, mode: str | None = None) -> "LLM":
        """Decode with a torch.compile'd step from now on. The first generation compiles (tens of
        seconds on CPU, cached on disk by inductor for later runs); each step is then much faster."""
        self.decoder = CompiledDecoder(self.model, mode=mode)
        return self

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos)

    # ---- the engine behind every call ----------------------------------------------------------
    def _run(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
             top_k: int | None, seed: int | None, stop: Sequence[str] | str | None,
             ) -> Iterator[tuple[int, str, int | str]]:
        """Yield (row, new text, token id) as tokens arrive, then (row, last text, finish reason)
        once per row, the reason being "stop" (stop token or string) or "length"."""
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        stop_ids = self.tokenizer.stop_ids
        sampling = SamplingParams(temperature, top_p, top_k)
        if self.draft is not None and len(prompts) == 1:
            gen = SpeculativeGenerator(self.model, self.draft.model, prompts, max_new_tokens, sampling, stop_ids, seed,
                                       num_draft=self.num_draft)
        else:
            gen = TokenGenerator(self.model, prompts, max_new_tokens, sampling, stop_ids, seed,
                                 pad_id=self.tokenizer.pad_id or 0, decoder=self.decoder)
        self.generator = gen
        self.stats = gen.stats
        streams = [TextStream(self.tokenizer, p, stops) for p in prompts]
        hit_stop_id = [False] * len(prompts)
        for step in gen:
            for row, tok in enumerate(step):
                if tok is None:
                    continue
                if tok in stop_ids:
                    hit_stop_id[row] = True
                    continue
                text = streams[row].push(tok)
                if streams[row].stopped:
                    gen.finish(row)
                yield row, text, tok
        for row, s in enumerate(streams):
            yield row, s.finish(), "stop" if hit_stop_id[row] or s.stopped else "length"

    def generate_batch(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 256,
                       temperature: float = 0.6, top_p: float = 0.9, top_k: int | None = None,
                       seed: int | None = None, stop: Sequence[str] | str | None = None) -> list[GenerationResult]:
        """Generate for several prompts (text or token ids) in one left-padded batch."""
        ids = [self.encode_prompt(p) if isinstance(p, str) else list(p) for p in prompts]
        results = [GenerationResult("", [], "length") for _ in ids]
        for row, text, event in self._run(ids, max_new_tokens, temperature, top_p, top_k, seed, stop):
            results[row].text += text
            if isinstance(event, int):
                results[row].tokens.append(event)
            else:
                results[row].finish_reason = event
        return results

    # ---- public API ------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 256, temperature: float = 0.6,
                 top_p: float = 0.9, top_k: int | None = None, seed: int | None = None,
                 stop: Sequence[str] | str | None = None) -> str | list[str]:
        """The continuation of `prompt` (a list of prompts gives a list, generated as one batch)."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not all(isinstance(p, str) for p in prompts):
            raise CamelidError("generate: prompt must be a string or a list of strings")
        results = self.generate_batch(prompts, max_new_tokens, temperature, top_p, top_k, seed, stop)
        texts = [r.text for r in results]
        return texts[0] if single else texts

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 256, temperature: float = 0.6,
               top_p: float = 0.9, top_k: int | None = None, seed: int | None = None,
               stop: Sequence[str] | str | None = None) -> Iterator[str]:
        """Pieces of the continuation as they are generated; never a split character."""
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        for _, text, _ in self._run([ids], max_new_tokens, temperature, top_p, top_k, seed, stop):
            if text:
                yield text

    def chat(self, messages: list[dict[str, str]], max_new_tokens: int = 512, temperature: float = 0.0,
             top_p: float = 0.9, top_k: int | None = None, seed: int | None = None,
             stop: Sequence[str] | str | None = None) -> str:
        """The assistant's reply to a conversation, formatted with the model's chat template."""
        return "".join(self.chat_stream(messages, max_new_tokens, temperature, top_p, top_k, seed, stop)).strip()

    def chat_stream(self, messages: list[dict[str, str]], max_new_tokens: int = 512, temperature: float = 0.0,
                    top_p: float = 0.9, top_k: int | None = None, seed: int | None = None,
                    stop: Sequence[str] | str | None = None) -> Iterator[str]:
        ids = self.tokenizer.encode_chat(messages)
        yield from self.stream(ids, max_new_tokens, temperature, top_p, top_k, seed, stop)
