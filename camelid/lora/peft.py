"""Adapters on disk in Hugging Face PEFT's layout, which `peft.PeftModel.from_pretrained` loads
over the Hugging Face export of the base, and adapters trained with PEFT elsewhere.

A directory holds `adapter_config.json` (peft_type "LORA", r, lora_alpha, lora_dropout,
use_rslora, target_modules in Hugging Face names, ...) and `adapter_model.safetensors` with keys
"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" [r, in], "...lora_B.weight"
[out, r], "base_model.model.lm_head.lora_A.weight". PEFT strips the adapter name when it saves;
files written by other tools may keep it ("lora_A.default.weight"): both are read.

Hugging Face permutes the rows of q_proj/k_proj so that RoPE rotates halves, where camelid keeps
Meta's adjacent pairs (checkpoint/names.py). The update B A of q/k must be permuted the same way:
its rows are B's rows, so lora_B is permuted (with n_kv_heads for k) and lora_A, on the input
side, is not.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from camelid.atomic import atomic_dir
from camelid.checkpoint.names import expected_shapes, hf_to_meta_qk, meta_to_hf_qk, qk_heads, rename
from camelid.config import ModelConfig
from camelid.errors import CamelidError
from camelid.lora.layers import (TARGETS, AdapterSettings, LoraSettings, apply_lora, hf_module, load_adapter_state,
                                 pattern_value)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"  # older PEFT versions
PREFIX = "base_model.model."
HF_TARGETS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj",
              "w3": "up_proj", "output": "lm_head"}
CAMELID_TARGETS = {v: k for k, v in HF_TARGETS.items()}
SCORE = "score"                     # LlamaForSequenceClassification's head, a PEFT modules_to_save entry
SCORE_KEY = f"{PREFIX}{SCORE}.weight"
SCORE_NAME = "output.weight"        # ... by its camelid name
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")

# adapter_config.json fields whose non-default values change what the adapter computes in ways
# camelid does not implement: refused by name rather than silently ignored
_REFUSED = {
    "use_dora": (False, "DoRA (use_dora) adapters are not supported; camelid applies plain LoRA"),
    "fan_in_fan_out": (False, "fan_in_fan_out applies to GPT-2-style Conv1D layers, which LLaMA does not have"),
    "lora_bias": (False, "LoRA biases (lora_bias) are not supported"),
    "modules_to_save": (None, "modules_to_save (fully trained extra modules) is not supported; "
                              "merge the adapter with PEFT and convert the merged model instead"),
    "trainable_token_indices": (None, "trainable_token_indices is not supported"),
    "layer_replication": (None, "layer_replication is not supported"),
    "target_parameters": (None, "target_parameters is not supported"),
    "use_qalora": (False, "QA-LoRA (use_qalora) is not supported"),
    "exclude_modules": (None, "exclude_modules is not supported; list the target modules instead"),
}


# ---- writing ------------------------------------------------------------------------------------

def save_adapter(directory, settings: LoraSettings, state: dict[str, torch.Tensor], config: ModelConfig,
                 base_model: str = "", overwrite: bool = True) -> Path:
    """Write `state` (adapter_state's camelid names, Meta layout) as a PEFT adapter directory,
    atomically (built beside `directory`, then renamed over it). A scorer's head (config.num_labels,
    a reward model), trained whole beside the adapters, is `state["output.weight"]`: PEFT's
    `modules_to_save` entry `score`, the name of LlamaForSequenceClassification's head."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    state = dict(state)
    score = state.pop(SCORE_NAME, None)
    if score is not None:
        if not config.num_labels or tuple(score.shape) != (config.num_labels, config.dim):
            raise CamelidError(f"save_adapter: {SCORE_NAME} {list(score.shape)} is not the score head of this model "
                               f"(num_labels {config.num_labels}, dim {config.dim})")
        tensors[SCORE_KEY] = score.detach().contiguous().cpu()
    for name, t in state.items():
        m = _KEY.match(name)
        hf = m and rename(m["module"] + ".weight", "camelid", "hf")
        if hf is None or m["module"].rpartition(".")[2] not in TARGETS:
            raise CamelidError(f"save_adapter: {name} is not an adapter weight (adapter_state's names)")
        module = m["module"]
        heads = qk_heads(module + ".weight", config)
        if m["ab"] == "B" and heads:
            t = meta_to_hf_qk(t, heads)
        tensors[f"{PREFIX}{hf_module(module)}.lora_{m['ab']}.weight"] = t.detach().contiguous().cpu()
        if module not in modules:
            modules.append(module)
    cfg = _peft_config(settings, modules, config, base_model)
    if score is not None:
        cfg.update(task_type="SEQ_CLS", modules_to_save=[SCORE])
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    return directory


