"""Rollouts: prompts in, sampled completions and their per-token figures out.

- Prompts come from the instruction or preference files of [data] (the prompt part of each
  record) or data.builtin, rendered with the policy's chat template and a generation prompt.
- Completions are sampled with camelid's generation core (`camelid.generate`: one prefill, then
  decode steps over the KV cache, compiled where the engine was told to), seeded, each ending at
  a stop token (EOS or end-of-turn, kept as the completion's last token, so that stopping is
  learnt too) or after max_new_tokens.
- `Sequences` lays prompt + completion rows out for one batched forward, and `token_figures`
  gives, from that forward, each sampled token's log-prob (and the policy's entropy there, and
  the value head's estimate before it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from camelid.errors import CamelidError
from camelid.finetune.data import split_heldout
from camelid.finetune.records import KEYS, Messages, load_hf_dataset, read_file
from camelid.generate.core import Engine
from camelid.generate.engine import Stats, TokenGenerator
from camelid.generate.sampling import SamplingParams
from camelid.tokenizer import Tokenizer
from camelid.tokenizer.chat import ROLES

# ---- prompts ---------------------------------------------------------------------------------------


def prompt_messages(record: dict, where: str, fmt: str = "auto") -> Messages:
    """The prompt part of one record: {"prompt": text or messages} (with or without a
    completion, or chosen and rejected: preference data), {"messages": [...]} up to its last
    assistant turn (all of it when it has none), or Alpaca's instruction and input."""
    record = {k: v for k, v in record.items() if v is not None}
    if fmt != "auto" and not all(k in record for k in KEYS[fmt][:1]):
        raise CamelidError(f"{where}: no {KEYS[fmt][0]!r} field, which data.format = {fmt!r} asks for")
    if "prompt" in record:
        prompt = record["prompt"]
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    elif "messages" in record:
        messages = record["messages"]
        if isinstance(messages, list) and not ("chosen" in record and "rejected" in record):
            turns = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
            messages = messages[:turns[-1]] if turns else messages
    elif "instruction" in record:
        text, extra = record["instruction"], record.get("input") or ""
        both = isinstance(text, str) and isinstance(extra, str) and extra.strip()
        messages = [{"role": "user", "content": f"{text}\n\n{extra}" if both else text}]
    else:
        raise CamelidError(f"{where}: no prompt in a record with keys {sorted(record)}; expected \"prompt\", "
                           "\"messages\" or \"instruction\"")
    return check_prompt(messages, where)


