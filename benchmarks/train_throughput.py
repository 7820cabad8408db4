"""Training throughput on the stories15M shape: camelid against transformers.LlamaForCausalLM,
and both against the machine's measured matrix-product peaks.

dim 288, 6 layers, 6 heads, vocabulary 32000 (tied head, as llama2.c), sequence 256, batch 8,
random tokens; both take the same AdamW (0.9, 0.95, weight decay 0.1) and clip gradients at 1.0;
fp32, then bf16 (transformers: autocast; camelid: its `train.dtype=bfloat16`); 2 threads; one
run. Each engine runs in a fresh process of its own (warm-up steps, then --rounds rounds of
--steps optimizer steps; the fastest round counts), so that process-wide settings stay with the
engine that makes them. The engines take turns: every round runs each engine once more, so a
burst of load from elsewhere hits all of them rather than one. "transformers+allocator" gives
transformers the allocator setting camelid makes, to show what that setting is worth.

Model FLOPs utilisation (MFU) = tokens/s x model FLOPs per token / peak FLOP/s, where
- model FLOPs per token follow PaLM's convention (Chowdhery et al., 2022, appendix B):
  6N + 12·L·d·T, N the parameters of the matrix products including the (tied) output head but
  not the embedding lookup, L layers, d the model width, T the sequence length; the attention
  term counts the whole T x T score matrix, masked half included (camelid's own training log,
  camelid.train.metrics.flops_per_token, counts only the causal half: about 3% fewer FLOPs);
- the peaks are the best of several 2048x2048 `torch.mm` in bf16 and in fp32 on the same
  threads, measured in the same run, before and after the engines (the higher counts). They
  are what torch reaches on one square shape, not the hardware's limit: a step whose products
  suit MKL better can pass 100% of the fp32 figure.

    python benchmarks/train_throughput.py [--threads 2] [--rounds 4] [--steps 5]
    python benchmarks/train_throughput.py --profile bfloat16     # where one camelid step's time goes
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

SEQ, BATCH = 256, 8
DIM, LAYERS, HEADS, FFN, VOCAB = 288, 6, 6, 768, 32000
ENGINES = ("transformers", "transformers+allocator", "camelid", "camelid --train.compile=true")


def flops_per_token() -> float:
    """PaLM's model FLOPs per token (see the module docstring)."""
    matmul_params = LAYERS * (4 * DIM * DIM + 3 * DIM * FFN) + VOCAB * DIM
    return 6 * matmul_params + 12 * LAYERS * DIM * SEQ


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the fastest of `repeats` n x n products in `dtype` on this process's threads."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def products_step_seconds(dtype: torch.dtype, repeats: int = 3) -> float:
    """Seconds of one step's matrix products alone, at the step's own shapes, for every linear
    layer and the head, each product in its fastest form: the forward x W^T or (W x^T)^T, the
    input's gradient g W, the weight's gradient g^T x or (x^T g)^T, and the head on all rows at
    once or on slabs of 512 rows (camelid's loss), each timed on its own, the fastest of
    `repeats`. Attention's products (2.5% of the FLOPs) are left out. No step that does these
    products with torch's matrix products can take less: a ceiling on tokens/s."""
    n = BATCH * SEQ

    def fastest(*variants) -> float:
        best = float("inf")
        for fn in variants:
            fn()
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
        return best

    def layer(d_in: int, d_out: int, rows: int) -> float:
        x, w, g = torch.randn(rows, d_in).to(dtype), torch.randn(d_out, d_in).to(dtype), torch.randn(rows, d_out).to(dtype)
        return n // rows * (fastest(lambda: x @ w.t(), lambda: w @ x.t())
                            + fastest(lambda: g @ w)
                            + fastest(lambda: g.t() @ x, lambda: x.t() @ g))

    per_layer = 4 * layer(DIM, DIM, n) + 2 * layer(DIM, FFN, n) + layer(FFN, DIM, n)
    return LAYERS * per_layer + min(layer(DIM, VOCAB, n), layer(DIM, VOCAB, 512))


class CamelidEngine:
    def __init__(self, dtype: str, run_dir: str, overrides: list[str]):
        from camelid.train import Trainer, load_train_config

        cfg = load_train_config(None, ["--model.size=stories15M", "--data.synthetic=true", f"--data.seq_len={SEQ}",
                                       f"--train.micro_batch={BATCH}", f"--train.dtype={dtype}",
                                       "--train.warmup_steps=10", f"--run.dir={run_dir}", "--train.max_steps=100000",
                                       *overrides])
        self.trainer = Trainer(cfg, log=False)

    def step(self) -> None:
        self.trainer.train_step()


