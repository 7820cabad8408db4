"""RLHF with PPO (model.objective = "ppo") and GRPO ("grpo") on the finetuning trainer.

One step of the trainer (its `step`, learning-rate schedule, checkpoints and metrics line) is
one rollout batch:

1. rollout: rl.prompts_per_step prompts, rl.completions_per_prompt completions each, sampled by
   the policy with the generation core (KV cache; the compiled decode step with rl.compile),
   seeded by (train.seed, step); then, in batched forwards without gradients, the sampled
   tokens' log-probs under the policy (the "old" policy of the ratio), under the reference
   (LoRA/QLoRA: the same model with its adapters disabled; full: a frozen copy of the base in
   the compute dtype, since new samples rule out precomputing), the value head's estimates
   (PPO), and the reward function's score of each completion;
2. advantages: PPO shapes the reward per token (-kl_coef * k1, the score on the last token),
   runs GAE over the values and whitens the advantages over the batch; GRPO standardises each
   score within its prompt's group and gives it to every token of the completion;
3. update: rl.epochs passes over the batch in a fresh random order, each rl.minibatch
   completions one optimizer update (gradient clipping, train.lr's schedule at this step):
   PPO-clip plus rl.value_coef x the clipped value loss (PPO), or PPO-clip plus kl_coef x the
   k3 KL to the reference (GRPO).

The policy runs in eval mode throughout (LoRA's dropout off), so that before the first update
the ratio pi / pi_old is exactly 1. Rollouts depend only on the weights and (seed, step), and
the prompt order is the loader's state, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from camelid.align import rl
from camelid.align.rewards import RewardFunction, load_reward_model
from camelid.align.rollout import PromptLoader, Sequences, load_prompts, sample_completions, token_figures
from camelid.checkpoint import build_model
from camelid.checkpoint.hub import cache_dir as camelid_cache
from camelid.errors import CamelidError
from camelid.finetune.trainer import FinetuneTrainer
from camelid.generate.core import Engine
from camelid.generate.llm import compile_supported
from camelid.generate.sampling import SamplingParams
from camelid.lora import adapters_disabled
from camelid.quant.layers import keep_dequantized
from camelid.train.optim import lr_at

SAMPLES = "samples.jsonl"   # a few completions per rl.sample_interval steps, with their rewards
EVAL_SEED = 7919            # validation rollouts draw the same way at every evaluation


class PPOTrainer(FinetuneTrainer):
    """PPO (objective "ppo") or GRPO (objective "grpo") against `reward` (a RewardFunction;
    default: the reward model rl.reward_model)."""

    def __init__(self, cfg, log: bool = True, reward: RewardFunction | None = None):
        self.reward = reward
        super().__init__(cfg, log)

    @property
    def critic(self) -> bool:
        return self.cfg.model.objective == "ppo"

    # ---- data: prompts and the reward ------------------------------------------------------------
    def _build_data(self) -> None:
        c = self.cfg
        if c.model.objective not in ("ppo", "grpo"):
            raise CamelidError(f"model.objective {c.model.objective!r}: PPOTrainer runs ppo or grpo")
        self._open_base()
        self.train_prompts, self.val_prompts, self.data_report, self.heldout_tasks = load_prompts(
            c, self.tokenizer, self.run_dir)
        self.train_loader = PromptLoader(self.train_prompts, c.rl.prompts_per_step, c.train.seed)
        if self.reward is None:
            if not c.rl.reward_model:
                raise CamelidError(f"rl.reward_model is empty: name the reward model that scores the completions "
                                   f"(model.objective = {c.model.objective!r} needs one)")
            self.reward = load_reward_model(c.rl.reward_model, self.tokenizer, self.device, self._compute_dtype())
        self.kl = rl.kl_controller(c.rl.kl_coef, c.rl.kl_target, c.rl.kl_horizon)
        rows = c.rl.prompts_per_step * c.rl.completions_per_prompt
        self.micro_rows, self.accumulation, self.step_tokens = [rows], 1, 0
        self._samples_offset = 0

    def _compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.train.dtype == "bfloat16" else torch.float32

    # ---- model: policy, value head, reference, generation engine -----------------------------------
    def _build_model(self) -> nn.Module:
        c = self.cfg
        model = super()._build_model()
        if self.critic:
            # a scalar head on the policy's final hidden states (shared backbone), starting at 0
            # so that the first advantages are the shaped rewards' own returns
            model.value_head = nn.Linear(self.config.dim, 1, device=self.device)
            nn.init.zeros_(model.value_head.weight)
            nn.init.zeros_(model.value_head.bias)
        model.eval()
        self.reference = None
        if not c.adapters:
            self.reference = build_model(self.base, dtype=self._compute_dtype(), device=self.device)
            # weights read twice from one checkpoint may share memory (a mapped file): the policy's
            # in-place updates must not reach the reference
            for p in self.reference.parameters():
                p.data = p.data.clone()
        self.engine = Engine(model)
        if c.rl.compile and compile_supported(self.device):
            # compiled now (or loaded from the cache directory), never in the background: a step
            # that switched from eager to compiled mid-run would make rollouts irreproducible
            self.engine.compile(background=False, cache_dir=camelid_cache() / "compiled")
        return model

    def _reference_figures(self, seq: Sequences) -> torch.Tensor:
        t = self.cfg.rl.temperature
        if self.reference is not None:
            return token_figures(self.reference, seq, t).logp
        with adapters_disabled(self.model):
            return token_figures(self.model, seq, t).logp

    # ---- one step: rollout, advantages, update ---------------------------------------------------
    def _seed(self, step: int, salt: int) -> int:
        return (self.cfg.train.seed * 1_000_003 + step * 7 + salt) % (1 << 62)

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]], group: int, seed: int) -> dict[str, Any]:
        """Sample `group` completions of each prompt and take every figure the update needs."""
        r = self.cfg.rl
        rows = [p for p in prompts for _ in range(group)]
        self.model.eval()
        params = SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens)
        t0 = time.perf_counter()
        completions, stats = sample_completions(self.engine, rows, params, self.tokenizer.stop_ids, seed,
                                                self.tokenizer.pad_id or 0)
        generate_s = time.perf_counter() - t0
        seq = Sequences.of(rows, completions, self.tokenizer.pad_id or 0)
        parts: dict[str, list[torch.Tensor]] = {"logp": [], "entropy": [], "values": [], "ref_logp": []}
        width = seq.mask.size(1)
        # a quantized base (QLoRA) is dequantized once for all of the rollout's scoring passes
        with keep_dequantized(self.model):
            for start in range(0, len(rows), r.minibatch):
                which = torch.arange(start, min(start + r.minibatch, len(rows)))
                sub = seq.rows(which).to(self.device)
                with self._autocast():
                    fig = token_figures(self.model, sub, r.temperature, self._value_head(), entropy=True)
                    ref = self._reference_figures(sub)
                for name, t in (("logp", fig.logp), ("entropy", fig.entropy), ("values", fig.values),
                                ("ref_logp", ref)):
                    if t is not None:
                        parts[name].append(nn.functional.pad(t.float(), (0, width - t.size(1))))
        out = {name: torch.cat(ts) for name, ts in parts.items() if ts}
        out["mask"] = seq.mask.to(self.device)
        out["scores"] = self.reward(rows, completions).to(self.device, torch.float32)
        # compiling (or loading) a decode step is kept out of the generation's speed
        out.update(seq=seq, rows=rows, completions=completions, generate_s=generate_s, new_tokens=stats.new_tokens,
                   compile_s=stats.warmup_s)
        return out

    def _value_head(self) -> nn.Module | None:
        return self.model.value_head if self.critic else None

    def advantages(self, roll: dict[str, Any], kl_coef: float) -> dict[str, torch.Tensor]:
        r, mask = self.cfg.rl, roll["mask"]
        if self.critic:
            rewards = rl.shaped_rewards(roll["scores"], roll["logp"], roll["ref_logp"], mask, kl_coef)
            adv, returns = rl.gae(rewards, roll["values"], mask, r.gamma, r.lam)
            return {"advantages": rl.whiten(adv, mask), "returns": returns}
        group = rl.group_advantages(roll["scores"], r.completions_per_prompt)
        return {"advantages": group.unsqueeze(-1) * mask}

    def minibatch_loss(self, roll: dict[str, Any], adv: dict[str, torch.Tensor], which: torch.Tensor,
                       kl_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
        r = self.cfg.rl
        sub = roll["seq"].rows(which).to(self.device)
        span = sub.mask.size(1)

        def cut(t: torch.Tensor) -> torch.Tensor:
            return t[which.to(t.device), :span]

        with self._autocast():
            fig = token_figures(self.model, sub, r.temperature, self._value_head())
        mask = sub.mask
        loss, clip_frac = rl.policy_loss(fig.logp, cut(roll["logp"]), cut(adv["advantages"]), mask, r.clip)
        figures = {"policy_loss": float(loss.detach()), "clip_frac": float(clip_frac)}
        if self.critic:
            v_loss = rl.value_loss(fig.values, cut(roll["values"]), cut(adv["returns"]), mask, r.value_clip)
            loss = loss + r.value_coef * v_loss
            figures["value_loss"] = float(v_loss.detach())
        else:
            k3 = rl.masked_mean(rl.kl_k3(fig.logp, cut(roll["ref_logp"])), mask)
            loss = loss + kl_coef * k3
            figures["kl_k3"] = float(k3.detach())
        return loss, figures

    def train_step(self) -> dict[str, Any]:
        c, r = self.cfg, self.cfg.rl
        step = self.step + 1
        t0 = time.perf_counter()
        roll = self.rollout(self.train_loader.next_batch(), r.completions_per_prompt, self._seed(step, 0))
        kl_coef = self.kl.coef
        adv = self.advantages(roll, kl_coef)
        rollout_s = time.perf_counter() - t0
        lr = lr_at(step, c.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n = len(roll["rows"])
        order = torch.Generator().manual_seed(self._seed(step, 1))
        losses, norms, figures, skipped = [], [], [], 0
        t1 = time.perf_counter()
        for _ in range(r.epochs):
            perm = torch.randperm(n, generator=order)
            for start in range(0, n, r.minibatch):
                self.optimizer.zero_grad(set_to_none=True)
                loss, fig = self.minibatch_loss(roll, adv, perm[start:start + r.minibatch], kl_coef)
                loss.backward()
                grad_norm = self.runtime.clip_grad_norm(self.model.parameters(), c.train.grad_clip)
                value = float(loss.detach())
                if c.stability.skip_nonfinite and not (math.isfinite(value) and math.isfinite(grad_norm)):
                    skipped += 1
                    continue
                self.optimizer.step()
                losses.append(value)
                norms.append(grad_norm)
                figures.append(fig)
        self.optimizer.zero_grad(set_to_none=True)
        update_s = time.perf_counter() - t1
        mask = roll["mask"]
        seq_tokens = sum(len(p) + len(q) for p, q in zip(roll["rows"], roll["completions"]))
        kl = float(rl.sequence_kl(roll["logp"], roll["ref_logp"], mask))
        self.kl.update(kl, n)
        self.step = step
        self.tokens_seen += seq_tokens
        self.nonfinite += skipped > 0
        seconds = time.perf_counter() - t0
        record: dict[str, Any] = {
            "step": step, "loss": _mean(losses), "lr": lr, "grad_norm": _mean(norms),
            "tokens": self.tokens_seen, "tokens_per_s": seq_tokens / seconds,
            "reward_mean": float(roll["scores"].mean()), "reward_std": float(roll["scores"].std(correction=0)),
            "kl": kl, "kl_coef": kl_coef, "entropy": float(rl.masked_mean(roll["entropy"], mask)),
            "clip_frac": _mean([f["clip_frac"] for f in figures]),
            "response_length": float(mask.sum(-1).float().mean()),
            "rollout_s": rollout_s, "generate_s": roll["generate_s"], "update_s": update_s,
            "rollout_tokens_per_s": roll["new_tokens"] / max(roll["generate_s"] - roll["compile_s"], 1e-9),
            "update_tokens_per_s": r.epochs * seq_tokens / update_s if update_s else 0.0,
            "updates": len(losses)}
        if self.critic:
            record["value_loss"] = _mean([f["value_loss"] for f in figures])
        else:
            record["kl_k3"] = _mean([f["kl_k3"] for f in figures])
        if skipped:
            record["skipped_updates"] = skipped
        if roll["compile_s"]:
            record["compile_s"] = roll["compile_s"]
        if step == 1 or step % r.sample_interval == 0:
            self._log_samples(step, roll)
        return record

    # ---- samples and validation --------------------------------------------------------------------
    @property
    def samples_path(self) -> Path:
        return self.run_dir / SAMPLES

    def _log_samples(self, step: int, roll: dict[str, Any]) -> None:
        """rl.samples completions of different prompts, with their scores, into samples.jsonl."""
        if not self.main or not self.cfg.rl.samples:
            return
        group = self.cfg.rl.completions_per_prompt
        lines = []
        for i in range(0, len(roll["rows"]), group)[:self.cfg.rl.samples]:
            lines.append(json.dumps({"step": step, "prompt": self.tokenizer.decode(roll["rows"][i]),
                                     "completion": self.tokenizer.decode(roll["completions"][i]),
                                     "reward": float(roll["scores"][i])}, ensure_ascii=False))
        with open(self.samples_path, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward, KL and length of one completion for each of the first
        train.eval_batches x rl.prompts_per_step validation prompts, drawn the same way each time."""
        r = self.cfg.rl
        prompts = self.val_prompts[:self.cfg.train.eval_batches * r.prompts_per_step]
        if not prompts:
            return {}
        scores, kls, lengths = [], [], []
        chunk = r.prompts_per_step * r.completions_per_prompt   # the rollout's rows: the same compiled step
        for start in range(0, len(prompts), chunk):
            roll = self.rollout(prompts[start:start + chunk], 1, self._seed(0, EVAL_SEED + start))
            scores.append(roll["scores"])
            kls.append((rl.kl_k1(roll["logp"], roll["ref_logp"]) * roll["mask"]).sum(-1))
            lengths.append(roll["mask"].sum(-1).float())
        return {"val_reward_mean": float(torch.cat(scores).mean()), "val_kl": float(torch.cat(kls).mean()),
                "val_response_length": float(torch.cat(lengths).mean())}

    # ---- checkpoints -------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        state = {**super().trainer_state(), "kl": self.kl.state_dict(),
                 "samples_offset": self.samples_path.stat().st_size if self.samples_path.exists() else 0}
        if self.critic:  # the value head lives beside the adapters / weights, in trainer.pt
            state["value_head"] = {k: v.detach().cpu() for k, v in self.model.value_head.state_dict().items()}
        return state

    def _load_state(self, path: Path) -> dict[str, Any]:
        state = super()._load_state(path)
        self.kl.load_state_dict(state["kl"])
        if self.critic:
            self.model.value_head.load_state_dict(state["value_head"])
        self._samples_offset = state["samples_offset"]
        return state

    def _resume(self) -> Path | None:
        found = super()._resume()
        if self.main and self.samples_path.exists():   # forget what a killed run sampled after its checkpoint
            with open(self.samples_path, "r+b") as f:
                f.truncate(self._samples_offset if found else 0)
        return found

    # ---- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        c, t, r = self.cfg, self.cfg.train, self.cfg.rl
        say = (lambda *a: tqdm.write(" ".join(a), file=sys.stderr)) if self.log and self.main else (lambda *a: None)
        if self.resumed_from:
            say(f"resuming from {self.resumed_from} (step {self.step})")
        say(f"{c.model.objective}: {self.config.num_params():,} parameters on {self.device}, {t.dtype}, "
            f"{r.prompts_per_step} prompts x {r.completions_per_prompt} completions per step, {r.epochs} epochs of "
            f"minibatches of {r.minibatch}")
        bar = tqdm(total=t.max_steps, initial=self.step, desc=c.model.objective, unit="step", disable=not (
            self.log and self.main and sys.stderr.isatty()), dynamic_ncols=True)
        last: dict[str, Any] = {}
        val: dict[str, float] | None = None
        while self.step < t.max_steps:
            record = last = self.train_step()
            if self.step % t.log_interval == 0 or self.step == t.max_steps or self.step == 1:
                self.metrics.write(record)
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kl=f"{record['kl']:.3f}")
            if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                val = self.evaluate()
                if val:
                    self.metrics.write({"step": self.step, **val})
                self.metrics.plot()
            if self.step % c.checkpoint.interval == 0 or self.step == t.max_steps:
                self.save()
        bar.close()
        if val is None:
            val = self.evaluate()
        self.metrics.plot()
        self.metrics.close()
        self.check_diverged()
        return {"step": self.step, "loss": last.get("loss"), "val_loss": None, "nonfinite": self.nonfinite,
                "reward_mean": last.get("reward_mean"), **(val or {})}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
