"""RL on the one loop: rollouts are made in the objective's `prepare`, the losses are the pure functions of
grpo.py and ppo.py.

Per rollout, for the window's prompts (training rows: a prompt and its reference answer):

    sample G completions per prompt (temperature, top-p, max new tokens, stop at end-of-turn / EOS)
      -> reward each (reward functions on (completion, reference answer), and/or a reward model)
      -> GRPO: group-relative advantages; KL to the reference as a loss term (optional)
         PPO:  per-token rewards = score at the last token - kl_coef * KL to the reference, values from a value
               head on the policy's last hidden state, GAE advantages (whitened) and returns
      -> rows prompt + completion, loss on the completion tokens

The loop then runs its usual forward/backward over these rows. GRPO updates once per rollout batch, so the
sampling policy is the policy being trained (importance ratio 1) and `old_logps` need not be kept. PPO reuses
each rollout for `ppo_epochs` optimizer steps (the data of the windows in between is not used), which is what
its clipping is for.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from tunesmith.data.batching import collate, left_pad
from tunesmith.data.tokenize import IGNORE_INDEX, Example
from tunesmith.model.stops import stop_token_ids
from tunesmith.objectives.align import adapters_disabled
from tunesmith.objectives.base import LossOutput
from tunesmith.objectives.grpo import group_advantages, grpo_losses
from tunesmith.objectives.head import head_logps
from tunesmith.objectives.pairs import flat_token_logps, lay_out, sequence_token_counts
from tunesmith.objectives.ppo import clipped_policy_losses, clipped_value_losses, gae, shaped_rewards, whiten
from tunesmith.objectives.tokens import model_inputs, target_mask, token_entropy, token_logps


@dataclass
class Rollout:
    group_size: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    scale_by_std: bool = True
    samples_per_step: int = 4  # written to samples.jsonl in the run directory


class Rollouts:
    """What every RL objective shares: how to sample, how to reward, the reference, where samples go."""

    def __init__(self, tokenizer, rollout: Rollout, reward_fns: Sequence, reward_model=None, ref_model=None,
                 samples_file: Path | None = None) -> None:
        self.tokenizer = tokenizer
        self.rollout = rollout
        self.reward_fns = list(reward_fns)
        self.reward_model = reward_model
        self.ref_model = ref_model
        self.samples_file = samples_file
        self.collate_rows = lambda rows: collate(rows, tokenizer.pad_token_id)  # how sampled rows are batched

    def sample(self, model, prompts: list[list[int]], reference_ids: list[list[int]]
               ) -> tuple[list[Example], torch.Tensor, torch.Tensor]:
        """G completions per prompt: rows (prompt + completion, loss on the completion and its stop token),
        rewards (N*G,) and completion lengths (N*G,)."""
        g = self.rollout.group_size
        references = self.tokenizer.batch_decode(reference_ids, skip_special_tokens=True)
        repeated = [p for p in prompts for _ in range(g)]
        completions = sample_completions(getattr(model, "module", model), repeated, self.tokenizer.pad_token_id,
                                         self.rollout)
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        rewards = torch.zeros(len(repeated))
        for fn in self.reward_fns:
            rewards += torch.tensor([float(fn(t, references[i // g])) for i, t in enumerate(texts)])
        if self.reward_model is not None:
            rewards += self.reward_model([p + c for p, c in zip(repeated, completions)])
        rows = [Example(p + c, [IGNORE_INDEX] * len(p) + c, source=t) for p, c, t in zip(repeated, completions, texts)]
        return rows, rewards, torch.tensor([len(c) for c in completions])

    def rollout_batch(self, model, batch: dict[str, torch.Tensor], device) -> tuple[dict[str, torch.Tensor], list]:
        """The prompts of a batch of training rows -> a batch of sampled rows with `rewards` and
        `completion_tokens`; also returns the rows (for `write_samples`)."""
        prompts, references = split_prompts(batch)
        rows, rewards, lengths = self.sample(model, prompts, references)
        new = {k: v.to(device) for k, v in self.collate_rows(rows).items()}
        new["rewards"] = rewards.to(device)
        new["completion_tokens"] = lengths.to(device)
        return new, rows

    def reference_token_logps(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.ref_model is not None:
            return completion_token_logps(self.ref_model, batch)[0]
        with adapters_disabled(model):
            return completion_token_logps(model, batch)[0]

    def write_samples(self, step: int, rows: list[Example], rewards: torch.Tensor) -> None:
        if self.samples_file is None:
            return
        with self.samples_file.open("a") as f:
            for row, reward in list(zip(rows, rewards.tolist()))[: self.rollout.samples_per_step]:
                prompt = self.tokenizer.decode([t for t, lab in zip(row.input_ids, row.labels) if lab == IGNORE_INDEX])
                f.write(json.dumps({"step": step, "prompt": prompt, "completion": row.source, "reward": reward}) + "\n")


class GRPO(Rollouts):
    """GRPO: group-relative advantages of G samples per prompt, no value model.

    `padding_free`: each step's samples lie in one row (`collate_groups`), and with `share_prompts` (a model whose
    attention reads branches: pairs.reads_branches) each prompt is computed once for its G samples."""

    def __init__(self, tokenizer, rollout: Rollout, reward_fns: Sequence, reward_model=None, beta: float = 0.0,
                 clip_eps: float = 0.2, normalisation: str = "sequence", ref_model=None,
                 samples_file: Path | None = None, padding_free: bool = False, share_prompts: bool = False) -> None:
        super().__init__(tokenizer, rollout, reward_fns, reward_model, ref_model, samples_file)
        self.beta, self.clip_eps, self.normalisation = beta, clip_eps, normalisation
        if padding_free:
            self.collate_rows = lambda rows: collate_groups(rows, rollout.group_size, share_prompts)

    # -- the Objective's parts ---------------------------------------------------------------------

    @torch.no_grad()
    def prepare(self, model, batches: list[dict[str, torch.Tensor]], accelerator, step: int | None = None) -> None:
        """Replace each batch of prompts by its rollouts (in place)."""
        for i, batch in enumerate(batches):
            new, rows = self.rollout_batch(model, batch, accelerator.device)
            new["advantages"] = group_advantages(new["rewards"], self.rollout.group_size, self.rollout.scale_by_std)
            if self.beta > 0:
                new["ref_token_logps"] = self.reference_token_logps(model, new)
            if i == 0 and step is not None and accelerator.is_main_process:
                self.write_samples(step, rows, new["rewards"])
            batch.clear()
            batch.update(new)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> LossOutput:
        logps, mask = completion_token_logps(model, batch)
        losses, units, metrics = grpo_losses(logps, batch["advantages"], mask, None, batch.get("ref_token_logps"),
                                             self.beta, self.clip_eps, None, self.normalisation)
        weights = units.detach()  # metrics below are unit-weighted sums, like the loss
        rewards = batch["rewards"].float()
        out = {name: float(value) for name, value in metrics.items()}
        out["reward"] = float((rewards * weights).sum())
        out["reward_std"] = float(_group_std(rewards, self.rollout.group_size).mean() * weights.sum())
        out["completion_tokens"] = float((batch["completion_tokens"].float() * weights).sum())
        return LossOutput(losses.sum(), int(round(float(units.sum()))), out)

    def count_units(self, batch: dict[str, torch.Tensor]) -> int:
        counts = sequence_token_counts(batch) if "sequence_ids" in batch else target_mask(batch["labels"]).sum(-1)
        return int(counts.sum()) if self.normalisation == "token" else int((counts > 0).sum())


def collate_groups(rows: Sequence[Example], group_size: int, share_prompts: bool) -> dict[str, torch.Tensor]:
    """Sampled rows (each prompt's G completions adjacent) in one row without padding, each group's prompt once
    when `share_prompts` (pairs.lay_out), with each row's length as `sequence_lengths` (R,)."""
    groups = [[(i, e.input_ids, e.labels) for i, e in enumerate(rows[g:g + group_size], start=g)]
              for g in range(0, len(rows), group_size)]
    batch = lay_out(groups, share_prompts)
    batch["sequence_lengths"] = torch.tensor([len(e.input_ids) for e in rows])
    return batch


@dataclass
class PPOSettings:
    epochs: int = 2  # optimizer steps per rollout
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95


class PPO(Rollouts):
    """PPO with a value head on the policy's last hidden state and a per-token KL penalty to the reference."""

    def __init__(self, tokenizer, rollout: Rollout, reward_fns: Sequence, settings: PPOSettings, kl_controller,
                 reward_model=None, ref_model=None, samples_file: Path | None = None) -> None:
        super().__init__(tokenizer, rollout, reward_fns, reward_model, ref_model, samples_file)
        self.settings = settings
        self.kl = kl_controller
        self.cached: list[dict[str, torch.Tensor]] | None = None

    @torch.no_grad()
    def prepare(self, model, batches: list[dict[str, torch.Tensor]], accelerator, step: int | None = None) -> None:
        """New rollouts every `epochs` steps; the steps in between train on the cached ones."""
        s = self.settings
        if step is not None and self.cached is not None and (step - 1) % s.epochs and len(self.cached) == len(batches):
            for batch, cached in zip(batches, self.cached):
                batch.clear()
                batch.update(cached)
            return
        kls = []
        for i, batch in enumerate(batches):
            new, rows = self.rollout_batch(model, batch, accelerator.device)
            mask = target_mask(new["labels"])
            logits, values = policy_and_values(model, new)
            new["old_logps"] = token_logps(logits, new["labels"])
            new["old_values"] = values
            kl = torch.where(mask, new["old_logps"] - self.reference_token_logps(model, new), 0.0)  # k1
            rewards = shaped_rewards(new["rewards"], kl, mask, self.kl.value)
            advantages, new["returns"] = gae(rewards, values, mask, s.gamma, s.lam)
            new["advantages"] = whiten(advantages, mask)
            new["kl"] = kl.sum(-1)  # (R,) per sequence
            kls.append(new["kl"])
            if i == 0 and step is not None and accelerator.is_main_process:
                self.write_samples(step, rows, new["rewards"])
            batch.clear()
            batch.update(new)
        if step is not None:
            kl_mean = accelerator.reduce(torch.cat(kls).mean().reshape(1), "mean")
            self.kl.update(float(kl_mean), sum(len(k) for k in kls))
            self.cached = [dict(b) for b in batches]

    def loss(self, model, batch: dict[str, torch.Tensor]) -> LossOutput:
        s = self.settings
        mask = target_mask(batch["labels"])
        logits, values = policy_and_values(model, batch)
        logps = token_logps(logits, batch["labels"])
        policy, clipped, approx_kl = clipped_policy_losses(logps, batch["old_logps"], batch["advantages"], mask,
                                                           s.clip_eps)
        value, value_clipped = clipped_value_losses(values, batch["old_values"], batch["returns"], mask, s.value_clip)
        per_token = policy + s.vf_coef * value
        entropy = token_entropy(logits, batch["labels"]) if s.ent_coef else None
        if entropy is not None:
            per_token = per_token - s.ent_coef * entropy
        tokens = mask.sum(-1).float()  # (R,) the loss unit is a token
        metrics = {"policy_loss": float(policy.detach().sum()), "value_loss": float(value.detach().sum()),
                   "clip_fraction": float(clipped.sum()), "value_clip_fraction": float(value_clipped.sum()),
                   "approx_kl": float(approx_kl.sum()),
                   "reward": float((batch["rewards"] * tokens).sum()),
                   "kl": float((batch["kl"] * tokens).sum()),
                   "kl_coef": self.kl.value * float(tokens.sum()),
                   "completion_tokens": float((batch["completion_tokens"] * tokens).sum())}
        if entropy is not None:
            metrics["entropy"] = float(entropy.detach().sum())
        return LossOutput(torch.where(mask, per_token, 0.0).sum(), int(mask.sum()), metrics)

    def count_units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(target_mask(batch["labels"]).sum())


def completion_token_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the batch's completions (float32) and where they are: (R, T) `tokens.token_logps`
    and `target_mask` of padded rows, or (R, C) `pairs.flat_token_logps` of `collate_groups`' row. From the head on
    the completion positions only where the model's head is a plain linear layer (`head.head_logps`: no
    (R, T, V) logits), else from the logits."""
    if "sequence_ids" in batch:
        return flat_token_logps(model, batch)
    keep = target_mask(batch["labels"])
    picked = head_logps(model, batch)
    if picked is None:
        return token_logps(model(**model_inputs(batch)).logits, batch["labels"]), keep
    return torch.zeros(keep.shape, dtype=torch.float32, device=picked.device).masked_scatter(keep, picked), keep


def attach_value_head(model) -> torch.nn.Module:
    """A scalar value head (zero-initialised: every value starts at 0) on the policy's last hidden state,
    registered on the model as `v_head` so the optimizer and checkpoints include it."""
    config = getattr(model, "config", None) or model.get_base_model().config
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    head = torch.nn.Linear(hidden, 1, dtype=torch.float32 if dtype not in (torch.float32, torch.bfloat16,
                                                                         torch.float16) else dtype)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    model.add_module("v_head", head)
    return head


def policy_and_values(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (R, T, V) and float32 values (R, T) from one forward pass."""
    out = model(**model_inputs(batch), output_hidden_states=True)
    head = getattr(model, "module", model).v_head
    hidden = out.hidden_states[-1]
    return out.logits, head(hidden.to(head.weight.dtype)).squeeze(-1).float()


