"""The LLM object: a model and its tokenizer, with generate, stream and chat."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from camelid.checkpoint.hub import cache_dir as camelid_cache
from camelid.errors import CamelidError
from camelid.generate.compiled import CompiledDecoder, ahead_of_time
from camelid.generate.core import Engine
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


CHAT = SamplingParams(temperature=0.0, max_new_tokens=512)  # a chat reply: greedy, up to 512 tokens


def compile_supported(device: torch.device) -> bool:
    """Whether compiled decoding works here without holding anything up: on a CUDA device, or
    on a CPU with a C++ compiler for inductor and a torch that compiles ahead of time (so that
    compilation runs in the background)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu" or not ahead_of_time():
        return False
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:  # no compiler on the path (inductor names what it looked for)
        return False
    return True


class LLM:
    """A model and its tokenizer: generate, stream and chat. Each method takes a SamplingParams
    (`params`) and/or its fields as keywords (`max_new_tokens=32, temperature=0`).

    With `compile` (the default where it works, see `compile_supported`), decoding takes the
    compiled step: built in the background during the first long generation of a shape, then
    loaded from disk (`compile_cache`, by default ~/.cache/camelid/compiled) in later runs."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, source: str = "", compile: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.engine = Engine(model)
        self.stats = Stats()  # of the last call
        self.draft: LLM | None = None
        self.num_draft = 4
        self.generator: TokenGenerator | SpeculativeGenerator | None = None
        if compile and compile_supported(self.device):
            self.compile()

    def use_draft(self, draft: "LLM | None", num_draft: int = 4) -> "LLM":
        """Speculative decoding from now on (single prompts): `draft`, a smaller model with the
        same tokenizer, proposes `num_draft` tokens per round and this model checks them in one
        forward. Output is unchanged: greedy gives the same tokens, sampling the same
        distribution. `generator.rounds.acceptance` after a call says how often the draft was right."""
        if draft is not None and (draft.tokenizer.vocab_size, draft.config.vocab_size) != (
                self.tokenizer.vocab_size, self.config.vocab_size):
            raise CamelidError(f"draft model {draft.source}: its vocabulary ({draft.tokenizer.vocab_size} tokens, "
                               f"{draft.config.vocab_size} logits) differs from this model's "
                               f"({self.tokenizer.vocab_size}, {self.config.vocab_size}); use a draft with the same "
                               "tokenizer")
        self.draft, self.num_draft = draft, num_draft
        return self

    def compile(self, mode: str | None = None, background: bool = True,
                cache_dir: Path | str | None = "default") -> "LLM":
        """Decode with compiled steps from now on (`CompiledDecoder`): with `background`, a
        shape compiles in another process while decoding goes on eagerly; without, the first
        step of a shape waits for it. `cache_dir` keeps compiled steps for later processes
        ("default": ~/.cache/camelid/compiled; None: not kept, and nothing in the background)."""
        if cache_dir == "default":
            cache_dir = camelid_cache() / "compiled"
        self.engine.compile(mode=mode, background=background, cache_dir=Path(cache_dir) if cache_dir else None)
        return self

    @property
    def decoder(self) -> CompiledDecoder | None:
        return self.engine.compiled

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos)

    # ---- the engine behind every call ----------------------------------------------------------
    def _run(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[tuple[int, str, int | str]]:
        """Yield (row, new text, token id) as tokens arrive, then (row, last text, finish reason)
        once per row, the reason being "stop" (stop token or string) or "length"."""
        stop_ids = self.tokenizer.stop_ids
        if self.draft is not None and len(prompts) == 1:
            gen = SpeculativeGenerator(self.engine, self.draft.engine, prompts, params.max_new_tokens, params,
                                       stop_ids, params.seed, num_draft=self.num_draft)
        else:
            gen = TokenGenerator(self.engine, prompts, params.max_new_tokens, params, stop_ids, params.seed,
                                 pad_id=self.tokenizer.pad_id or 0)
        self.generator = gen
        self.stats = gen.stats
        streams = [TextStream(self.tokenizer, p, params.stop) for p in prompts]
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

    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        return self.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)

    # ---- public API ------------------------------------------------------------------------------
    def generate_batch(self, prompts: Sequence[str] | Sequence[Sequence[int]], params: SamplingParams | None = None,
                       **settings) -> list[GenerationResult]:
        """Generate for several prompts (text or token ids) in one batch."""
        ids = [self._ids(p) for p in prompts]
        results = [GenerationResult("", [], "length") for _ in ids]
        for row, text, event in self._run(ids, _params(params, settings)):
            results[row].text += text
            if isinstance(event, int):
                results[row].tokens.append(event)
            else:
                results[row].finish_reason = event
        return results

    def generate(self, prompt: str | Sequence[str], params: SamplingParams | None = None,
                 **settings) -> str | list[str]:
        """The continuation of `prompt` (a list of prompts gives a list, generated as one batch)."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not all(isinstance(p, str) for p in prompts):
            raise CamelidError("generate: prompt must be a string or a list of strings")
        texts = [r.text for r in self.generate_batch(prompts, params, **settings)]
        return texts[0] if single else texts

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None, **settings) -> Iterator[str]:
        """Pieces of the continuation as they are generated; never a split character."""
        for _, text, _ in self._run([self._ids(prompt)], _params(params, settings)):
            if text:
                yield text

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None, **settings) -> str:
        """The assistant's reply to a conversation, formatted with the model's chat template
        (greedy and up to 512 tokens unless told otherwise)."""
        return "".join(self.chat_stream(messages, params, **settings)).strip()

    def chat_stream(self, messages: list[dict[str, str]], params: SamplingParams | None = None,
                    **settings) -> Iterator[str]:
        yield from self.stream(self.tokenizer.encode_chat(messages), _params(params, settings, CHAT))


def _params(params: SamplingParams | None, settings: dict, default: SamplingParams = SamplingParams()) -> SamplingParams:
    if params is not None and not isinstance(params, SamplingParams):
        raise CamelidError(f"params must be a SamplingParams (got {type(params).__name__}); pass other settings "
                           "by name, e.g. max_new_tokens=32")
    return (params or default).updated(**settings)
