"""Objectives: small functions from (model, batch) to a summed loss and its normaliser.

The training loop divides the summed loss by the global count of loss units (tokens for SFT and CLM, pairs for
preference objectives, examples for KTO) over a whole accumulation window, so gradient accumulation and
multi-process training give the same update as one large batch. Add an objective by writing its loss function
and returning it from `build_objective`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import torch

from tunesmith.data.batching import collate, collate_flat
from tunesmith.objectives.base import LossOutput
from tunesmith.objectives.sft import sft_loss
from tunesmith.objectives.tokens import count_loss_tokens

PREFERENCE_OBJECTIVES = ("reward", "dpo", "simpo", "orpo")  # trained on pairs (prompt, chosen, rejected)
UNPAIRED_OBJECTIVES = ("kto",)  # trained on (prompt, completion, desirable)
REFERENCE_OBJECTIVES = ("dpo", "kto", "grpo", "ppo")  # need the reference's log-probs (grpo: when align.kl_beta > 0)
RL_OBJECTIVES = ("grpo", "ppo")  # trained on prompts (+ reference answers) with sampled completions


@dataclass(frozen=True)
class Objective:
    loss: Callable[[torch.nn.Module, dict[str, torch.Tensor]], LossOutput]
    count_units: Callable[[dict[str, torch.Tensor]], int]  # known before the forward pass
    collate: Callable[..., dict[str, torch.Tensor]] = collate  # (examples, pad_token_id) -> batch
    # Called with (model, the window's micro-batches, accelerator, step or None when evaluating) before their
    # forward passes: what a loss needs from the whole window (KTO's reference point, GRPO's rollouts) goes into
    # the batches here.
    prepare: Callable[..., None] | None = None


def _token_units(batch: dict[str, torch.Tensor]) -> int:
    return count_loss_tokens(batch["labels"])


# Continued pretraining (clm) and SFT share the loss: next-token NLL where labels are not masked. They
# differ only in the data (raw text: every token supervised; chat: assistant turns).
OBJECTIVES: dict[str, Objective] = {
    "sft": Objective(sft_loss, _token_units),
    "clm": Objective(sft_loss, _token_units),
}


def build_objective(name: str, align=None, ref_model=None, pad_token_id: int = 0, batch_size: int = 8, *,
                    tokenizer=None, run_dir=None, device="cpu", model=None, fused_loss: bool = True,
                    padding_free: bool = False) -> Objective:
    """The objective `name` with its coefficients from `align` (an AlignConfig) and its reference model
    (None: precomputed log-probs in the batches, or the policy with its adapters off). RL objectives also need
    the tokenizer (to read answers), the run directory (sample generations go there) and the device; PPO puts
    its value head on `model` (before the optimizer is built). SFT and CLM take `fused_loss` (train.fused_loss)
    and `padding_free` (data.padding_free)."""
    if name in OBJECTIVES:
        return dataclasses.replace(OBJECTIVES[name], loss=functools.partial(sft_loss, fused=fused_loss),
                                   collate=collate_flat if padding_free else collate)
    from tunesmith.objectives import align as a

    if name == "reward":
        return Objective(functools.partial(a.reward_loss, margin=align.reward_margin), a.pair_count, a.collate_pairs)
    if name == "dpo":
        loss = functools.partial(a.dpo_loss, beta=align.beta, loss_type=align.loss_type,
                                 label_smoothing=align.label_smoothing, ref_model=ref_model)
        return Objective(loss, a.pair_count, a.collate_pairs)
    if name == "simpo":
        loss = functools.partial(a.simpo_loss, beta=align.beta, gamma=align.simpo_gamma,
                                 label_smoothing=align.label_smoothing)
        return Objective(loss, a.pair_count, a.collate_pairs)
    if name == "orpo":
        return Objective(functools.partial(a.orpo_loss, lam=align.orpo_lambda), a.pair_count, a.collate_pairs)
    if name == "classify":
        from tunesmith.objectives.classify import classify_objective

        return classify_objective()
    if name == "kto":
        loss = functools.partial(a.kto_loss, beta=align.beta, desirable_weight=align.kto_desirable_weight,
                                 undesirable_weight=align.kto_undesirable_weight, ref_model=ref_model)
        prepare = functools.partial(a.kto_prepare, ref_model=ref_model, pad_token_id=pad_token_id,
                                    batch_size=batch_size)
        return Objective(loss, a.row_count, a.collate_unpaired, prepare)
    if name == "grpo":
        return _grpo(align, tokenizer, ref_model, run_dir, device)
    if name == "ppo":
        return _ppo(align, tokenizer, ref_model, run_dir, device, model)
    raise ValueError(f"unknown objective {name!r}")


def _rl_parts(align, tokenizer, run_dir, device):
    from pathlib import Path

    from tunesmith.objectives.rewards import RewardModel, reward_functions
    from tunesmith.objectives.rl import Rollout

    rollout = Rollout(align.group_size, align.max_new_tokens, align.temperature, align.top_p, align.scale_by_std,
                      align.samples_per_step)
    reward_model = RewardModel(align.reward_model, tokenizer, device) if align.reward_model else None
    samples = Path(run_dir) / "samples.jsonl" if run_dir else None
    return rollout, reward_functions(align.rewards), reward_model, samples


def _grpo(align, tokenizer, ref_model, run_dir, device) -> Objective:
    from tunesmith.objectives.rl import GRPO

    rollout, rewards, reward_model, samples = _rl_parts(align, tokenizer, run_dir, device)
    grpo = GRPO(tokenizer, rollout, rewards, reward_model, align.kl_beta, align.clip_eps, align.normalisation,
                ref_model, samples)
    return Objective(grpo.loss, grpo.count_units, collate, grpo.prepare)


def _ppo(align, tokenizer, ref_model, run_dir, device, model) -> Objective:
    from tunesmith.objectives.ppo import AdaptiveKLController, FixedKLController
    from tunesmith.objectives.rl import PPO, PPOSettings, attach_value_head

    rollout, rewards, reward_model, samples = _rl_parts(align, tokenizer, run_dir, device)
    kl = AdaptiveKLController(align.kl_coef, align.kl_target, align.kl_horizon) if align.kl_target \
        else FixedKLController(align.kl_coef)
    settings = PPOSettings(align.ppo_epochs, align.clip_eps, align.value_clip, align.vf_coef, align.ent_coef,
                           align.gamma, align.lam)
    attach_value_head(model)
    ppo = PPO(tokenizer, rollout, rewards, settings, kl, reward_model, ref_model, samples)
    return Objective(ppo.loss, ppo.count_units, collate, ppo.prepare)


__all__ = ["LossOutput", "Objective", "OBJECTIVES", "PREFERENCE_OBJECTIVES", "UNPAIRED_OBJECTIVES",
           "REFERENCE_OBJECTIVES", "build_objective"]
