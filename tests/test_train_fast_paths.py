"""The trainer's fast paths against the plain ones: the bf16 head + cross-entropy against the
fp32 reference, fused AdamW against foreach, and the compiled blocks against the eager ones."""

import copy

import pytest
import torch
import torch.nn.functional as F

from camelid.platform import native_bf16
from camelid.train.config import TrainSection
from camelid.train.loss import linear_cross_entropy
from camelid.train.optim import build_optimizer
from test_model import tiny


def reference(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor):
    """The fp32 loss and gradients of plain F.cross_entropy over materialised logits."""
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = F.cross_entropy(F.linear(h, w), t, reduction="sum")
    loss.backward()
    return loss.item(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [64, 1000])  # several chunks, and one
def test_bf16_head_and_loss_match_the_fp32_reference(chunk):
    torch.manual_seed(0)
    h = torch.randn(300, 64, requires_grad=True)
    w = (torch.randn(2000, 64) * 0.2).requires_grad_()
    t = torch.randint(0, 2000, (300,))
    ref_loss, ref_gh, ref_gw = reference(h, w, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk=chunk)
    (loss / 300).backward()
    # bf16 products: logits to within about 1%, the loss to well within that
    assert loss.item() == pytest.approx(ref_loss, rel=2e-3)
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    for ours, ref in ((h.grad, ref_gh / 300), (w.grad, ref_gw / 300)):
        assert (ours - ref).norm() <= 2e-2 * ref.norm()
        # and not merely small: the bf16 gradient points where the fp32 one does
        assert F.cosine_similarity(ours.flatten(), ref.flatten(), dim=0) > 0.999


def test_bf16_loss_stays_finite_and_right_for_confident_mistakes():
    """Logit gaps beyond 100: the probability of the target underflows even in fp32, yet the loss
    is the gap, as log-softmax gives it."""
    torch.manual_seed(0)
    h = torch.randn(16, 32) * 100
    w = torch.randn(50, 32)
    t = torch.randint(0, 50, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, t)
        ref = F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")  # the same bf16 logits
    assert torch.isfinite(ours) and ref.item() > 1000
    assert ours.item() == pytest.approx(ref.item(), rel=1e-3)


def test_fused_adamw_steps_equal_foreach():
    """build_optimizer's AdamW (fused on CPUs) against torch's foreach AdamW with the same
    settings: the same weights after several steps, weight decay on the matrices only."""
    torch.manual_seed(0)
    model = tiny().train()
    other = copy.deepcopy(model)
    cfg = TrainSection(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(model, cfg)
    assert fused.defaults["fused"]
    groups = [{"params": [p for p in other.parameters() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in other.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    plain = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):  # the same gradients for both, so that only the update arithmetic differs
        grads = [torch.randn(p.shape, generator=gen) * 1e-2 for p in model.parameters()]
        for m, opt in ((model, fused), (other, plain)):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    start = tiny()
    for (name, a), b, before in zip(model.named_parameters(), other.parameters(), start.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(a, before) for a, before in zip(model.parameters(), start.parameters()))


@pytest.mark.slow  # inductor compiles the tiny model's block: about a minute on 2 cores
@pytest.mark.skipif(not native_bf16("cpu"), reason="bfloat16 is emulated on this CPU (slow)")
def test_compiled_training_steps_match_eager(tmp_path):
    """--train.compile=true against the eager blocks: the same losses and gradient
    norms over a few bf16 steps of the same run."""
    from camelid.train import Trainer, load_train_config

    def run(compile: bool):
        cfg = load_train_config(None, ["--model.size=tiny", "--data.synthetic=true", "--data.seq_len=32",
                                       "--train.micro_batch=4", "--train.dtype=bfloat16", "--train.warmup_steps=2",
                                       f"--train.compile={str(compile).lower()}", f"--run.dir={tmp_path / str(compile)}"])
        trainer = Trainer(cfg, log=False)
        return [trainer.train_step() for _ in range(3)]

    eager, compiled = run(False), run(True)
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_of_rows_far_from_their_target_among_ordinary_rows(dtype):
    """A row whose target's probability underflows takes its log-sum-exp from the logits; the
    rows around it keep reading the softmax. Both against F.cross_entropy, row by row."""
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(6, 16, generator=gen)
    w = torch.randn(40, 16, generator=gen)
    t = torch.randint(0, 40, (6,), generator=gen)
    h[2] *= 200                                # row 2: a confident mistake...
    t[2] = int(F.linear(h[2], w).argmin())     # ...its target the least likely token, ~1e3 nats away
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        rows = [linear_cross_entropy(h[i:i + 1], w, t[i:i + 1]).item() for i in range(6)]
        total = linear_cross_entropy(h, w, t).item()
    logits = F.linear(h, w)
    if dtype == torch.bfloat16:
        logits = F.linear(h.bfloat16(), w.bfloat16()).float()
    ref = F.cross_entropy(logits, t, reduction="none")
    assert ref[2] > 500
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    for got, want in zip(rows, ref.tolist()):
        assert got == pytest.approx(want, rel=tol, abs=tol)
    assert total == pytest.approx(sum(rows), rel=1e-5)
