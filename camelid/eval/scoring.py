"""Running requests through a model efficiently.

Log-likelihoods: requests are grouped by their context, which is computed once (one prefill into
a KV cache); all continuations of the group are then scored together, attending to copies of
that cache. Several groups go through together: their contexts in one prefill, all their
continuations in one batch, each row at its own positions (the generation core,
`camelid.generate.core`). The output head runs only at the positions that are
scored, never over the whole context. Groups run longest first, as lm-evaluation-harness orders them, so
that memory problems show up at once and the progress bar's estimate errs on the safe side.

A quantized model's layers keep their dequantized weights while a scoring call runs (up to
`keep_budget` bytes, `camelid.quant.layers.keep_dequantized`), instead of dequantizing them
again for every batch; the log-likelihoods are the same either way.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from camelid.eval.requests import Encoded, Generate, Loglikelihood, Rolling, encode_chat_pair, encode_pair, prefix_token
from camelid.generate import LLM, SamplingParams
from camelid.quant.layers import KEEP_BUDGET, keep_dequantized


class Scorer:
    def __init__(self, llm: LLM, max_length: int | None = None, batch_size: int = 16, progress: bool = False,
                 keep_budget: int = KEEP_BUDGET):
        self.llm = llm
        self.keep_budget = keep_budget
        self.engine = llm.engine
        self.tok = llm.tokenizer
        self.max_length = min(max_length or llm.config.max_seq_len, llm.config.max_seq_len)
        self.batch_size = batch_size
        self.progress = progress
        self.device = llm.device

    # ---- log-likelihood --------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[Loglikelihood]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation's tokens, whether it is the greedy one)."""
        encoded = [(encode_chat_pair if r.chat else encode_pair)(self.tok, r.context, r.continuation) for r in requests]
        return self.loglikelihood_tokens(encoded)

    def loglikelihood_tokens(self, encoded: Sequence[Encoded]) -> list[tuple[float, bool]]:
        groups: OrderedDict[tuple[int, ...], list[int]] = OrderedDict()
        for i, e in enumerate(encoded):
            groups.setdefault(e.key, []).append(i)
        order = sorted(groups.values(), key=lambda idx: -(len(encoded[idx[0]].context) +
                                                           max(len(encoded[i].continuation) for i in idx)))
        results: list[tuple[float, bool] | None] = [None] * len(encoded)
        bar = tqdm(total=len(encoded), desc="log-likelihoods", unit="req", disable=not self.progress, leave=False)
        with torch.inference_mode(), keep_dequantized(self.llm.model, self.keep_budget):
            # batches of up to batch_size contexts and 4 x batch_size continuations
            batch: list[list[int]] = []
            for idx in order + [[]]:
                rows = sum(len(b) for b in batch)
                if batch and (not idx or len(batch) == self.batch_size or rows + len(idx) > 4 * self.batch_size):
                    scored = self._score_groups([(encoded[b[0]].context, [encoded[i].continuation for i in b])
                                                 for b in batch])
                    for b, group_scores in zip(batch, scored):
                        for i, r in zip(b, group_scores):
                            results[i] = r
                    bar.update(rows)
                    batch = []
                if idx:
                    batch.append(idx)
        bar.close()
        return results  # type: ignore[return-value]

    def _score_groups(self, groups: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
        """Score several contexts, each with its continuations, in two batched passes: the
        contexts in one prefill, then every continuation of every context in one
        batch that attends to its own context's rows of the cache."""
        out: list[list[tuple[float, bool]] | None] = [None] * len(groups)
        batched = []
        for g, (context, conts) in enumerate(groups):
            keep = self.max_length - max(len(c) for c in conts)  # truncate contexts on the left, as lm-eval
            if keep < 1:
                out[g] = [self._score_long(context, c) for c in conts]
            else:
                batched.append((g, context[-keep:], conts))
        if not batched:
            return out  # type: ignore[return-value]
        dev, engine = self.device, self.engine
        contexts = [ctx for _, ctx, _ in batched]
        lengths = torch.tensor([len(ctx) for ctx in contexts], device=dev)
        L = max(len(ctx) for ctx in contexts)
        base = engine.allocate(len(contexts), L)
        first = F.log_softmax(engine.prefill(contexts, base).float(), dim=-1)            # [B, V]: token 0

        owner = [b for b, (_, _, conts) in enumerate(batched) for _ in conts]
        conts = [c for _, _, cs in batched for c in cs]
        scores = [(float(first[b, c[0]]), bool(first[b].argmax() == c[0])) for b, c in zip(owner, conts)]
        longest = max(len(c) for c in conts)
        if longest > 1:
            R, T = len(conts), longest - 1
            rows = torch.tensor(owner, device=dev)
            cache = engine.allocate(R, L + T)
            for mine, shared in zip(cache.layers, base.layers):
                mine.k[:, :, :L] = shared.k[rows]
                mine.v[:, :, :L] = shared.v[rows]
            inputs = torch.zeros(R, T, dtype=torch.long, device=dev)
            for r, c in enumerate(conts):
                inputs[r, : len(c) - 1] = torch.tensor(c[:-1])
            positions = lengths[rows][:, None] + torch.arange(T, device=dev)[None, :]   # [R, T]: after the context
            # A row's padding past its own continuation can run beyond the model's window when its
            # context nearly fills it and another row's continuation is longer; nothing reads those
            # slots (the row's real tokens sit below max_seq_len - 1), so they may share the last one.
            positions.clamp_(max=self.llm.config.max_seq_len - 1)
            h = engine.extend(inputs, positions, cache)
            wanted = [(r, t) for r, c in enumerate(conts) for t in range(len(c) - 1)]
            if wanted:
                r_idx = torch.tensor([w[0] for w in wanted], device=dev)
                t_idx = torch.tensor([w[1] for w in wanted], device=dev)
                logp = F.log_softmax(engine.head(h[r_idx, t_idx]).float(), dim=-1)     # only the scored positions
                targets = torch.tensor([conts[r][t + 1] for r, t in wanted], device=dev)
                picked = logp.gather(1, targets[:, None])[:, 0].tolist()
                hits = (logp.argmax(-1) == targets).tolist()
                for (r, _), value, hit in zip(wanted, picked, hits):
                    scores[r] = (scores[r][0] + value, scores[r][1] and hit)
        k = 0
        for g, _, cs in batched:
            out[g] = scores[k:k + len(cs)]
            k += len(cs)
        return out  # type: ignore[return-value]

    def _score_long(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """A continuation longer than the window: score it as a rolling document after its context."""
        tokens = (context + continuation)[-(self.max_length + 1):]
        n = min(len(continuation), len(tokens) - 1)
        logp, greedy = self._window(tokens[:-1], tokens[1:], n)
        return logp, greedy

    def _window(self, inputs: list[int], targets: list[int], scored: int) -> tuple[float, bool]:
        """Log-probability of the last `scored` targets given the inputs (one causal forward)."""
        h = self.engine.extend(torch.tensor([inputs], device=self.device), None, None)[0, -scored:]
        logp = F.log_softmax(self.engine.head(h).float(), dim=-1)
        t = torch.tensor(targets[-scored:], device=self.device)
        return float(logp.gather(1, t[:, None]).sum()), bool((logp.argmax(-1) == t).all())

    # ---- perplexity -------------------------------------------------------------------------------
    def loglikelihood_rolling(self, requests: Sequence[Rolling], stride: int | None = None) -> list[tuple[float, int]]:
        """(log-likelihood of the whole text, its token count), over windows of max_length with
        `stride` new tokens each (every token is predicted from up to max_length - stride
        tokens of context beyond its window's own)."""
        stride = stride or self.max_length
        out = []
        with torch.inference_mode(), keep_dequantized(self.llm.model, self.keep_budget):
            for r in tqdm(requests, desc="perplexity", unit="doc", disable=not self.progress, leave=False):
                tokens = [prefix_token(self.tok)] + self.tok.encode(r.text, special=False)
                total, n = 0.0, len(tokens) - 1
                for end in range(1, len(tokens), stride):
                    stop = min(end + stride, len(tokens))
                    begin = max(0, stop - 1 - self.max_length)
                    logp, _ = self._window(tokens[begin:stop - 1], tokens[begin + 1:stop], stop - end)
                    total += logp
                out.append((total, n))
        return out

    # ---- generation --------------------------------------------------------------------------------
    def generate(self, requests: Sequence[Generate]) -> list[str]:
        """Continuations, batched by similar settings and length (longest first)."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].context))
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generating", unit="req", disable=not self.progress, leave=False)
        pending = list(order)
        while pending:
            first = requests[pending[0]]
            same = [i for i in pending if _settings(requests[i]) == _settings(first)][: self.batch_size]
            pending = [i for i in pending if i not in same]
            prompts = [self._prompt(requests[i]) for i in same]
            results = self.llm.generate_batch(prompts, SamplingParams(
                temperature=first.temperature, top_p=first.top_p, max_new_tokens=first.max_new_tokens,
                seed=first.seed, stop=tuple(first.stop)))
            for i, r in zip(same, results):
                out[i] = r.text
            bar.update(len(same))
        bar.close()
        return out  # type: ignore[return-value]

    def _prompt(self, r: Generate) -> list[int]:
        ids = self.tok.encode_rendered(r.context) if r.chat else self.tok.encode(r.context, bos=self.tok.add_bos,
                                                                                  special=False)
        room = self.max_length - r.max_new_tokens
        return ids[-room:] if room > 0 and len(ids) > room else ids


def _settings(r: Generate) -> tuple:
    return (r.stop, r.max_new_tokens, r.temperature, r.top_p, r.seed)


def perplexity(total_logprob: float, tokens: int) -> float:
    return math.exp(-total_logprob / max(tokens, 1))