class TransformersEngine:
    def __init__(self, dtype: str):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS,
                          num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=SEQ,
                          rms_norm_eps=1e-5, tie_word_embeddings=True, attn_implementation="sdpa")
        self.model = LlamaForCausalLM(cfg).train()
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        rest = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                     lr=5e-4, betas=(0.9, 0.95))
        self.bf16 = dtype == "bfloat16"
        self.gen = torch.Generator().manual_seed(0)

    def step(self) -> None:
        block = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=self.gen)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(input_ids=block[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), block[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()


def build(engine: str, dtype: str, tmp: str):
    if engine.startswith("transformers"):
        if engine == "transformers+allocator":
            from camelid.platform import keep_freed_memory

            keep_freed_memory()
        return TransformersEngine(dtype)
    return CamelidEngine(dtype, tmp, engine.split()[1:])


def worker(engine: str, dtype: str, steps: int) -> None:
    """Serve timing requests over stdin/stdout: build the engine, run 3 warm-up steps (and the
    compile, where there is one), say how long that took, then for every line read time `steps`
    steps and answer with tokens/s."""
    tmp = tempfile.mkdtemp()
    try:
        t0 = time.perf_counter()
        e = build(engine, dtype, tmp)
        for _ in range(3):
            e.step()
        print(json.dumps({"ready_s": time.perf_counter() - t0}), flush=True)
        for _ in sys.stdin:
            t0 = time.perf_counter()
            for _ in range(steps):
                e.step()
            print(json.dumps({"tokens_per_s": steps * BATCH * SEQ / (time.perf_counter() - t0)}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(dtype: str, args) -> dict[str, dict[str, float]]:
    """Every engine in a process of its own, all alive at once and idle but for their turn:
    round after round, each engine times `steps` steps in turn; the fastest round counts."""
    procs = {}
    for engine in ENGINES:  # started one after the other, so that start-up costs do not overlap either
        procs[engine] = subprocess.Popen(
            [sys.executable, __file__, "--worker", engine, dtype, "--threads", str(args.threads),
             "--steps", str(args.steps)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs[engine].ready = json.loads(procs[engine].stdout.readline())["ready_s"]
    best = defaultdict(float)
    try:
        for _ in range(args.rounds):
            for engine, p in procs.items():
                p.stdin.write("go\n")
                p.stdin.flush()
                best[engine] = max(best[engine], json.loads(p.stdout.readline())["tokens_per_s"])
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()
    return {e: {"tokens_per_s": best[e], "ready_s": p.ready} for e, p in procs.items()}


def profile(dtype: str, overrides: list[str]) -> None:
    """One camelid step under torch.profiler, its time split by phase and, within each phase,
    by kind of operation (self time of each aten op), as a markdown table."""
    from torch.profiler import ProfilerActivity, record_function

    import camelid.train.trainer as trainer_module

    def labelled(name, fn):
        def run(*a, **kw):
            with record_function(name):
                return fn(*a, **kw)
        return run

    tmp = tempfile.mkdtemp()
    e = CamelidEngine(dtype, tmp, overrides)
    t = e.trainer
    t.model.hidden = labelled("phase: forward, blocks", t.model.hidden)
    trainer_module.linear_cross_entropy = labelled("phase: head + cross-entropy", trainer_module.linear_cross_entropy)
    t.runtime.clip_grad_norm = labelled("phase: gradient clipping", t.runtime.clip_grad_norm)
    t.optimizer.step = labelled("phase: optimizer", t.optimizer.step)
    for _ in range(4):
        e.step()
    steps = 3
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = time.perf_counter()
        for _ in range(steps):
            e.step()
        wall = (time.perf_counter() - wall) / steps
    shutil.rmtree(tmp, ignore_errors=True)
    table: dict[tuple[str, str], float] = defaultdict(float)
    for ev in prof.events():
        if ev.self_cpu_time_total <= 0:
            continue
        phase, node = "other (loader, loss sum, zero_grad)", ev
        while node is not None:
            if node.name.startswith("phase: "):
                phase = node.name[len("phase: "):]
                break
            if node.name.startswith("autograd::engine::evaluate_function"):
                phase = "backward, blocks"
            node = node.cpu_parent
        table[phase, kind_of(ev.name)] += ev.self_cpu_time_total / 1e3 / steps
    total = sum(table.values())
    print(f"camelid {dtype} {' '.join(overrides)}: {wall * 1e3:.0f} ms per step under the profiler "
          f"({BATCH * SEQ / wall:.0f} tokens/s); the table adds up each operation's own time, {total:.0f} ms\n")
    print("| phase | kind of operation | ms per step | share |\n|---|---|---:|---:|")
    phases = sorted({p for p, _ in table}, key=lambda p: -sum(v for (q, _), v in table.items() if q == p))
    for phase in phases:
        rows = sorted(((k, v) for (p, k), v in table.items() if p == phase), key=lambda kv: -kv[1])
        subtotal = sum(v for _, v in rows)
        print(f"| **{phase}** | all | **{subtotal:.0f}** | **{subtotal / total:.0%}** |")
        for kind, v in rows:
            if v >= 0.5:
                print(f"| | {kind} | {v:.0f} | {v / total:.0%} |")


KINDS = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
                        "aten::_weight", "mkldnn"),
    "attention (SDPA)": ("aten::_scaled_dot_product",),
    "softmax, exp": ("aten::_log_softmax", "aten::_softmax", "aten::exp", "aten::log_softmax", "aten::softmax"),
    "casts and copies": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat",
                         "aten::stack", "aten::index", "aten::_unsafe_view", "aten::embedding"),
    "allocation, zeroing": ("aten::empty", "aten::zeros", "aten::fill_", "aten::zero_", "aten::resize_",
                            "aten::empty_strided", "aten::ones"),
    "optimizer arithmetic": ("aten::_foreach", "aten::_fused_adam", "aten::lerp", "aten::addcdiv", "aten::addcmul",
                             "aten::sqrt", "aten::linalg_vector_norm", "aten::norm"),
}


def kind_of(op: str) -> str:
    for kind, prefixes in KINDS.items():
        if op.startswith(prefixes):
            return kind
    if "fused" in op or op.startswith(("graph_", "kernel")):
        return "compiled kernels (inductor: norms, RoPE, SiLU, casts)"
    if op.startswith("aten::"):
        return "element-wise (norms, RoPE, SiLU, adds, ...)"
    return "outside operations (Python, autograd, dispatch)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile", metavar="DTYPE", help="profile one camelid step instead (float32 or bfloat16)")
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "DTYPE"), help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(*args.worker, args.steps)
        return
    if args.profile:
        profile(args.profile, overrides)
        return
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    peaks = {d: matmul_peak(d) for d in dtypes.values()}
    products = {name: products_step_seconds(d) for name, d in dtypes.items()}
    results = {dtype: measure(dtype, args) for dtype in dtypes}
    peaks = {d: max(v, matmul_peak(d)) for d, v in peaks.items()}
    products = {name: min(v, products_step_seconds(dtypes[name])) for name, v in products.items()}
    flops = flops_per_token()
    print(f"stories15M shape, sequence {SEQ}, batch {BATCH}, CPU, {args.threads} threads; fastest of {args.rounds} "
          f"rounds of {args.steps} steps, each engine in its own process, taking turns")
    print(f"matrix-product peak (2048x2048 torch.mm): bf16 {peaks[torch.bfloat16] / 1e9:.0f} GFLOP/s, "
          f"fp32 {peaks[torch.float32] / 1e9:.0f} GFLOP/s; model FLOPs per token (PaLM) {flops / 1e6:.1f} M")
    head = f"{'precision':10s} {'engine':32s} {'tokens/s':>9s} {'ratio':>7s} {'MFU bf16':>9s} {'MFU fp32':>9s} {'start s':>8s}"
    print(head)
    for dtype, r in results.items():
        base = r["transformers"]["tokens_per_s"]
        for engine, m in r.items():
            tps = m["tokens_per_s"]
            # a bf16 step against the fp32 peak would say nothing: that column is for fp32 steps
            fp32 = f"{tps * flops / peaks[torch.float32]:9.1%}" if dtype == "float32" else f"{'':9s}"
            print(f"{dtype:10s} {engine:32s} {tps:9.0f} {tps / base:6.2f}x {tps * flops / peaks[torch.bfloat16]:9.1%} "
                  f"{fp32} {m['ready_s']:8.1f}")
    for dtype, r in results.items():
        ceiling = BATCH * SEQ / products[dtype]
        print(f"{dtype}: the step's matrix products alone take {products[dtype] * 1e3:.0f} ms (linear layers and head, "
              f"attention left out): at most {ceiling:.0f} tokens/s, {ceiling / r['transformers']['tokens_per_s']:.2f}x "
              f"transformers, {ceiling / r['transformers+allocator']['tokens_per_s']:.2f}x transformers+allocator")
    print("ratio: against transformers out of the box; transformers+allocator: transformers given camelid's allocator "
          "setting (glibc keeps freed memory for reuse instead of page-faulting it back in every step); start s: "
          "seconds from building the engine to the end of 3 warm-up steps (compilation included)")


if __name__ == "__main__":
    main()
