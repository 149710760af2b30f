"""Objectives: small functions from (model, batch) to a summed loss and its normaliser.

The training loop divides the summed loss by the global count of loss units (tokens for SFT and CLM, pairs for
preference objectives, examples for KTO) over a whole accumulation window, so gradient accumulation and
multi-process training give the same update as one large batch.

What each objective needs (its data, head, reference model, rollouts) is declared once in
`tunesmith.config.objectives`; here each name maps to the builder of its `Objective`. Adding an objective: its
loss in a module of this package, its builder in BUILDERS, its row in config/objectives.py, its tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from tunesmith.data.batching import collate, collate_flat
from tunesmith.objectives.base import LossOutput, Objective
from tunesmith.objectives.sft import sft_loss
from tunesmith.objectives.tokens import count_loss_tokens


@dataclass(frozen=True)
class BuildContext:
    """What a builder may take: the align coefficients (an AlignConfig), the reference model (None: precomputed
    log-probs in the batches, or the policy with its adapters off), and for RL the tokenizer (to read answers),
    the run directory (sample generations go there), the device and the policy (PPO puts its value head on it,
    before the optimizer is built)."""

    align: Any = None
    ref_model: torch.nn.Module | None = None
    pad_token_id: int = 0
    batch_size: int = 8
    tokenizer: Any = None
    run_dir: Any = None
    device: Any = "cpu"
    model: torch.nn.Module | None = None
    fused_loss: bool = True  # train.fused_loss (sft, clm)
    padding_free: bool = False  # data.padding_free (sft, clm; dpo, simpo, orpo: pairs.py; grpo: rl.py)


def build_objective(name: str, align=None, ref_model=None, pad_token_id: int = 0, batch_size: int = 8, *,
                    tokenizer=None, run_dir=None, device="cpu", model=None, fused_loss: bool = True,
                    padding_free: bool = False) -> Objective:
    """The objective `name`, built from what its builder takes (see BuildContext)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown objective {name!r} (known: {', '.join(BUILDERS)})")
    return BUILDERS[name](BuildContext(align, ref_model, pad_token_id, batch_size, tokenizer, run_dir, device,
                                       model, fused_loss, padding_free))


def _token_units(batch: dict[str, torch.Tensor]) -> int:
    return count_loss_tokens(batch["labels"])


def _next_token(c: BuildContext) -> Objective:
    """Continued pretraining (clm) and SFT share the loss: next-token NLL where labels are not masked. They
    differ only in the data (raw text: every token supervised; chat: assistant turns)."""
    return Objective(functools.partial(sft_loss, fused=c.fused_loss), _token_units,
                     collate_flat if c.padding_free else collate)


def _pair_collate(c: BuildContext):
    """How a pair objective lays out its batches: padded rows, or one row with each pair's prompt shared by its two
    answers where the model's attention reads that (pairs.py), else one row without sharing."""
    from tunesmith.objectives import align as a
    from tunesmith.objectives.pairs import collate_pairs_flat, reads_branches

    if not c.padding_free:
        return a.collate_pairs
    return functools.partial(collate_pairs_flat, share_prompts=c.model is not None and reads_branches(c.model))


def _reward(c: BuildContext) -> Objective:
    from tunesmith.objectives import align as a

    return Objective(functools.partial(a.reward_loss, margin=c.align.reward_margin), a.pair_count, a.collate_pairs)


def _dpo(c: BuildContext) -> Objective:
    from tunesmith.objectives import align as a

    loss = functools.partial(a.dpo_loss, beta=c.align.beta, loss_type=c.align.loss_type,
                             label_smoothing=c.align.label_smoothing, ref_model=c.ref_model)
    return Objective(loss, a.pair_count, _pair_collate(c))


def _simpo(c: BuildContext) -> Objective:
    from tunesmith.objectives import align as a

    loss = functools.partial(a.simpo_loss, beta=c.align.beta, gamma=c.align.simpo_gamma,
                             label_smoothing=c.align.label_smoothing)
    return Objective(loss, a.pair_count, _pair_collate(c))


def _orpo(c: BuildContext) -> Objective:
    from tunesmith.objectives import align as a

    return Objective(functools.partial(a.orpo_loss, lam=c.align.orpo_lambda), a.pair_count, _pair_collate(c))


def _kto(c: BuildContext) -> Objective:
    from tunesmith.objectives import align as a

    loss = functools.partial(a.kto_loss, beta=c.align.beta, desirable_weight=c.align.kto_desirable_weight,
                             undesirable_weight=c.align.kto_undesirable_weight, ref_model=c.ref_model)
    prepare = functools.partial(a.kto_prepare, ref_model=c.ref_model, pad_token_id=c.pad_token_id,
                                batch_size=c.batch_size)
    return Objective(loss, a.row_count, a.collate_unpaired, prepare)


def _classify(c: BuildContext) -> Objective:
    from tunesmith.objectives.classify import classify_objective

    return classify_objective()


def _rl_parts(align, tokenizer, run_dir, device):
    from pathlib import Path

    from tunesmith.objectives.rewards import RewardModel, reward_functions
    from tunesmith.objectives.rl import Rollout

    rollout = Rollout(align.group_size, align.max_new_tokens, align.temperature, align.top_p, align.scale_by_std,
                      align.samples_per_step)
    reward_model = RewardModel(align.reward_model, tokenizer, device) if align.reward_model else None
    samples = Path(run_dir) / "samples.jsonl" if run_dir else None
    return rollout, reward_functions(align.rewards), reward_model, samples


def _grpo(c: BuildContext) -> Objective:
    from tunesmith.objectives.pairs import reads_branches
    from tunesmith.objectives.rl import GRPO

    align = c.align
    rollout, rewards, reward_model, samples = _rl_parts(align, c.tokenizer, c.run_dir, c.device)
    grpo = GRPO(c.tokenizer, rollout, rewards, reward_model, align.kl_beta, align.clip_eps, align.normalisation,
                c.ref_model, samples, padding_free=c.padding_free,
                share_prompts=c.padding_free and c.model is not None and reads_branches(c.model))
    return Objective(grpo.loss, grpo.count_units, collate, grpo.prepare)


def _ppo(c: BuildContext) -> Objective:
    from tunesmith.objectives.ppo import AdaptiveKLController, FixedKLController
    from tunesmith.objectives.rl import PPO, PPOSettings, attach_value_head

    align = c.align
    rollout, rewards, reward_model, samples = _rl_parts(align, c.tokenizer, c.run_dir, c.device)
    kl = AdaptiveKLController(align.kl_coef, align.kl_target, align.kl_horizon) if align.kl_target \
        else FixedKLController(align.kl_coef)
    settings = PPOSettings(align.ppo_epochs, align.clip_eps, align.value_clip, align.vf_coef, align.ent_coef,
                           align.gamma, align.lam)
    attach_value_head(c.model)
    ppo = PPO(c.tokenizer, rollout, rewards, settings, kl, reward_model, c.ref_model, samples)
    return Objective(ppo.loss, ppo.count_units, collate, ppo.prepare)


BUILDERS: dict[str, Callable[[BuildContext], Objective]] = {
    "sft": _next_token, "clm": _next_token, "reward": _reward, "dpo": _dpo, "simpo": _simpo, "orpo": _orpo,
    "kto": _kto, "grpo": _grpo, "ppo": _ppo, "classify": _classify,
}

__all__ = ["BUILDERS", "BuildContext", "LossOutput", "Objective", "build_objective"]