def check_prompt(messages: object, where: str) -> Messages:
    if not isinstance(messages, list) or not messages:
        raise CamelidError(f"{where}: the prompt is empty; give a non-empty text or list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise CamelidError(f"{where}: prompt message {i} is not a {{\"role\", \"content\"}} object with a "
                               f"role among {', '.join(ROLES)} and a string content")
        if not m["content"].strip():
            raise CamelidError(f"{where}: prompt message {i} ({m['role']}) is empty; fill it in or remove the record")
    if messages[-1]["role"] == "assistant":
        raise CamelidError(f"{where}: the prompt ends with an assistant turn; it must end with what the policy "
                           "answers (a user message)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_prompts(path: str | Path, fmt: str = "auto") -> list[Messages]:
    return read_file(path, lambda rows: [prompt_messages(r, w, fmt) if isinstance(r, dict) else _not_object(w, r)
                                         for w, r in rows])


def _not_object(where: str, record) -> Messages:
    raise CamelidError(f"{where}: expected a JSON object, got {type(record).__name__}")


def load_prompts(cfg, tokenizer: Tokenizer, run_dir: Path) -> tuple[list[list[int]], list[list[int]], dict, list]:
    """Training and validation prompts as token ids, each rendered with the chat template and the
    assistant's generation prompt; those longer than data.seq_len - rl.max_new_tokens are left
    out (counted in the report); and data.builtin's held-out evaluation tasks."""
    d, rl = cfg.data, cfg.rl
    tasks: list[str] = []
    if d.builtin:
        from camelid.finetune.quiz import build_quiz

        files = build_quiz(run_dir / "data", seed=cfg.train.seed)
        train, val = read_prompts(files["train"]), read_prompts(files["val"])
        tasks = [str(files["heldout"]), str(files["heldout-answers"])]
    elif d.hf_dataset:
        train = [prompt_messages({"messages": m}, f"{d.hf_dataset} record {i + 1}")
                 for i, m in enumerate(load_hf_dataset(d.hf_dataset, d.hf_split, d.hf_subset or None))]
        val = []
    else:
        train = [m for f in d.train for m in read_prompts(f, d.format)]
        val = [m for f in d.val for m in read_prompts(f, d.format)]
    if not val:
        train, val = split_heldout(train, d.val_fraction, cfg.train.seed)
    room = d.seq_len - rl.max_new_tokens
    report = {"seq_len": d.seq_len, "packing": False, "max_prompt_tokens": room}
    out = []
    for name, conversations in (("train", train), ("val", val)):
        ids = [tokenizer.encode_chat(m, add_generation_prompt=True) for m in conversations]
        kept = [p for p in ids if len(p) <= room]
        report[name] = {"kept": len(kept), "truncated": 0, "dropped": len(ids) - len(kept)}
        out.append(kept)
    if not out[0]:
        raise CamelidError(f"data: no training prompt fits in data.seq_len - rl.max_new_tokens = {room} tokens; raise "
                           "data.seq_len or lower rl.max_new_tokens")
    return out[0], out[1], report, tasks


class PromptLoader:
    """The training prompts, `batch` per rollout, in a fresh random order every epoch (a pure
    function of seed and epoch); the state is two integers and resumes exactly."""

    def __init__(self, prompts: list[list[int]], batch: int, seed: int):
        self.prompts, self.batch, self.seed = prompts, batch, seed
        self.epoch, self.row = 0, 0

    def order(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch, 23]).permutation(len(self.prompts)).tolist()

    def next_batch(self) -> list[list[int]]:
        out = []
        while len(out) < self.batch:
            if self.row >= len(self.prompts):
                self.epoch, self.row = self.epoch + 1, 0
            out.append(self.prompts[self.order(self.epoch)[self.row]])
            self.row += 1
        return out

    def _fingerprint(self) -> dict:
        return {"prompts": len(self.prompts), "tokens": sum(len(p) for p in self.prompts)}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row, **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if {k: state.get(k) for k in self._fingerprint()} != self._fingerprint():
            raise CamelidError(f"the checkpoint's prompts ({state.get('prompts')} prompts of {state.get('tokens')} "
                               f"tokens) are not these ({len(self.prompts)}): the data or data.seq_len changed since")
        self.epoch, self.row = state["epoch"], state["row"]


# ---- sampling ----------------------------------------------------------------------------------------

def sample_completions(engine: Engine, prompts: list[list[int]], params: SamplingParams, stop_ids: frozenset[int],
                       seed: int, pad_id: int = 0) -> tuple[list[list[int]], Stats]:
    """One completion per prompt (rows of one batch), drawn with a generator seeded by `seed`
    (so the same weights give the same completions), and the generation's timings."""
    gen = TokenGenerator(engine, prompts, params.max_new_tokens, params, stop_ids, seed, pad_id=pad_id)
    out: list[list[int]] = [[] for _ in prompts]
    for step in gen:
        for row, token in enumerate(step):
            if token is not None:
                out[row].append(token)
    return out, gen.stats


# ---- one batched forward -------------------------------------------------------------------------------

@dataclass
class Sequences:
    """Prompt + completion rows, right-padded, and where each completion token is predicted."""

    tokens: torch.Tensor   # [N, L] prompt then completion, padded
    index: torch.Tensor    # [N, C] the slot whose hidden state predicts completion token j (its slot - 1)
    targets: torch.Tensor  # [N, C] the completion tokens (0 past a completion's end)
    mask: torch.Tensor     # [N, C] bool: a completion token

    @classmethod
    def of(cls, prompts: list[list[int]], completions: list[list[int]], pad_id: int = 0) -> "Sequences":
        if any(not c for c in completions):
            raise ValueError("every completion needs at least one token")
        width = max(len(p) + len(c) for p, c in zip(prompts, completions))
        span = max(len(c) for c in completions)
        tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        index = torch.zeros(len(prompts), span, dtype=torch.long)
        targets = torch.zeros(len(prompts), span, dtype=torch.long)
        mask = torch.zeros(len(prompts), span, dtype=torch.bool)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            tokens[i, :len(p) + len(c)] = torch.tensor(list(p) + list(c))
            index[i, :len(c)] = torch.arange(len(p) - 1, len(p) + len(c) - 1)
            targets[i, :len(c)] = torch.tensor(c)
            mask[i, :len(c)] = True
        return cls(tokens, index, targets, mask)

    def rows(self, which: torch.Tensor) -> "Sequences":
        """The rows `which`, cut to the width their longest needs."""
        mask = self.mask[which]
        span = int(mask.sum(-1).max())
        index = self.index[which, :span]
        width = int((index.max(-1).values + 2).max())
        return Sequences(self.tokens[which, :width], index, self.targets[which, :span], mask[:, :span])

    def to(self, device) -> "Sequences":
        return Sequences(*(t.to(device) for t in (self.tokens, self.index, self.targets, self.mask)))


@dataclass
class Figures:
    logp: torch.Tensor                  # [N, C] log-prob of each sampled token (0 where masked out)
    entropy: torch.Tensor | None        # [N, C] the policy's entropy at each sampled token
    values: torch.Tensor | None         # [N, C] the value head's estimate before each token


def token_figures(model: nn.Module, seq: Sequences, temperature: float, value_head: nn.Module | None = None,
                  entropy: bool = False) -> Figures:
    """One forward of `model` over `seq`: the log-probs of the sampled tokens under the
    distribution they were sampled from (logits / temperature), in float32. The head runs on the
    completion rows only."""
    hidden = model.hidden(seq.tokens)                                                       # [N, L, dim]
    h = hidden.gather(1, seq.index.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))          # [N, C, dim]
    rows = h[seq.mask]                                                                      # [n, dim]
    logprobs = torch.log_softmax(model.head(rows).float() / temperature, dim=-1)           # [n, V]
    picked = logprobs.gather(1, seq.targets[seq.mask].unsqueeze(1)).squeeze(1)             # [n]
    zeros = torch.zeros(seq.mask.shape, dtype=torch.float32, device=rows.device)
    logp = zeros.masked_scatter(seq.mask, picked)
    ent = None
    if entropy:
        ent = zeros.masked_scatter(seq.mask, -(logprobs.exp() * logprobs).sum(-1))
    values = None
    if value_head is not None:
        values = value_head(h).squeeze(-1).float() * seq.mask                              # [N, C]
    return Figures(logp, ent, values)
