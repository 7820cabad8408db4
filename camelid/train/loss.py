"""Cross-entropy of the output head without materialising the logits.

The head of a small model dominates training: for the stories15M shape the [tokens, 32000]
logits and their fp32 log-softmax cost more than the six transformer blocks together. Here the
head's matrix product, the softmax and both gradients are computed chunk by chunk in the
forward pass (as Liger-Kernel's fused linear cross-entropy does on GPUs), so a [chunk, vocab]
slab is all that ever exists: no fp32 copy of the logits, no separate log-softmax backward. The
backward pass only scales the gradients already computed.
"""

from __future__ import annotations

import torch

IGNORE = -100    # a target with no loss (a prompt token, padding, the end of a packed example), as in
                 # torch.nn.functional.cross_entropy's default ignore_index
SLAB = 1 << 24  # logits per slab (64 MB in fp32): 512 rows for a 32k vocabulary, measured fastest on
                # a 2-core CPU in fp32 and bf16 (docs/profile-training.md); 256 rows make the matrix
                # products less efficient, 1024 spill the slab's element-wise passes further from cache


# A target probability below this (bf16 and fp32 lose relative precision among subnormals, and
# 0 has no log) takes its row's log-sum-exp from the logits instead.
TINY = 1e-30


def _softmax_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d logits, minus the summed loss) of a chunk of logits, the gradient in the
    logits' dtype. In bf16 there is no fp32 copy of the logits: softmax accumulates in fp32 and
    writes the probabilities in bf16, which is what the head's two backward products take
    anyway. One softmax pass replaces log-softmax, exp and (in bf16) the cast back, which cost
    three times as much (docs/profile-training.md).

    The loss is -log p(target), read from the softmax: rounded to the probabilities' dtype, which
    keeps its relative precision at every magnitude down to the smallest normal number (2^-9 in
    bf16, so the loss to within 0.002 nats, as an fp32 log-softmax rounded to bf16 would give).
    A target so improbable that its probability falls below TINY (a confident mistake, logits
    70 nats apart) has its row's log-sum-exp computed from the logits, exactly; such rows are
    rare, and the common case needs no pass over the logits besides the softmax. (On an
    accelerator, where testing for such rows would wait for the device every chunk, the
    log-sum-exp comes from the largest logit and the largest probability instead.)"""
    rows = torch.arange(targets.shape[0], device=targets.device)
    probs = torch.softmax(logits, dim=-1)
    if logits.device.type != "cpu":
        # no wait for the device per chunk: the largest logit has the largest probability, never
        # below 1/vocab, so it gives each row's log-sum-exp to the probabilities' rounding
        lse = logits.amax(dim=-1).float() - probs.amax(dim=-1).float().log()
        picked = logits[rows, targets].float() - lse
    else:
        p = probs[rows, targets].float()
        picked = p.log()
        far = p < TINY
        if bool(far.any()):
            picked[far] = logits[rows[far], targets[far]].float() - torch.logsumexp(logits[far].float(), dim=-1)
    probs[rows, targets] -= 1.0
    return probs, picked.sum()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                compute_dtype: torch.dtype, chunk: int) -> torch.Tensor:
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        grad_h = torch.empty_like(h)
        # a frozen head (LoRA finetuning) needs no weight gradient: skip its [vocab, dim] product
        want_w = ctx.needs_input_grad[1]
        grad_w = torch.zeros(weight.shape if want_w else (), dtype=torch.float32, device=weight.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        fp32 = compute_dtype == torch.float32
        for start in range(0, h.shape[0], chunk):
            hc, tc = h[start:start + chunk], targets[start:start + chunk]
            # the logits [chunk, vocab] are bound only inside the softmax: its gradient replaces them
            g, chunk_loss = _softmax_grad(hc @ w.t(), tc)
            loss -= chunk_loss
            torch.mm(g, w, out=grad_h[start:start + chunk])
            if want_w and fp32:
                grad_w.addmm_(g.t(), hc)
            elif want_w:
                grad_w += g.t() @ hc
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        grad_weight = (grad_w * grad_loss).to(w_dtype) if ctx.needs_input_grad[1] else None
        return (grad_h.to(h_dtype) * grad_loss.to(h_dtype), grad_weight, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """sum over rows of cross_entropy(hidden @ weight.T, targets), for hidden [N, d], weight [V, d].
    Rows whose target is IGNORE add nothing and get a zero gradient.

    Under autocast the products run in the autocast dtype, as F.linear would; the softmax
    accumulates and the loss sums in fp32, and in bf16 the probabilities (the logits' gradient)
    are bf16, as autocast's backward of F.linear would have them."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    keep = targets != IGNORE
    if not bool(keep.all()):
        # only the kept rows go through the head: instruction data ignores most tokens (the
        # prompts), and autograd scatters their gradient back with zeros for the others
        hidden, targets = hidden[keep], targets[keep]
    chunk = chunk or max(1, SLAB // weight.shape[0])
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, chunk)
