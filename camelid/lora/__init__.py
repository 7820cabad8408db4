"""LoRA and QLoRA adapters as module swaps, saved and read in Hugging Face PEFT's layout.

    apply_lora(model, LoraSettings(rank=16, targets=("wq", "wv")))   # in place; only adapters train
    save_adapter(out_dir, settings, adapter_state(model), model.config)
    load_adapter(model, "adapter-dir", model.config)   # PEFT adapters trained elsewhere too
    merge_lora(model)                                   # W + scaling B A, back to plain nn.Linear
    with adapters_disabled(model): ...                  # the frozen base alone (a reference model)
    merged_checkpoint(read_checkpoint(base), "adapter-dir")   # lazily merged, for convert --adapter
    index = attach_adapters(model, {"chat": "dir-a", "sql": "dir-b"})   # several at once (serving)
    select_adapters(model, [index["chat"], -1])                          # per row of the next batch

Over a quantized model (camelid.quant) the same calls give QLoRA: the int8/int4 codes stay
frozen and untouched, and the base's backward goes through its dequantized weight in blocks.
"""

from camelid.lora.layers import (TARGETS, AdapterSettings, LoraSettings, LoRALinear,
                                 adapter_state, adapters_disabled, apply_lora, hf_module, load_adapter_state,
                                 lora_layers, merge_lora)
from camelid.lora.merge import merged_checkpoint
from camelid.lora.multi import (AdapterSelection, MultiLoRALinear, adapter_selection, attach_adapters,
                                multi_lora_layers, select_adapters)
from camelid.lora.peft import adapter_dtype, check_adapter_dir, load_adapter, read_adapter, save_adapter

__all__ = ["TARGETS", "AdapterSelection", "AdapterSettings", "LoRALinear", "LoraSettings", "MultiLoRALinear",
           "adapter_dtype", "adapter_selection", "adapter_state", "adapters_disabled", "apply_lora", "attach_adapters",
           "check_adapter_dir", "hf_module", "load_adapter", "load_adapter_state", "lora_layers", "merge_lora",
           "merged_checkpoint", "multi_lora_layers", "read_adapter", "save_adapter", "select_adapters"]
