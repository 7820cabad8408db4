"""A checkpoint with an adapter merged in, lazily: each weight is read and, where the adapter
touches it, merged (W + scaling B A, computed in fp32, stored in W's dtype) only when a writer
asks for it, so `camelid convert BASE OUT --adapter DIR` holds one tensor at a time."""

from __future__ import annotations

import dataclasses

import torch

from camelid.checkpoint.base import Checkpoint
from camelid.lora.layers import scaling
from camelid.lora.peft import read_adapter


def merged_checkpoint(ckpt: Checkpoint, adapter_dir) -> Checkpoint:
    settings, state = read_adapter(adapter_dir, ckpt.config)
    modules = {k.rsplit(".lora_", 1)[0] for k in state}

    def delta(module: str) -> torch.Tensor:
        rank, alpha = settings.rank_of(module), settings.alpha_of(module)
        a, b = state[f"{module}.lora_A.weight"].float(), state[f"{module}.lora_B.weight"].float()
        return scaling(rank, alpha, settings.rslora) * (b @ a)

    config, names = ckpt.config, list(ckpt.names)
    tied_head = "output" in modules and config.tie_embeddings
    if tied_head:
        # the adapted head is no longer the embedding: the merged model is untied, with a head of its own
        config = dataclasses.replace(config, tie_embeddings=False)
        names.append("output.weight")

    def read(name: str) -> torch.Tensor:
        module = name.removesuffix(".weight")
        w = ckpt.read("tok_embeddings.weight" if tied_head and name == "output.weight" else name)
        if module not in modules:
            return w
        return (w.float() + delta(module)).to(w.dtype)

    def read_quantized(name: str):
        # stored codes stay valid only for the weights the adapter does not change
        return None if name.removesuffix(".weight") in modules else ckpt.read_quantized(name)

    details = {k: v for k, v in ckpt.details.items() if k != "quantization"} if modules else dict(ckpt.details)
    return dataclasses.replace(ckpt, config=config, names=names, read=read, read_quantized=read_quantized,
                               details={**details, "adapter": str(adapter_dir)})
