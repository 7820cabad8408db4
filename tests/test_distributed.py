"""`camelid train` under torchrun (gloo on CPU): FSDP, HSDP, tensor parallelism and FSDP x TP give
the single-process loss curve; one run directory goes from 1 process to 4 ranks to 2 to 1 and
the curve goes on; a sharded run exports the whole model (camelid, Hugging Face, GGUF) with the
single-process run's weights; compiled blocks under TP get the right gradients. Every run is the
real command line, fp32, one thread per process.

The gradient norms are compared too: Adam is blind to a wrong gradient scale (say, summing
where FSDP averages) when clipping is inactive, the logged norm is not."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import camelid
from camelid.checkpoint import read_checkpoint
from camelid.errors import CamelidError
from camelid.train import Trainer, load_train_config
from helpers import hang_limit

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

EMPTY = Path(__file__).parent / "data" / "empty.toml"
STEPS = 20
TOL = 1e-5          # absolute, on losses around 4-6 nats
GRAD_RTOL = 1e-4    # relative, on gradient norms
# min_lr_ratio = 1: the learning rate after warmup does not depend on train.max_steps, so the
# resume test can stop each leg early with a smaller max_steps and keep the same schedule
ARGS = ["--model.size=tiny", "--data.seq_len=32", "--train.micro_batch=4", "--train.dtype=float32",
        "--train.warmup_steps=5", "--train.lr=3e-3", "--train.min_lr_ratio=1.0", "--train.log_interval=1",
        "--train.eval_interval=1000", "--train.eval_batches=2", f"--train.max_steps={STEPS}",
        "--checkpoint.interval=1000"]


def train(run_dir: Path, prepared, nproc: int = 1, *extra: str, idle_seconds: float = 30) -> dict[int, tuple]:
    """Run `camelid train` (under torchrun when nproc > 1), which takes about `idle_seconds` on an
    idle machine; per step of run_dir (loss, grad_norm)."""
    cli = ["-m", "camelid.cli.main", "train", str(EMPTY)]
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                                 if nproc > 1 else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(launch + cli + [f"--run.dir={run_dir}", f"--data.path={prepared.directory}", *ARGS, *extra],
                         capture_output=True, text=True, env=env, timeout=hang_limit(idle_seconds))
    assert out.returncode == 0, out.stderr[-4000:]
    return losses(run_dir)


def losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "lr" in r]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "lr" in r}


def compare(capsys, record_property, what: str, ref: dict, got: dict) -> None:
    """Assert that two runs' curves agree; print the largest differences."""
    assert list(ref) == list(got) == list(range(1, STEPS + 1))
    loss = max(abs(ref[s][0] - got[s][0]) for s in ref)
    grad = max(abs(ref[s][1] - got[s][1]) / ref[s][1] for s in ref)
    record_property("max_abs_loss_diff", loss)
    record_property("max_rel_grad_norm_diff", grad)
    with capsys.disabled():
        print(f"\n{what}: over {STEPS} steps, max |loss - single-process loss| = {loss:.3g}, "
              f"max relative gradient-norm difference = {grad:.3g}")
    assert loss <= TOL and grad <= GRAD_RTOL


@pytest.fixture(scope="module")
def single(tmp_path_factory, prepared):
    run = tmp_path_factory.mktemp("single") / "run"
    return run, train(run, prepared)


@pytest.mark.parametrize("name,nproc,layout", [
    ("FSDP over 2 ranks", 2, ["--parallel.dp_shard=2"]),
    ("HSDP, 2 replicas", 2, ["--parallel.dp_replicate=2"]),
    ("TP over 2 ranks", 2, ["--parallel.tp=2"]),
])
def test_loss_curve_matches_one_process(tmp_path, prepared, single, name, nproc, layout, capsys, record_property):
    curve = train(tmp_path / "run", prepared, nproc, *layout)
    compare(capsys, record_property, name, single[1], curve)


