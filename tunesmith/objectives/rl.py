"""GRPO on the one loop: rollouts are made in the objective's `prepare`, the loss is the pure `grpo_losses`.

Per optimizer step, for the window's prompts (training rows: a prompt and its reference answer):

    sample G completions per prompt (temperature, top-p, max new tokens, stop at end-of-turn / EOS)
      -> reward each (reward functions on (completion, reference answer), and/or a reward model)
      -> group-relative advantages -> rows prompt + completion, loss on the completion tokens
      -> (KL to the reference: its per-token log-probs, adapters off or a frozen copy)

The loop then runs its usual forward/backward over these rows. One policy update per rollout batch, so the
sampling policy is the policy being trained (importance ratio 1): the clipped objective's gradient is the
policy gradient, and `old_logps` need not be kept.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from tunesmith.data.batching import collate
from tunesmith.data.tokenize import IGNORE_INDEX, Example
from tunesmith.eval.generate import left_pad, stop_token_ids
from tunesmith.objectives.align import adapters_disabled
from tunesmith.objectives.base import LossOutput
from tunesmith.objectives.grpo import group_advantages, grpo_losses
from tunesmith.objectives.tokens import model_inputs, target_mask, token_logps


@dataclass
class Rollout:
    group_size: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    scale_by_std: bool = True
    samples_per_step: int = 4  # written to samples.jsonl in the run directory


class GRPO:
    """The GRPO objective's state: how to sample, how to reward, where samples go."""

    def __init__(self, tokenizer, rollout: Rollout, reward_fns: Sequence, reward_model=None, beta: float = 0.0,
                 clip_eps: float = 0.2, normalisation: str = "sequence", ref_model=None,
                 samples_file: Path | None = None) -> None:
        self.tokenizer = tokenizer
        self.rollout = rollout
        self.reward_fns = list(reward_fns)
        self.reward_model = reward_model
        self.beta, self.clip_eps, self.normalisation = beta, clip_eps, normalisation
        self.ref_model = ref_model
        self.samples_file = samples_file

    # -- the Objective's parts ---------------------------------------------------------------------

    @torch.no_grad()
    def prepare(self, model, batches: list[dict[str, torch.Tensor]], accelerator, step: int | None = None) -> None:
        """Replace each batch of prompts by its rollouts (in place)."""
        for i, batch in enumerate(batches):
            prompts, references = split_prompts(batch)
            rows, rewards, lengths = self.sample(model, prompts, references)
            advantages = group_advantages(rewards, self.rollout.group_size, self.rollout.scale_by_std)
            new = collate(rows, self.tokenizer.pad_token_id)
            new = {k: v.to(accelerator.device) for k, v in new.items()}
            new["advantages"] = advantages.to(accelerator.device)
            new["rewards"] = rewards.to(accelerator.device)
            new["completion_tokens"] = lengths.to(accelerator.device)
            if self.beta > 0:
                new["ref_token_logps"] = self.reference_token_logps(model, new)
            if i == 0 and step is not None and accelerator.is_main_process:
                self.write_samples(step, rows, rewards)
            batch.clear()
            batch.update(new)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> LossOutput:
        logps = token_logps(model(**model_inputs(batch)).logits, batch["labels"])  # (R, T)
        mask = target_mask(batch["labels"])
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
        mask = target_mask(batch["labels"])
        return int(mask.sum()) if self.normalisation == "token" else int((mask.sum(-1) > 0).sum())

    # -- rollouts ----------------------------------------------------------------------------------

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

    def reference_token_logps(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.ref_model is not None:
            return token_logps(self.ref_model(**model_inputs(batch)).logits, batch["labels"])
        with adapters_disabled(model):
            return token_logps(model(**model_inputs(batch)).logits, batch["labels"])

    def write_samples(self, step: int, rows: list[Example], rewards: torch.Tensor) -> None:
        if self.samples_file is None:
            return
        with self.samples_file.open("a") as f:
            for row, reward in list(zip(rows, rewards.tolist()))[: self.rollout.samples_per_step]:
                prompt = self.tokenizer.decode([t for t, lab in zip(row.input_ids, row.labels) if lab == IGNORE_INDEX])
                f.write(json.dumps({"step": step, "prompt": prompt, "completion": row.source, "reward": reward}) + "\n")


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
