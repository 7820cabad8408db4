"""The server's batcher over the paged KV cache: outputs equal one-prompt-at-a-time generation
with many requests sharing prefixes, cancelled mid-way or pre-empted by a small pool; a shared
prefix is computed once; and every block comes back."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from camelid.generate import LLM, SamplingParams
from camelid.model import Transformer
from camelid.serve import Batcher, Job
from test_serve import Collector, run_to_completion

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def long_llm(bpe_tokenizer):
    """The tiny model with a context of 2,048 tokens."""
    from camelid.config import get_size

    with torch.device("meta"):
        model = Transformer(dataclasses.replace(get_size("tiny"), max_seq_len=2048))
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    return LLM(model.eval(), bpe_tokenizer, compile=False)


def ids(seed: int, n: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(llm: LLM, prompt: list[int], n: int) -> tuple[str, str, int]:
    out = llm.generate_batch([prompt], max_new_tokens=n, temperature=0)[0]
    return out.text, out.finish_reason, len(out.tokens)


def outcome(c: Collector) -> tuple[str, str, int]:
    return c.text, c.done.finish_reason, c.done.completion_tokens


def test_32_requests_sharing_prefixes_decode_as_each_alone_and_give_every_block_back(long_llm):
    """32 requests at once for 8 rows: short and long prompts, most starting with one of two
    shared prefixes; four are cancelled mid-way. The rest answer exactly as alone, and the pool
    ends as it began (every block lendable, none held)."""
    system = [ids(1, 40), ids(2, 100)]
    prompts = [(system[i % 2] if i % 4 else []) + ids(100 + i, 3 + 7 * (i % 5)) for i in range(32)]
    budgets = [4 + (i * 5) % 23 for i in range(32)]
    batcher = Batcher(long_llm.engine, long_llm.tokenizer, max_batch=8, context=256, max_queue=32)
    collectors = [Collector() for _ in prompts]
    jobs = [Job(p, GREEDY.updated(max_new_tokens=n), c) for p, n, c in zip(prompts, budgets, collectors)]
    for job in jobs:
        batcher.submit(job)
    cancelled = {3, 9, 14, 27}
    for step in range(400):
        if step == 3:
            for i in cancelled:
                jobs[i].cancel()
        if all(c.done for i, c in enumerate(collectors) if i not in cancelled) and not batcher.active:
            break
        batcher.step()
    batcher.step()                         # drops any cancelled job still in a row
    for i, (p, n, c) in enumerate(zip(prompts, budgets, collectors)):
        if i not in cancelled:
            assert outcome(c) == alone(long_llm, p, n), i
    assert batcher.active == 0 and batcher.pool.used == 0
    assert batcher.pool.available == batcher.pool.capacity and not any(batcher.pool.refs)
    assert batcher.pool.hits > 0           # the shared prefixes were found


def test_a_shared_1000_token_prefix_is_computed_once(long_llm):
    """The second request shares 1,000 tokens with the first: it computes only the tokens after
    the blocks it finds (counted), and answers as it would alone; the next turn of the first
    request's chat finds its answer's blocks too."""
    shared = ids(7, 1000)
    first, second = shared + ids(8, 5), shared + ids(9, 20)
    batcher = Batcher(long_llm.engine, long_llm.tokenizer, max_batch=2, context=2048, block_size=16)
    a, b = Collector(), Collector()
    batcher.submit(Job(first, GREEDY.updated(max_new_tokens=6), a))
    run_to_completion(batcher, [a])
    assert batcher.computed_tokens == len(first)
    batcher.submit(Job(second, GREEDY.updated(max_new_tokens=6), b))
    run_to_completion(batcher, [b])
    assert batcher.computed_tokens - len(first) == len(second) - 1000 // 16 * 16 == 28
    assert outcome(b) == alone(long_llm, second, 6)

    answer = long_llm.generate_batch([first], max_new_tokens=6, temperature=0)[0].tokens   # the ids it answered
    follow_up = first + answer + ids(10, 12)
    before, c = batcher.computed_tokens, Collector()
    batcher.submit(Job(follow_up, GREEDY.updated(max_new_tokens=4), c))
    run_to_completion(batcher, [c])
    assert batcher.computed_tokens - before <= 12 + 16    # the new turn, and at most a block before it
    assert outcome(c) == alone(long_llm, follow_up, 4)


def test_a_small_pool_preempts_and_resumes_without_changing_outputs(long_llm):
    """Four long answers in a pool that holds fewer than two: requests are pre-empted, resumed
    (recomputed) and finish exactly as alone, a seeded sampled one included; nothing fails."""
    prompts = [ids(20 + i, 6 + 3 * i) for i in range(4)]
    sampled = SamplingParams(temperature=1.0, seed=5, max_new_tokens=40)
    settings = [GREEDY.updated(max_new_tokens=40)] * 3 + [sampled]
    small = Batcher(long_llm.engine, long_llm.tokenizer, max_batch=4, context=64, block_size=8, num_blocks=12)
    collectors = [Collector() for _ in prompts]
    for p, s, c in zip(prompts, settings, collectors):
        small.submit(Job(p, s, c))
    run_to_completion(small, collectors, steps=2000)
    assert small.preempted > 0 and all(c.done.error is None for c in collectors)
    for p, c in zip(prompts[:3], collectors[:3]):
        assert outcome(c) == alone(long_llm, p, 40)
    roomy, reference = Batcher(long_llm.engine, long_llm.tokenizer, max_batch=1, context=64), Collector()
    roomy.submit(Job(prompts[3], sampled, reference))
    run_to_completion(roomy, [reference])
    assert outcome(collectors[3]) == outcome(reference)
    assert small.pool.used == 0 and not any(small.pool.refs)


def test_a_pool_too_small_for_one_whole_context_is_refused(long_llm):
    with pytest.raises(ValueError, match="cannot hold one request of the whole context"):
        Batcher(long_llm.engine, long_llm.tokenizer, context=64, block_size=8, num_blocks=8)


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_keep_decoding(long_llm):
    """A 600-token prompt with chunks of 64 takes ten steps to prefill; a stream already
    decoding gets a token at each of them, and both answer exactly as alone."""
    short, long = ids(30, 5), ids(31, 600)
    batcher = Batcher(long_llm.engine, long_llm.tokenizer, max_batch=2, context=1024, prefill_chunk=64)
    a, b = Collector(), Collector()
    short_job = Job(short, GREEDY.updated(max_new_tokens=30), a)
    long_job = Job(long, GREEDY.updated(max_new_tokens=4), b)
    batcher.submit(short_job)
    batcher.step()
    batcher.submit(long_job)

    def row(job):
        return next(r for r in batcher.rows if r is not None and r.job is job)

    before, steps = row(short_job).produced, 0
    while steps == 0 or row(long_job).computed < len(long):
        batcher.step()
        steps += 1
        assert min(row(long_job).computed, len(long)) == min(len(long), 64 * steps)   # then its own decode
    assert steps == -(-600 // 64) and row(short_job).produced - before == steps   # a token each step
    run_to_completion(batcher, [a, b])
    assert batcher.computed_tokens == len(short) + len(long)
    assert outcome(a) == alone(long_llm, short, 30) and outcome(b) == alone(long_llm, long, 4)
