"""camelid: LLaMA in PyTorch (Touvron et al., 2023).

    import camelid, torch
    llm = camelid.load("model.gguf", device="cpu", dtype=torch.float32)
    print(llm.generate("The capital of France is", max_new_tokens=16, temperature=0.0))
"""

from __future__ import annotations

import os

import torch

from camelid.errors import CamelidError

__version__ = "0.1.0"
__all__ = ["CamelidError", "LLM", "load", "__version__"]


def load(path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         quantize: str | None = None, compile: bool = True, progress: bool = False,
         group_size: int | None = None, adapter: str | os.PathLike[str] | None = None) -> "LLM":
    """Load a checkpoint as an LLM: a GGUF file, a Hugging Face model directory, a Meta directory
    (params.json + consolidated.*.pth), a camelid checkpoint directory, or a known model name.

    quantize: None, "int8" or "int4" (weight-only; int4 in groups of `group_size`, 32 by default;
    a quantized camelid checkpoint loads quantized as saved). compile: decode with compiled steps where
    that works (the default; False decodes eagerly): a long generation compiles its step in the
    background while it decodes, and later runs load it from ~/.cache/camelid/compiled.

    adapter: a LoRA adapter directory in Hugging Face PEFT's layout (adapter_config.json +
    adapter_model.safetensors, from `camelid finetune` or PEFT), applied unmerged; with
    `quantize` it runs over the quantized layers."""
    from camelid.generate import LLM

    model, tokenizer, source = load_model(path, device, dtype, quantize, group_size, adapter, progress)
    return LLM(model, tokenizer, source=str(source), compile=compile)


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               quantize: str | None = None, group_size: int | None = None,
               adapter: str | os.PathLike[str] | None = None, progress: bool = False, scorer: bool = False):
    """(model, tokenizer, checkpoint path): the weights and tokenizer `load` reads, with the same
    arguments, for a language model, or with `scorer` for a scorer (ModelConfig.num_labels > 0,
    a reward model: `camelid.align.reward_model.RewardModel.load`). The other kind is refused
    before any weight is read."""
    from camelid.checkpoint import build_model, read_checkpoint

    if quantize not in (None, "int8", "int4"):
        raise CamelidError(f"quantize={quantize!r}: choose None, 'int8' or 'int4'")
    ckpt = read_checkpoint(path)
    if ckpt.tokenizer is None:
        raise CamelidError(f"{ckpt.path}: no tokenizer found beside the weights (tokenizer.model or tokenizer.json)")
    labels = ckpt.config.num_labels
    if labels and not scorer:
        raise CamelidError(f"{ckpt.path}: a reward model (a scoring head of {labels} label(s)), not a language "
                           "model: it scores text but does not generate; score with `camelid reward` or "
                           "camelid.align.reward_model.RewardModel.load")
    if scorer and not labels:
        raise CamelidError(f"{ckpt.path}: a language model (its head gives {ckpt.config.vocab_size} logits per "
                           "token), not a reward model; give a scorer (LlamaForSequenceClassification, or a "
                           "camelid finetune run with model.objective = \"reward\")")
    if adapter is not None:  # read and checked against the config before the weights load
        from camelid.lora import read_adapter

        settings, state = read_adapter(adapter, ckpt.config)
        state = {k: v.to(device) for k, v in state.items()}
    if quantize is None and "quantization" in ckpt.details:  # a quantized checkpoint loads as saved
        quantize = ckpt.details["quantization"]["scheme"]
    if quantize is None:
        model = build_model(ckpt, dtype=dtype, device=device, progress=progress)
    else:
        from camelid.checkpoint import build_quantized_model
        model = build_quantized_model(ckpt, quantize, group_size, dtype=dtype, device=device, progress=progress)
    if adapter is not None:
        from camelid.lora import adapter_dtype, apply_lora, load_adapter_state

        apply_lora(model, settings, dtype=adapter_dtype(state))
        load_adapter_state(model, state, str(adapter))
        model.requires_grad_(False)
    return model, ckpt.tokenizer, ckpt.path


def __getattr__(name: str):
    if name == "LLM":
        from camelid.generate import LLM
        return LLM
    raise AttributeError(name)