def test_checkpoints_resume_at_other_world_sizes(tmp_path, prepared, single, capsys, record_property):
    """1 process -> 4 ranks (FSDP x TP) -> 2 ranks (FSDP) -> 1 process, one run directory."""
    run = tmp_path / "run"
    train(run, prepared, 1, "--train.max_steps=5")
    assert (run / "checkpoints" / "step_00000005" / "model.safetensors").exists()  # single-process kind
    train(run, prepared, 4, "--parallel.dp_shard=2", "--parallel.tp=2", "--train.max_steps=10",
          "--checkpoint.interval=4")
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000010").iterdir()) == ["dcp", "trainer.pt"]
    train(run, prepared, 2, "--parallel.dp_shard=2", "--train.max_steps=15")
    curve = train(run, prepared, 1)
    compare(capsys, record_property, "1 process -> 4 ranks -> 2 -> 1", single[1], curve)
    assert (run / "checkpoints" / "step_00000020" / "model.safetensors").exists()


def test_a_sharded_run_exports_the_whole_model(tmp_path, prepared, single, capsys, record_property):
    """FSDP x TP (the weights split both ways) gathered on rank 0 and written in three formats."""
    run = tmp_path / "run"
    curve = train(run, prepared, 4, "--parallel.dp_shard=2", "--parallel.tp=2", '--checkpoint.export=["hf", "gguf"]')
    compare(capsys, record_property, "FSDP 2 x TP 2", single[1], curve)
    ours = dict(read_checkpoint(run / "model").tensors())
    ref = dict(read_checkpoint(single[0] / "model").tensors())
    assert ours.keys() == ref.keys()
    diff = max((ours[k] - ref[k]).abs().max().item() for k in ref)
    with capsys.disabled():
        print(f"exported weights: max |w - single-process w| = {diff:.3g}")
    assert diff <= 1e-4
    llm = camelid.load(run / "model")
    tokens = torch.tensor([llm.tokenizer.encode("def f(x):\n    return x", bos=True, eos=False)])
    logits = llm.model(tokens)
    for path in (run / "model-hf", run / "model.gguf"):
        torch.testing.assert_close(camelid.load(path).model(tokens), logits, atol=1e-4, rtol=1e-4)


def test_compiled_blocks_under_tensor_parallelism(tmp_path, prepared, single, capsys):
    """torch.compile per block with TP and selective checkpointing, 5 steps (the warmup: a
    shorter run would warm up faster). Compiled fp32 arithmetic is not the eager one, and Adam's
    first update amplifies the difference (it moves every weight by about the learning rate,
    whatever the size of its gradient), so step 1 is compared tightly and the rest loosely; a
    wrong gradient, even of the small norm weights, moves the loss by 1e-2 and more."""
    curve = train(tmp_path / "run", prepared, 2, "--parallel.tp=2", "--train.compile=true",
                  "--train.activation_checkpointing=selective", "--train.max_steps=5", idle_seconds=120)
    ref = single[1]
    (loss, grad), (ref_loss, ref_grad) = curve[1], ref[1]
    later = max(abs(curve[s][0] - ref[s][0]) for s in range(2, 6))
    with capsys.disabled():
        print(f"\ncompiled TP over 2 ranks: step 1 |loss diff| {abs(loss - ref_loss):.3g}, relative "
              f"gradient-norm diff {abs(grad - ref_grad) / ref_grad:.3g}; steps 2-5 max |loss diff| {later:.3g}")
    assert abs(loss - ref_loss) <= TOL and abs(grad - ref_grad) <= GRAD_RTOL * ref_grad
    assert later <= 2e-3


def test_the_layout_must_use_every_process(tmp_path, prepared):
    cfg = load_train_config(None, [f"--run.dir={tmp_path}", f"--data.path={prepared.directory}", *ARGS,
                                   "--parallel.dp_shard=2"])
    with pytest.raises(CamelidError, match=r"parallel.dp_replicate x parallel.dp_shard x parallel.tp = "
                                           r"1 x 2 x 1 = 2, but this is a single process"):
        Trainer(cfg, log=False)
