"""Continuous batching: one worker thread owns the model and decodes every active request in one
step, admitting and evicting requests between steps, through the generation core
(`camelid.generate.core`): the same prefill and the same (compiled) decode step as `LLM.generate`.

The KV cache is paged (`camelid.model.PagedKVCache`): one pool of blocks of `block_size` slots,
lent to requests by a `camelid.generate.paging.BlockPool`, so memory follows what each request
holds rather than rows x context. A request is admitted when the blocks for its prompt are
available; it takes one more block each time it fills its last, and when none is left the
newest request gives its blocks back and waits at the head of the line, to be recomputed and
resumed later (its output unchanged: its sampler's state is kept), so the pool running out
never fails anyone. Requests that start with the same tokens share the blocks that hold them
(the prefix cache): a long system prompt, a chat's earlier turns or few-shot examples are
computed once, and a request computes only the tokens after the blocks it finds. A finished
request leaves its prompt's and answer's blocks in the cache, so the next turn of a chat finds
them.

A prompt is prefilled in chunks of at most `prefill_chunk` tokens a step, each step's decode of
the other requests between two chunks, so a long prompt slows the streams around it rather than
stopping them. A decode step feeds every row its last token at the row's own position. Rows are not
compacted: a step runs rows 0..(highest active row), rounded up to a power of two so that the
compiled step sees few shapes; an idle row among them computes a throw-away token into the
scratch block, and admission fills the lowest free row so that active rows gather at the top.
Likewise a step reads only the blocks in use, rounded up to a bucket (`compiled.bucket`), not
the whole context.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from camelid.generate import Engine, SamplingParams, TextStream, sample
from camelid.generate.compiled import bucket
from camelid.generate.constrained import Constraint
from camelid.generate.paging import BlockPool
from camelid.generate.sampling import TokenLogprob, shape_logits, token_logprobs
from camelid.lora.multi import adapter_selection
from camelid.model import PagedKVCache
from camelid.tokenizer import Tokenizer

log = logging.getLogger("camelid.serve")


class QueueFull(Exception):
    """Every row is taken and the waiting line is at its limit (HTTP 503)."""


@dataclass
class Event:
    """What the worker tells a request: new text, or the end (finish_reason set), or a failure."""

    text: str = ""
    finish_reason: str | None = None  # "stop" or "length", on the last event only
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    status: int = 500  # the HTTP status that fits the error: 503 when shutting down
    logprobs: list[TokenLogprob] = field(default_factory=list)   # of the tokens this event's text came with
    prompt_logprobs: list[TokenLogprob | None] | None = None     # once, before the first token (echo)


@dataclass
class Job:
    """One request. `deliver` is called on the worker thread with each Event; `cancel` may be
    called from any thread (a client went away) and the worker drops the job at its next step."""

    prompt: list[int]
    sampling: SamplingParams  # with the request's max_new_tokens, stop strings and seed
    deliver: Callable[[Event], None]
    logprobs: int | None = None          # report each new token's log-probability and this many alternatives
    prompt_logprobs: int | None = None   # report the prompt's too (computed in full: no prefix reuse)
    constraint: Constraint | None = None  # the grammar its output must follow
    adapter: int = -1   # the LoRA adapter it runs with (camelid.lora.attach_adapters' index); -1: the base
    cancelled: bool = False
    suspended: "Row | None" = None   # pre-empted: its decoding state, to resume from
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Row:
    """A job in the cache: the worker's per-request decoding state."""

    job: Job
    text: TextStream
    generator: torch.Generator | None
    limit: int          # most new tokens, within the row's share of the context
    position: int       # slot (and RoPE position) of the next token fed to the model
    last: int = 0       # that token
    produced: int = 0   # new tokens so far, stop tokens not counted
    fed: list[int] = field(default_factory=list)     # the tokens in the cache (or going there), in slot order
    computed: int = 0   # how many of them the cache holds: fewer while the prompt is prefilled in chunks
    looked_up: bool = False   # the prefix cache was searched again as its prefill began (`_share_more`)
    blocks: list[int] = field(default_factory=list)  # the pool's blocks that hold them, in slot order
    admitted: int = 0   # admission order: the newest row is pre-empted first
    token_at: float = 0.0   # when its last token came (perf_counter)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)   # as its prefill goes

    def generated(self) -> list[int]:
        """The tokens produced so far (what presence and frequency penalties count)."""
        return self.fed[len(self.job.prompt):] + ([self.last] if self.produced else [])


