"""LoRA as a module swap (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A target linear layer W (frozen) becomes `LoRALinear`: y = W x + scaling * B A dropout(x), with
A [rank, in] initialised as PEFT does (kaiming-uniform, a = sqrt(5), which is also nn.Linear's
default) and B [out, rank] zero, so that the adapted model starts out equal to the base. The
scaling is alpha / rank, or alpha / sqrt(rank) with rsLoRA (Kalajdzievski 2023, "A Rank
Stabilization Scaling Factor for Fine-Tuning with LoRA"). The model file is unchanged.

QLoRA (Dettmers et al. 2023): the base may be a camelid.quant QuantizedLinear (int8/int4), whose
own backward (camelid.quant.layers.DequantizedProduct) dequantizes its weight again a block of
output rows at a time: no float copy of a whole layer lives longer than one block, and the codes,
being buffers, get no gradient.
"""

from __future__ import annotations

import dataclasses
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from camelid.checkpoint.names import rename
from camelid.errors import CamelidError
from camelid.quant import QuantizedLinear, swap

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
_PARENT = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
           "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}

@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    rslora: bool = False  # scaling alpha/sqrt(rank) (Kalajdzievski 2023) instead of alpha/rank

    @property
    def scaling(self) -> float:
        return scaling(self.rank, self.alpha, self.rslora)

    def check(self, where: str = "lora") -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise CamelidError(f"{where}.rank {self.rank!r}: must be an integer >= 1")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise CamelidError(f"{where}.alpha {self.alpha!r}: must be a number > 0")
        if not 0 <= self.dropout < 1:
            raise CamelidError(f"{where}.dropout {self.dropout!r}: must be in [0, 1)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise CamelidError(f"{where}.targets {list(self.targets)}: "
                               f"{'unknown target(s) ' + str(unknown) if unknown else 'empty'}; "
                               f"choose among {', '.join(TARGETS)}")

    # what one module gets: the same for all here; adapters read from PEFT files may differ per module
    def modules(self, n_layers: int) -> list[str]:
        """The camelid names of the layers these settings adapt in a model of `n_layers` blocks."""
        names = []
        for i in range(n_layers):
            names += [f"layers.{i}.{_PARENT[t]}.{t}" for t in self.targets if t != "output"]
        return names + (["output"] if "output" in self.targets else [])

    def rank_of(self, module: str) -> int:
        return self.rank

    def alpha_of(self, module: str) -> float:
        return self.alpha


@dataclass
class AdapterSettings(LoraSettings):
    """Settings of an adapter read from a PEFT directory: exactly which modules it adapts (PEFT's
    `layers_to_transform` or a regular-expression `target_modules` may select some layers only)
    and per-module ranks and alphas (PEFT's `rank_pattern` / `alpha_pattern`), by camelid name."""

    only: tuple[str, ...] = ()
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)

    def modules(self, n_layers: int) -> list[str]:
        return list(self.only) if self.only else super().modules(n_layers)

    def rank_of(self, module: str) -> int:
        return self.ranks.get(module, self.rank)

    def alpha_of(self, module: str) -> float:
        return self.alphas.get(module, self.alpha)


def scaling(rank: int, alpha: float, rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)


def hf_module(module: str) -> str:
    """camelid module name -> the Hugging Face LlamaForCausalLM one ("layers.0.attention.wq" ->
    "model.layers.0.self_attn.q_proj", "output" -> "lm_head")."""
    return rename(module + ".weight", "camelid", "hf").removesuffix(".weight")


