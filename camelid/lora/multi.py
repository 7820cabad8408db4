"""Several LoRA adapters of one base at once, each row of a batch with its own adapter or none
(what `camelid serve --adapter NAME=DIR` needs: the request's `model` field picks the adapter).

    index = attach_adapters(model, {"chat": "adapters/chat", "sql": "adapters/sql"})  # {"chat": 0, "sql": 1}
    select_adapters(model, [index["chat"], -1, index["sql"]])  # once per step, all layers; -1: the base
    logits = model(tokens)                                      # tokens [3, T]: row 1 is the plain base

Every layer that some adapter targets becomes a `MultiLoRALinear` (a module swap, as LoRALinear
is) holding all K adapters stacked: A [K + 1, r, in] and B [K + 1, out, r], r the largest rank
among them, with each adapter's scaling folded into its B. Zeros add nothing, so a smaller rank
is padded with zeros, an adapter that does not target the layer is zeros there, and slot K, all
zeros, is the base: index -1 picks it with no special case. A row's update is its A and B
gathered by its index and applied with two batched products, the batched multi-adapter LoRA of
S-LoRA and Punica (Sheng et al. 2023, Chen et al. 2023) in plain torch; eagerly it is skipped
when no row uses an adapter.

The row -> adapter choice is one `AdapterSelection` shared by all layers: an index tensor of
fixed capacity (`max_rows`), written in place by `select_adapters`. Rows beyond those selected
use the base. Attach the adapters once the model is on its device and in its dtype.

Compiled decode steps (camelid.generate.compiled): `CompiledDecoder` copies the model sharing
every parameter and buffer, so its copy reads the very index tensor that `select_adapters`
writes in place, and a compiled step sees each step's selection (tests/test_lora_multi.py
checks this). Its capacity never changes, so the traced shapes stay valid. Inside a compiled
graph the update is always computed: a Python test for "does any row use an adapter?" would be
frozen into the graph, whose guards are off. Attach before `Engine.compile` (attaching swaps
layers, which makes the engine start its compiled steps afresh anyway).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from camelid.errors import CamelidError
from camelid.lora.layers import LoRALinear, _target_layer, scaling
from camelid.lora.peft import SCORE_NAME, read_adapter
from camelid.quant import swap


class AdapterSelection(nn.Module):
    """Which adapter each row of the next batch uses (-1: none), shared by every MultiLoRALinear
    of a model. A module, so that `model.to(...)` moves its index once for all layers."""

    def __init__(self, adapters: int, max_rows: int, device: torch.device):
        super().__init__()
        self.adapters, self.max_rows = adapters, max_rows
        # made outside inference mode so that it can be written in and out of it
        with torch.inference_mode(False):
            self.register_buffer("ids", torch.full((max_rows,), -1, dtype=torch.long, device=device),
                                 persistent=False)
        self.rows = 0          # how many rows the last selection named
        self.active = False    # whether any of them uses an adapter (eager forwards skip the update if not)

    def extra_repr(self) -> str:
        return f"adapters={self.adapters}, max_rows={self.max_rows}"

    def select(self, ids: Sequence[int] | torch.Tensor) -> None:
        """Row i of the next forward passes uses adapter ids[i] (-1: the base), written in place."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if len(ids) > self.max_rows:
            raise CamelidError(f"select_adapters: {len(ids)} rows, more than the {self.max_rows} the adapters were "
                               "attached for (attach_adapters' max_rows)")
        wrong = [i for i in ids if not -1 <= i < self.adapters]
        if wrong:
            raise CamelidError(f"select_adapters: adapter index {wrong[0]} does not exist; there are {self.adapters} "
                               f"adapters (0..{self.adapters - 1}) and -1 for none")
        with torch.no_grad():
            self.ids.fill_(-1)
            self.ids[:len(ids)] = torch.tensor(ids, dtype=torch.long)
        self.rows, self.active = len(ids), any(i >= 0 for i in ids)