def _peft_config(settings: LoraSettings, modules: list[str], config: ModelConfig, base_model: str) -> dict:
    kinds = [t for t in TARGETS if any(m.rpartition(".")[2] == t for m in modules)]
    every = LoraSettings(targets=tuple(kinds)).modules(config.n_layers) if kinds else []
    target_modules: list[str] | str = sorted(HF_TARGETS[k] for k in kinds)
    if sorted(modules) != sorted(every):  # some layers only: PEFT full-matches a string as a regex
        target_modules = "(" + "|".join(re.escape(hf_module(m)) for m in modules) + ")"
    ranks = {re.escape(hf_module(m)): settings.rank_of(m) for m in modules if settings.rank_of(m) != settings.rank}
    alphas = {re.escape(hf_module(m)): settings.alpha_of(m) for m in modules
              if settings.alpha_of(m) != settings.alpha}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "use_rslora": settings.rslora, "target_modules": target_modules, "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": ranks, "alpha_pattern": alphas,
        "use_dora": False, "inference_mode": True, "revision": None,
    }


# ---- reading ------------------------------------------------------------------------------------

def check_adapter_dir(directory) -> dict:
    """The parsed adapter_config.json of an adapter directory, checked for everything that can be
    checked without the base model (the CLI calls it before loading the model)."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file, not an adapter directory" if directory.exists() else "no such directory"
        raise CamelidError(f"adapter {directory}: {what}; give a directory with {CONFIG} and {WEIGHTS}")
    path = directory / CONFIG
    if not path.is_file():
        raise CamelidError(f"adapter {directory}: no {CONFIG}; not a PEFT adapter directory")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CamelidError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CamelidError(f"{path}: not a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise CamelidError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported; camelid reads LORA adapters")
    for key, (default, why) in _REFUSED.items():
        if key == "modules_to_save" and cfg.get(key) == [SCORE]:
            continue   # a reward model's head, trained whole beside the adapters: read as such
        if cfg.get(key) not in (default, None, [], {}, False):
            raise CamelidError(f"{path}: {key}={cfg[key]!r}: {why}")
    if cfg.get("bias", "none") != "none":
        raise CamelidError(f"{path}: bias={cfg['bias']!r} is not supported (LLaMA has no biases); only \"none\"")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise CamelidError(f"{path}: r {r!r} must be an integer >= 1")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise CamelidError(f"{path}: lora_alpha {alpha!r} must be a number > 0")
    dropout = cfg.get("lora_dropout") or 0.0
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise CamelidError(f"{path}: lora_dropout {dropout!r} must be a number in [0, 1)")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and (key != "rank_pattern" or
                                                                                     float(v).is_integer())
                for v in pattern.values()):
            raise CamelidError(f"{path}: {key} must map module patterns to "
                               f"{'ranks (integers >= 1)' if key == 'rank_pattern' else 'alphas (numbers > 0)'}")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        unknown = [t for t in targets if str(t).rpartition(".")[2] not in CAMELID_TARGETS]
        if unknown:
            raise CamelidError(f"{path}: target_modules {unknown}: the base (LLaMA) has no such LoRA target; "
                               f"camelid adapts {', '.join(CAMELID_TARGETS)}")
    elif not isinstance(targets, str):
        raise CamelidError(f"{path}: target_modules must be a list of module names or a regular expression")
    if not any((directory / f).is_file() for f in (WEIGHTS, WEIGHTS_BIN)):
        raise CamelidError(f"adapter {directory}: no {WEIGHTS}; the adapter's weights are missing")
    return cfg


def _load_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    path = directory / WEIGHTS
    try:
        if path.is_file():
            return load_file(str(path)), path
        path = directory / WEIGHTS_BIN
        return torch.load(path, map_location="cpu", weights_only=True), path
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CamelidError(f"{path}: cannot read the adapter weights ({e}); the file may be truncated") from None


def read_adapter(directory, config: ModelConfig) -> tuple[AdapterSettings, dict[str, torch.Tensor]]:
    """The adapter's settings and weights by camelid name, in Meta's q/k layout, checked against
    the base's `config`: every mistake names the file and the tensor or field."""
    directory = Path(directory)
    cfg = check_adapter_dir(directory)
    cfg_path = directory / CONFIG
    raw, wpath = _load_tensors(directory)
    score = _score_head(raw, cfg, config, cfg_path, wpath)
    found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in raw.items():
        if _embedding_copy(key, t, config, wpath):
            continue
        module = _module_of(key, config, wpath)
        m = _KEY.match(key)
        found.setdefault(module, {})[m["ab"]] = (key, t)
    if not found:
        raise CamelidError(f"{wpath}: holds no LoRA weights")
    shapes = expected_shapes(config)
    r, alpha = cfg["r"], float(cfg.get("lora_alpha", 8))
    ranks, alphas = {}, {}
    for module in found:
        rank = pattern_value(cfg.get("rank_pattern") or {}, module) or r
        a = pattern_value(cfg.get("alpha_pattern") or {}, module) or alpha
        if rank != r:
            ranks[module] = int(rank)
        if a != alpha:
            alphas[module] = float(a)
    state: dict[str, torch.Tensor] = {}
    for module, parts in found.items():
        out, inp = shapes.get(module + ".weight", (config.vocab_size, config.dim))  # a tied head: the embedding's
        rank = ranks.get(module, r)
        if rank > min(out, inp):
            raise CamelidError(f"{cfg_path}: r {rank} is larger than {hf_module(module)} [{out}, {inp}] allows "
                               f"(at most {min(out, inp)})")
        for ab, want in (("A", (rank, inp)), ("B", (out, rank))):
            if ab not in parts:
                raise CamelidError(f"{wpath}: no lora_{ab} weight for {hf_module(module)} (it has lora_"
                                   f"{'B' if ab == 'A' else 'A'}); the file is incomplete")
            key, t = parts[ab]
            if tuple(t.shape) != want or not t.is_floating_point():
                raise CamelidError(f"{wpath}: tensor {key} has shape {list(t.shape)} ({t.dtype}) but "
                                   f"{hf_module(module)} of this base with rank {rank} needs {list(want)}; "
                                   "was the adapter trained on another model?")
            heads = qk_heads(module + ".weight", config)
            state[f"{module}.lora_{ab}.weight"] = hf_to_meta_qk(t, heads) if ab == "B" and heads else t
    targets = tuple(t for t in TARGETS if any(m.rpartition(".")[2] == t for m in found))
    settings = AdapterSettings(rank=r, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0), targets=targets,
                               rslora=bool(cfg.get("use_rslora", False)), ranks=ranks, alphas=alphas)
    every = settings.modules(config.n_layers)
    if sorted(every) != sorted(found):  # some layers only (layers_to_transform, a regex)
        settings.only = tuple(m for m in every if m in found)
    if score is not None:
        state[SCORE_NAME] = score
    return settings, state