def split_prompts(batch: dict[str, torch.Tensor]) -> tuple[list[list[int]], list[str]]:
    """Prompt ids (everything before the first supervised token) and reference answer ids of each row."""
    prompts, references = [], []
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["token_mask"].tolist()):
        n = sum(mask)
        start = next((i for i, t in enumerate(labels[:n]) if t != IGNORE_INDEX), n)
        prompts.append(ids[:start])
        references.append([t for t in labels[start:n] if t != IGNORE_INDEX])
    return prompts, references


@torch.no_grad()
def sample_completions(model, prompts: list[list[int]], pad_token_id: int, rollout: Rollout) -> list[list[int]]:
    """Sampled continuations, each ending with the stop token it stopped at (kept: the model must learn to
    stop), or cut at `max_new_tokens`. Sampling draws from torch's global generator (seeded by the run)."""
    from transformers import GenerationConfig

    stops = stop_token_ids(model)
    sampling = {"do_sample": True, "temperature": rollout.temperature, "top_p": rollout.top_p, "top_k": 0} \
        if rollout.temperature > 0 else {"do_sample": False}
    config = GenerationConfig(max_new_tokens=rollout.max_new_tokens, eos_token_id=stops, pad_token_id=pad_token_id,
                              **sampling)
    input_ids, attention_mask = left_pad(prompts, pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         generation_config=config)[:, input_ids.shape[1]:].tolist()
    model.train(was_training)
    completions = []
    for row in out:
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        completions.append(row[:cut])
    return completions


def _group_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each row's group reward std (N*G,), 0 for constant groups."""
    grouped = rewards.view(-1, group_size)
    return grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1) if group_size > 1 \
        else torch.zeros_like(rewards)


def mean_reward(objective: GRPO, model, examples: Sequence[Example], batch_size: int = 8) -> float:
    """Mean reward of the policy's samples over `examples`' prompts (an evaluation: no update)."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], objective.tokenizer.pad_token_id)
        prompts, references = split_prompts(batch)
        _, rewards, _ = objective.sample(model, prompts, references)
        total, count = total + float(rewards.sum()), count + len(rewards)
    return total / max(count, 1) if count else math.nan