def pattern_value(patterns: dict, module: str):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of the module's
    Hugging Face name after a dot (peft `get_pattern_key`), else None."""
    name = hf_module(module)
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


class LoRALinear(nn.Module):
    """A frozen `base` (bias-free nn.Linear or QuantizedLinear) plus a trainable low-rank update,
    left out while `disabled` (see `adapters_disabled`)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dtype: torch.dtype | None = None, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = scaling(rank, alpha, rslora)
        device = base.weight.device
        dtype = dtype or torch.float32
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.disabled = False   # adapters_disabled: the base's output alone
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_B.weight)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.disabled:
            return y
        a = self.lora_A.weight
        update = self.lora_B(self.lora_A(self.dropout(x).to(a.dtype)))
        return y + (update * self.scaling).to(y.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W + scaling B A, differentiable in A and B (for code that takes a
        layer's weight rather than calling it, such as a loss computed from the head's weight;
        dropout does not apply there). A float base only: a quantized one has no float weight
        to add to, and materialising one is what QLoRA avoids."""
        if isinstance(self.base, QuantizedLinear):
            raise CamelidError("a LoRA layer over a quantized base has no float weight; call the layer instead")
        w = self.base.weight
        if self.disabled:
            return w
        return w + (self.scaling * (self.lora_B.weight @ self.lora_A.weight)).to(w.dtype)

    def delta(self) -> torch.Tensor:
        """scaling * B A in fp32, [out, in]."""
        return self.scaling * (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float())


# ---- the model-level operations -----------------------------------------------------------------

def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every LoRALinear of `model` gives its base's output: the model is its
    frozen base again, without a second copy (the reference policy of DPO and RLHF). The
    adapters, their gradients and the optimizer state are left as they are."""
    layers = list(lora_layers(model).values())
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, state in zip(layers, before):
            m.disabled = state


def apply_lora(model: nn.Module, settings: LoraSettings, dtype: torch.dtype | None = None,
               seed: int | None = None) -> nn.Module:
    """In place: each target linear layer becomes a LoRALinear; only adapter parameters require
    grad afterwards."""
    settings.check()
    model.requires_grad_(False)
    generator = None
    for name in settings.modules(len(model.layers)):
        layer = _target_layer(model, name)
        rank = settings.rank_of(name)
        if rank > min(layer.in_features, layer.out_features):
            raise CamelidError(f"lora.rank {rank}: larger than layer {name} allows "
                               f"([{layer.out_features}, {layer.in_features}]: at most "
                               f"{min(layer.in_features, layer.out_features)}); choose a smaller rank")
        if seed is not None and generator is None:
            generator = torch.Generator(device=layer.weight.device).manual_seed(seed)
        adapted = LoRALinear(layer, rank, settings.alpha_of(name), settings.dropout, settings.rslora,
                             dtype, generator)
        adapted.train(model.training)
        swap(model, name, adapted)
    for m in lora_layers(model).values():
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    return model


def _target_layer(model: nn.Module, name: str) -> nn.Module:
    if name == "output" and getattr(model, "output", 1) is None:
        # A tied head is F.linear(h, tok_embeddings.weight) with no module to wrap: give it an
        # nn.Linear that shares the embedding Parameter (frozen, one copy). `model.head` then
        # calls model.output; merge_lora turns it into an untied head of its own.
        emb = model.tok_embeddings.weight
        with torch.device("meta"):
            head = nn.Linear(emb.shape[1], emb.shape[0], bias=False)
        head.weight = emb
        return head
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise CamelidError(f"lora target {name}: the model has no such layer") from None
    if isinstance(layer, LoRALinear):
        raise CamelidError(f"lora target {name}: already has an adapter; merge it (merge_lora) first")
    if not (isinstance(layer, QuantizedLinear) or (type(layer) is nn.Linear and layer.bias is None)):
        raise CamelidError(f"lora target {name}: a {type(layer).__name__}, not a bias-free linear layer")
    return layer


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights by camelid name ("layers.0.attention.wq.lora_A.weight" [rank, in],
    "...lora_B.weight" [out, rank]), Meta's q/k layout."""
    state = {}
    for name, m in lora_layers(model).items():
        state[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return state


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy `state` (adapter_state's names) into the model's adapters; every mismatch is an error
    naming `where`."""
    own = adapter_state(model)
    score = getattr(model, "output", None)
    if "output.weight" in state and type(score) is nn.Linear and getattr(model, "config", None) is not None \
            and model.config.num_labels:
        own["output.weight"] = score.weight   # a reward model's score head, saved whole beside the adapters
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = ([f"missing adapter weights {_brief(missing)}"] if missing else []) + \
                ([f"weights for layers the model has no adapter on {_brief(unexpected)}"] if unexpected else [])
        raise CamelidError(f"{where}: " + "; ".join(parts) + "; the adapter does not match this model's LoRA settings")
    for name, t in state.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise CamelidError(f"{where}: tensor {name} has shape {list(t.shape)} but the model's adapter is "
                               f"{list(own[name].shape)}")
    with torch.no_grad():
        for name, t in state.items():
            own[name].copy_(t)


def merge_lora(model: nn.Module) -> nn.Module:
    """In place: every LoRALinear becomes an nn.Linear holding W + scaling * B A (in the base's
    dtype). A LoRA head over a tied embedding becomes a head of its own, and the model's config
    says `tie_embeddings=False` from then on: the embedding matrix stays as it was, and a
    checkpoint written from the merged model has an `output.weight`."""
    for name, m in lora_layers(model).items():
        if isinstance(m.base, QuantizedLinear):
            raise CamelidError(f"merge_lora: layer {name} has a quantized base; merge into the float model "
                               "(load it without quantize) and quantize the merged one")
    for name, m in lora_layers(model).items():
        w = m.base.weight.detach()
        merged = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
        merged.weight = nn.Parameter((w.float() + m.delta()).to(w.dtype), requires_grad=False)
        merged.train(m.training)
        swap(model, name, merged)
        if name == "output" and getattr(model, "config", None) is not None and model.config.tie_embeddings:
            model.config = dataclasses.replace(model.config, tie_embeddings=False)
    return model


def _brief(names: list[str], limit: int = 3) -> str:
    return "[" + ", ".join(names[:limit]) + (", ..." if len(names) > limit else "") + f"] ({len(names)})"
