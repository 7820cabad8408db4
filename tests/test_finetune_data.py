"""Instruction data (camelid.finetune.data), the model's packed-documents mask and the loss's
ignore index (issue 13)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from camelid.config import get_size
from camelid.model.transformer import Transformer
from camelid.train.loss import IGNORE, linear_cross_entropy


def tiny_model(seed: int = 0, vocab: int = 64) -> Transformer:
    from dataclasses import replace

    model = Transformer(replace(get_size("tiny"), vocab_size=vocab, max_seq_len=128))
    model.init_weights(seed=seed)
    return model


# ---- the model's documents mask and the loss's ignore index --------------------------------------

def test_documents_mask_isolates_packed_examples():
    model = tiny_model()
    torch.manual_seed(0)
    a, b = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 7))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    documents = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        h = model.hidden(packed, positions, documents=documents)
        torch.testing.assert_close(h[:, :5], model.hidden(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h[:, 5:], model.hidden(b), atol=1e-5, rtol=1e-5)
        # one document over the whole row is the plain causal forward
        torch.testing.assert_close(model(packed, documents=torch.zeros_like(packed)), model(packed),
                                   atol=1e-5, rtol=1e-5)


def test_documents_need_the_tokens_shape_and_no_cache():
    model = tiny_model()
    with pytest.raises(ValueError, match="documents"):
        model.hidden(torch.zeros(1, 4, dtype=torch.long), documents=torch.zeros(1, 3, dtype=torch.long))


def test_loss_skips_ignored_targets():
    torch.manual_seed(0)
    h = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (40,))
    t[::3] = IGNORE
    ours = linear_cross_entropy(h, w, t, chunk=7)
    ours.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(F.linear(h, w), t, reduction="sum", ignore_index=IGNORE)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(gh, h.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, w.grad, atol=1e-5, rtol=1e-5)
    assert gh[::3].abs().max() == 0


def test_loss_of_only_ignored_targets_is_zero_with_zero_gradients():
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((6,), IGNORE))
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0