def _score_head(raw: dict[str, torch.Tensor], cfg: dict, config: ModelConfig, cfg_path: Path,
                wpath: Path) -> torch.Tensor | None:
    """A reward-model adapter's score head (modules_to_save ["score"]), taken out of `raw`; None
    for an adapter without one."""
    t = raw.pop(SCORE_KEY, None)
    if cfg.get("modules_to_save") != [SCORE]:
        if t is not None:
            raise CamelidError(f"{wpath}: tensor {SCORE_KEY} is a score head, but {cfg_path} does not list "
                               f"modules_to_save [\"{SCORE}\"]; the adapter is inconsistent")
        return None
    if t is None:
        raise CamelidError(f"{wpath}: no {SCORE_KEY}, though {cfg_path} lists modules_to_save [\"{SCORE}\"]; "
                           "the file is incomplete")
    if not config.num_labels:
        raise CamelidError(f"{cfg_path}: a reward model's adapter (its score head is modules_to_save "
                           f"[\"{SCORE}\"]) over a language model; load it over a base with a score head")
    if tuple(t.shape) != (config.num_labels, config.dim) or not t.is_floating_point():
        raise CamelidError(f"{wpath}: tensor {SCORE_KEY} has shape {list(t.shape)} but this model's score head is "
                           f"[{config.num_labels}, {config.dim}]; was the adapter trained on another model?")
    return t