class MultiLoRALinear(nn.Module):
    """A frozen `base` (bias-free nn.Linear or QuantizedLinear) plus, per row, the update of the
    adapter the shared `selection` names for that row."""

    def __init__(self, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, selection: AdapterSelection):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("lora_A", lora_A)  # [K + 1, r, in]
        self.register_buffer("lora_B", lora_B)  # [K + 1, out, r], scaling folded in; slot K zeros
        self.selection = selection

    def extra_repr(self) -> str:
        return f"adapters={self.lora_A.shape[0] - 1}, rank={self.lora_A.shape[1]}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        sel = self.selection
        rows = x.shape[0]
        if not torch.compiler.is_compiling():
            if not sel.active:
                return y
            if rows != sel.rows:  # a flattened batch (the head over [B*T, dim]) would pair rows wrongly
                raise CamelidError(f"adapters were selected for {sel.rows} rows but the batch has {rows}; "
                                   "call select_adapters with one entry per row")
        ids = sel.ids[:rows]
        a, b = self.lora_A[ids], self.lora_B[ids]                      # [B, r, in], [B, out, r]
        h = x.reshape(rows, -1, self.in_features).to(a.dtype)         # [B, T, in] (the head may get [B, in])
        update = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))   # [B, T, r] -> [B, T, out]
        return y + update.view(y.shape).to(y.dtype)


def multi_lora_layers(model: nn.Module) -> dict[str, MultiLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def attach_adapters(model: nn.Module, adapters: Mapping[str, str | Path], max_rows: int = 256) -> dict[str, int]:
    """In place: read each adapter directory (PEFT's layout; camelid's save_adapter writes it),
    checked against the model's config, and swap every layer any of them targets for a
    MultiLoRALinear. Returns each adapter's index for `select_adapters`, in the given order.
    `max_rows`: the most rows a batch may have."""
    if not adapters:
        raise CamelidError("attach_adapters: no adapters given")
    if multi_lora_layers(model) or any(isinstance(m, LoRALinear) for m in model.modules()):
        raise CamelidError("attach_adapters: the model already has adapters; attach all of them in one call, "
                           "to a model without any")
    read = []
    for name, directory in adapters.items():
        settings, state = read_adapter(directory, model.config)  # every shape checked against this base
        if SCORE_NAME in state:
            raise CamelidError(f"adapter {directory}: a reward model's adapter (it replaces the head with a score "
                               "head); only language-model adapters can be served side by side")
        read.append((settings, state))
    dtypes = {t.dtype for _, state in read for t in state.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    modules = sorted({key.rsplit(".lora_", 1)[0] for _, state in read for key in state})
    selection = None
    for module in modules:
        base = _target_layer(model, module)
        device, k = base.weight.device, len(read)
        rank = max(s.rank_of(module) for s, state in read if f"{module}.lora_A.weight" in state)
        a = torch.zeros(k + 1, rank, base.in_features, dtype=dtype, device=device)
        b = torch.zeros(k + 1, base.out_features, rank, dtype=dtype, device=device)
        for i, (settings, state) in enumerate(read):
            if f"{module}.lora_A.weight" in state:
                r = settings.rank_of(module)
                s = scaling(r, settings.alpha_of(module), settings.rslora)
                a[i, :r] = state[f"{module}.lora_A.weight"].to(dtype)
                b[i, :, :r] = (state[f"{module}.lora_B.weight"].float() * s).to(dtype)
        selection = selection or AdapterSelection(k, max_rows, device)
        swap(model, module, MultiLoRALinear(base, a, b, selection))
    return {name: i for i, name in enumerate(adapters)}


def adapter_selection(model: nn.Module) -> AdapterSelection | None:
    """The selection every MultiLoRALinear of `model` shares; None without attached adapters.
    Look it up once and `select` on it each step: this walks the whole model."""
    layer = next((m for m in model.modules() if isinstance(m, MultiLoRALinear)), None)
    return None if layer is None else layer.selection


def select_adapters(model: nn.Module, ids: Sequence[int] | torch.Tensor) -> None:
    """Row i of the next forward passes uses adapter ids[i] (attach_adapters' index; -1: the
    base), in every layer. Written in place into the index that all layers share."""
    selection = adapter_selection(model)
    if selection is None:
        raise CamelidError("select_adapters: the model has no adapters attached (attach_adapters)")
    selection.select(ids)