class Timings(Protocol):
    """Where the batcher reports its latencies (the server's /metrics)."""

    def first_token(self, seconds: float) -> None: ...    # from submission to a request's first token

    def next_token(self, seconds: float) -> None: ...     # between two tokens of a request


class Batcher:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, max_batch: int = 8, context: int = 2048,
                 max_queue: int = 64, block_size: int = 16, num_blocks: int | None = None,
                 prefill_chunk: int = 512):
        """`num_blocks` (the scratch block included) defaults to what max_batch requests of a
        full context each would hold; fewer make a smaller pool that pre-empts requests when
        they all grow long, but never fewer than one full-context request needs. A step
        prefills at most `prefill_chunk` prompt tokens, so that a long prompt is prefilled over
        several steps, each followed by the other requests' decode step, instead of stalling
        them all."""
        if min(max_batch, max_queue, block_size, prefill_chunk) < 1 or context < 2:
            raise ValueError("max_batch, max_queue, block_size and prefill_chunk must be >= 1 and context >= 2")
        per_row = -(-context // block_size)
        num_blocks = num_blocks or max_batch * per_row + 1
        if num_blocks < per_row + 1:
            raise ValueError(f"a pool of {num_blocks} blocks of {block_size} cannot hold one request of the whole "
                             f"context ({context} tokens: {per_row} blocks and the scratch block)")
        self.engine, self.tokenizer = engine, tokenizer
        self.context, self.prefill_chunk = context, prefill_chunk
        self.stop_ids = tokenizer.stop_ids
        self.adapters = adapter_selection(engine.model)   # LoRA adapters served beside the base, if any
        self.device = engine.device
        self.pool = BlockPool(num_blocks, block_size)
        with torch.inference_mode():
            self.cache = PagedKVCache(engine.config, num_blocks, block_size, max_batch, per_row, engine.dtype,
                                      engine.device)
        self.views: dict[tuple[int, int], PagedKVCache] = {}  # of the cache, by (rows, slots), for decode steps
        self.prompt_tokens = 0     # of the requests admitted
        self.computed_tokens = 0   # prompt tokens run through the model (those found in the prefix cache are not)
        self.generated_tokens = 0
        self.timings: Timings | None = None
        self.preempted = 0         # requests that gave their blocks back to let others go on
        self._admissions = 0
        self.rows: list[Row | None] = [None] * max_batch
        self.max_queue = max_queue
        self.waiting: deque[Job] = deque()
        # Every job accepted and not yet ended: waiting, being prefilled or in a row. Admission
        # counts these, not the waiting line alone: the worker moves jobs into free rows one
        # prefill at a time, so a burst would otherwise find the line full while rows are free.
        self._held: list[Job] = []
        self._waiting_changed = threading.Condition()  # guards waiting and _held
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- called from the server's threads --------------------------------------------------------
    def submit(self, job: Job) -> None:
        if not 0 < len(job.prompt) < self.context:
            raise ValueError(f"a prompt needs 1 to {self.context - 1} tokens (got {len(job.prompt)})")
        with self._waiting_changed:  # decided under the lock that the worker takes jobs with
            if self._stopping.is_set():
                raise QueueFull("the server is shutting down")
            # a client that gave up holds neither a row nor a place in the line
            self._held = [j for j in self._held if not j.cancelled]
            self.waiting = deque(j for j in self.waiting if not j.cancelled)
            if len(self._held) >= len(self.rows) + self.max_queue:
                waiting = len(self.waiting)
                running = len(self._held) - waiting  # in a row, or being prefilled into one
                raise QueueFull(f"the server is busy: {_count(running, 'request')} running and {waiting} waiting, "
                                f"all it holds (at most {len(self.rows)} running and {self.max_queue} waiting); "
                                "retry later")
            self._held.append(job)
            self.waiting.append(job)
            self._waiting_changed.notify()

    def start(self) -> None:
        """Run the worker in a thread of its own (in-process servers, tests); `run` is faster."""
        self._thread = threading.Thread(target=self.run, name="camelid-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def admitted(self) -> int:
        """Requests accepted and not yet answered: running, or waiting for a row."""
        with self._waiting_changed:
            return sum(not j.cancelled for j in self._held)

    # ---- the worker ----------------------------------------------------------------------------
    def run(self) -> None:
        """The worker's loop, on the calling thread, until `stop`. `camelid serve` runs it on the
        thread that loaded the model: on Linux torch's OpenMP (libgomp) gives every thread that
        starts parallel work a pool of threads of its own, and once the pools together hold more
        threads than there are cores it stops spin-waiting between parallel regions, of which a
        decode step has hundreds, so steps run on a second thread were much slower."""
        with torch.inference_mode():
            while not self._stopping.is_set():
                try:
                    self.step(wait=0.1)
                except Exception as e:  # a bug or out of memory: fail these requests, keep serving
                    log.exception("batch step failed")
                    self._fail_all(f"internal error: {type(e).__name__}: {e}", 500, waiting=False)
        self._fail_all("the server is shutting down", 503, waiting=True)

    @torch.inference_mode()
    def step(self, wait: float = 0.0) -> None:
        """One round: drop cancelled rows, admit waiting jobs into free rows (blocking up to
        `wait` seconds when nothing is running), then one decode step for all active rows."""
        for i, row in enumerate(self.rows):
            if row is not None and row.job.cancelled:
                self._vacate(i)
                self._release(row.job)
        while None in self.rows:
            job = self._next_job(wait if not self.active else 0.0)
            if job is None:
                break
            index = self.rows.index(None)
            try:
                admitted = self._prefill(index, job)
            except Exception as e:
                self._fail(index, job, e)
                continue
            if not admitted:   # its blocks are not available yet: it waits at the head of the line
                with self._waiting_changed:
                    self.waiting.appendleft(job)
                break
        self._prefill_chunks()
        if any(r is not None and r.computed == len(r.fed) for r in self.rows):
            self._grow()
            self._decode()

    def _next_job(self, wait: float) -> Job | None:
        """The oldest waiting job that is still wanted, waiting up to `wait` s for one."""
        with self._waiting_changed:
            if not self.waiting and wait > 0:
                self._waiting_changed.wait(wait)
            while self.waiting:
                job = self.waiting.popleft()
                if not job.cancelled:
                    return job
        return None

    def _prefill(self, index: int, job: Job) -> bool:
        """Put `job` in row `index`: its prompt (a pre-empted job: everything it had fed) into
        blocks found in the prefix cache and new ones; `_prefill_chunks` computes the tokens
        after the blocks found. False, with nothing taken, when the blocks are not available."""
        row, resumed = job.suspended, job.suspended is not None
        if not resumed:
            s = job.sampling
            generator = None
            if s.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(s.seed)
            row = Row(job, TextStream(self.tokenizer, job.prompt, s.stop), generator,
                      limit=min(s.max_new_tokens, self.context - len(job.prompt)), position=len(job.prompt),
                      fed=list(job.prompt))
        # the last token is computed (its logits are needed); `_share_more` looks again, and counts.
        # A prompt whose log-probabilities are asked for is computed in full: they come from its logits.
        scored = job.prompt_logprobs is not None and row.produced == 0
        found = [] if scored else self.pool.match(row.fed[:-1], count=False, salt=job.adapter)
        own = self.pool.allocate(self.pool.blocks_for(len(row.fed)) - len(found))
        if own is None:
            self.pool.release(found)
            return False
        job.suspended = None
        self.prompt_tokens += 0 if resumed else len(job.prompt)
        row.blocks, row.admitted = found + own, self._admissions
        row.computed, row.looked_up = len(found) * self.pool.block_size, scored
        row.prompt_logprobs = []
        self._admissions += 1
        self.rows[index] = row
        self.cache.assign(index, row.blocks)
        return True

    def _prefill_chunks(self) -> None:
        """Up to prefill_chunk prompt tokens of the rows being prefilled, oldest admission first;
        a row whose prompt is all in takes its first token (a resumed one has it already)."""
        budget = self.prefill_chunk
        for index in sorted((i for i, r in enumerate(self.rows) if r is not None and r.computed < len(r.fed)),
                            key=lambda i: self.rows[i].admitted):
            row = self.rows[index]
            try:
                budget -= self._prefill_chunk(index, row, budget)
            except Exception as e:
                self._fail(index, row.job, e)
            if budget <= 0:
                break

    def _prefill_chunk(self, index: int, row: Row, budget: int) -> int:
        """The next at most `budget` prompt tokens of row `index`; how many it computed."""
        if not row.looked_up:
            self._share_more(index, row)
        start, end = row.computed, min(len(row.fed), row.computed + budget)
        tokens = torch.tensor([row.fed[start:end]], device=self.device)
        positions = torch.arange(start, end, device=self.device).unsqueeze(0)
        self._select_adapters([row])
        h = self.engine.extend(tokens, positions, self.cache.view(slice(index, index + 1), end))
        row.computed = end
        self.computed_tokens += end - start
        self.pool.register(row.fed[:end], row.blocks, row.job.adapter)   # findable by the rows admitted with it
        # the logits at slot j score token j + 1, the prompt's own up to its last
        scored = min(end, len(row.fed) - 1) - start
        if row.job.prompt_logprobs is not None and row.produced == 0 and scored > 0:
            row.prompt_logprobs += token_logprobs(self.engine.head(h[:, :scored])[0],
                                                  row.fed[start + 1:start + 1 + scored], row.job.prompt_logprobs)
        if end == len(row.fed) and row.produced == 0:   # its first token (a resumed row has its next)
            self._first_token(index, row, h[:, -1])
        return end - start

    def _first_token(self, index: int, row: Row, h: torch.Tensor) -> None:
        if row.job.prompt_logprobs is not None:   # the first prompt token has no log-probability
            row.job.deliver(Event(prompt_logprobs=[None, *row.prompt_logprobs]))
            row.prompt_logprobs = []
        if row.limit == 0:   # the prompt's log-probabilities were all that was asked for
            return self._finish(index, "length")
        ids, logprobs = self._sample(self.engine.head(h), [row])
        self._accept(index, ids[0], logprobs[0])

    def _share_more(self, index: int, row: Row) -> None:
        """As a row's prefill begins, look its prompt up again: a row admitted in the same step
        as others with the same prefix finds the blocks their first chunks have just computed,
        and gives back its own blocks that those replace."""
        held = row.computed // self.pool.block_size
        found = self.pool.match(row.fed[:-1], salt=row.job.adapter)   # counted here, once per prefill (the hit rate)
        self.pool.release(found[:held])          # held since admission: not twice
        if len(found) > held:
            self.pool.release(row.blocks[held:len(found)])
            row.blocks = found + row.blocks[len(found):]
            row.computed = len(found) * self.pool.block_size
            self.cache.assign(index, row.blocks)
        row.looked_up = True

    def _grow(self) -> None:
        """A block more for each row whose next token starts one; while none is left, the
        newest row is pre-empted (which may be the row itself)."""
        size = self.pool.block_size
        for index, row in enumerate(self.rows):
            while row is not None and row.position >= len(row.blocks) * size:
                block = self.pool.allocate(1)
                if block is not None:
                    row.blocks += block
                    self.cache.assign(index, row.blocks)
                    break
                newest = max((i for i, r in enumerate(self.rows) if r is not None), key=lambda i: self.rows[i].admitted)
                self._preempt(newest)
                row = self.rows[index]

    def _preempt(self, index: int) -> None:
        """Row `index` gives its blocks back (left in the prefix cache, so that resuming may find
        them) and its job waits at the head of the line with its state."""
        row = self.rows[index]
        self._vacate(index)
        row.job.suspended = row
        self.preempted += 1
        with self._waiting_changed:
            self.waiting.appendleft(row.job)

    def _vacate(self, index: int) -> None:
        """Empty row `index`, its full blocks registered in the prefix cache and given back."""
        row = self.rows[index]
        self.rows[index] = None
        if row is not None and row.blocks:
            self.pool.register(row.fed[:row.computed], row.blocks, row.job.adapter)   # what the cache holds
            self.pool.release(row.blocks)
            row.blocks = []
        self.cache.assign(index, [])

    def _decode(self) -> None:
        n = 1 + max(i for i, r in enumerate(self.rows) if r is not None)
        n = min(len(self.rows), 1 << (n - 1).bit_length())
        # a row still being prefilled sits this step out: its throw-away token goes to its last
        # prompt slot, which the prefill has yet to write; an empty row's to the scratch block
        rows = [r if r is not None and r.computed == len(r.fed) else None for r in self.rows[:n]]
        tokens = torch.tensor([r.last if r else 0 for r in rows], device=self.device)
        positions = [r.position if r else (len(p.fed) - 1 if p else 0) for r, p in zip(rows, self.rows[:n])]
        window = bucket(max(positions) + 1, self.context)
        view = self.views.get((n, window))
        if view is None:  # a handful of (rows, window) pairs: each view made once
            view = self.views[n, window] = self.cache.view(slice(0, n), window)
        self._select_adapters(self.rows[:n])
        logits = self.engine.decode(tokens, positions, view)
        next_ids, logprobs = self._sample(logits, rows)
        for i, row in enumerate(rows):
            if row is not None:
                row.fed.append(row.last)
                row.computed += 1
                row.position += 1
                self._accept(i, next_ids[i], logprobs[i])

    def _select_adapters(self, rows: list[Row | None]) -> None:
        """Each row of the next forward pass runs with its request's adapter (an empty row with the base)."""
        if self.adapters is not None:
            self.adapters.select([r.job.adapter if r is not None else -1 for r in rows])

    def _sample(self, logits: torch.Tensor, rows: list[Row | None]) -> tuple[list[int], list[TokenLogprob | None]]:
        """One token per row of logits [n, V]: one argmax for the batch; for a row with logit
        bias, penalties or a grammar, its own shaped logits; a draw from its own generator for
        each row that samples. With each token its log-probability, where the request asks."""
        ids = logits.argmax(dim=-1).tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            if row is None:
                continue
            params, constraint = row.job.sampling, row.job.constraint
            shaped = shape_logits(logits[i:i + 1], params, [row.generated()])[0] if params.shapes else logits[i]
            if constraint is not None:
                shaped = constraint.restrict(shaped)
            if not params.greedy:
                ids[i] = int(sample(shaped.unsqueeze(0), params, row.generator))
            elif params.shapes or constraint is not None:
                ids[i] = int(shaped.argmax())
            if row.job.logprobs is not None:
                logprobs[i] = token_logprobs(logits[i:i + 1], ids[i:i + 1], row.job.logprobs)[0]
        return ids, logprobs

    def _accept(self, index: int, token: int, logprob: TokenLogprob | None = None) -> None:
        """Hand a row's new token to its request; evict the row when the request is complete."""
        row = self.rows[index]
        row.last = token
        now = time.perf_counter()
        if self.timings is not None:
            if row.produced == 0:
                self.timings.first_token(now - row.job.submitted)
            else:
                self.timings.next_token(now - row.token_at)
        row.token_at = now
        if token in self.stop_ids:
            if logprob:  # a client may need it (lm-eval's local-completions reads one token past the prompt)
                row.job.deliver(Event(logprobs=[logprob]))
            return self._finish(index, "stop")
        row.produced += 1
        self.generated_tokens += 1
        constraint = row.job.constraint
        if constraint is not None:
            constraint.accept(token)
        text = row.text.push(token)
        if text or logprob:
            row.job.deliver(Event(text=text, logprobs=[logprob] if logprob else []))
        if row.text.stopped or (constraint is not None and constraint.finished):
            self._finish(index, "stop")
        elif row.produced >= row.limit:
            self._finish(index, "length")

    def _finish(self, index: int, reason: str) -> None:
        row = self.rows[index]
        self._vacate(index)
        self.engine.pause()  # a compiled step asked for meanwhile starts building
        rest = row.text.finish()
        self._end(row.job, Event(text=rest, finish_reason=reason, prompt_tokens=len(row.job.prompt),
                                 completion_tokens=row.produced))

    def _fail(self, index: int, job: Job, e: Exception) -> None:
        """A prefill failed: this request alone fails; the others keep their rows."""
        log.exception("prefill failed")
        if self.rows[index] is not None and self.rows[index].job is job:
            self._vacate(index)
        self._end(job, Event(error=f"internal error: {type(e).__name__}: {e}"))

    def _fail_all(self, message: str, status: int, waiting: bool) -> None:
        jobs = [r.job for r in self.rows if r is not None]
        for index in range(len(self.rows)):
            self._vacate(index)
        if waiting:
            with self._waiting_changed:
                jobs += self.waiting
                self.waiting.clear()
        for job in jobs:
            self._end(job, Event(error=message, status=status))

    def _end(self, job: Job, last: Event) -> None:
        """Deliver a job's last event, having given its place back first: a client that sends
        its next request as soon as it has the answer finds the place free."""
        self._release(job)
        job.deliver(last)

    def _release(self, job: Job) -> None:
        with self._waiting_changed:
            self._held = [j for j in self._held if j is not job]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