_EMBEDDINGS = re.compile(r"^base_model\.model\.(model\.embed_tokens|lm_head)(\.base_layer)?\.weight$")


def _embedding_copy(key: str, t: torch.Tensor, config: ModelConfig, wpath: Path) -> bool:
    """Whether `key` is the full embedding or head matrix that PEFT saves beside the adapter when
    lm_head or embed_tokens is a target (`save_embedding_layers`). LoRA leaves them frozen, so they
    are the base's own, skipped here; one of another shape means a resized vocabulary."""
    if not _EMBEDDINGS.match(key):
        return False
    if tuple(t.shape) != (config.vocab_size, config.dim):
        raise CamelidError(f"{wpath}: tensor {key} has shape {list(t.shape)} but the base's vocabulary and width "
                           f"are [{config.vocab_size}, {config.dim}]; was the vocabulary resized for the adapter?")
    return True


def _module_of(key: str, config: ModelConfig, wpath: Path) -> str:
    """The camelid module a PEFT tensor key adapts ("base_model.model.model.layers.0.self_attn.
    q_proj.lora_A.weight" -> "layers.0.attention.wq"), or the error that names the tensor."""
    if "lora_magnitude_vector" in key:
        raise CamelidError(f"{wpath}: tensor {key} is a DoRA magnitude; DoRA adapters are not supported")
    if "lora_embedding_" in key:
        raise CamelidError(f"{wpath}: tensor {key} adapts an embedding; camelid adapts only "
                           f"{', '.join(CAMELID_TARGETS)}")
    m = _KEY.match(key)
    if m is None or not key.startswith(PREFIX):
        raise CamelidError(f"{wpath}: tensor {key} is not a PEFT LoRA weight of a causal LM "
                           f"(base_model.model.<module>.lora_A/lora_B.weight)")
    hf = m["module"].removeprefix(PREFIX)
    if hf.startswith("layers."):  # saved from a PeftModel over the bare LlamaModel
        hf = "model." + hf
    module = (rename(hf + ".weight", "hf", "camelid") or "").removesuffix(".weight")
    if module.rpartition(".")[2] not in TARGETS:
        raise CamelidError(f"{wpath}: tensor {key} adapts {hf}, which is not a LoRA target of a LLaMA model; "
                           f"camelid adapts {', '.join(CAMELID_TARGETS)}")
    if module.startswith("layers.") and int(module.split(".")[1]) >= config.n_layers:
        raise CamelidError(f"{wpath}: tensor {key} adapts layer {module.split('.')[1]} but the base has "
                           f"{config.n_layers} layers")
    return module


def load_adapter(model, directory, config: ModelConfig | None = None):
    """read_adapter + apply_lora + load_adapter_state: the adapter applied unmerged, in the dtype
    it was saved in (float32 where that is not a float type)."""
    settings, state = read_adapter(directory, config or model.config)
    apply_lora(model, settings, dtype=adapter_dtype(state))
    load_adapter_state(model, state, str(Path(directory) / WEIGHTS))
    return model


def adapter_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype the adapter was saved in, float32 when its tensors differ."""
    dtypes = {t.dtype for t in state.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32
