"""Preference objectives on a model: the forward passes around the pure losses of dpo.py, simpo.py, orpo.py,
kto.py and reward.py.

    pairs      chosen and rejected conversations of B pairs in one padded batch of 2B rows (chosen first), so one
               forward pass serves both, or (data.padding_free) in one row with each pair's prompt computed once
               (pairs.py); log-probabilities come from the chunked `sequence_logps`, never from a
               float32 copy of the whole batch's logits, and logits are computed only from the batch's first
               answer token on (`completion_logps`)
    reference  precomputed log-probs carried by the batch (`align.precompute_ref`), else a frozen copy of the
               model (full fine-tuning), else the policy itself with its adapters switched off (LoRA, DoRA,
               QLoRA: the base weights are the reference, no second copy in memory)

Each objective's loss unit is a pair (an example for KTO), so the loop's normalisation by the units of the
whole accumulation window makes gradient accumulation exact. KTO's reference point, a KL estimate over
mismatched prompt/completion rows, is computed over the whole window before its forward passes, for the same
reason.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from tunesmith.data.batching import collate
from tunesmith.data.tokenize import IGNORE_INDEX, Example
from tunesmith.errors import ConfigError
from tunesmith.objectives.base import LossOutput
from tunesmith.objectives.pairs import flat_sequence_logps
from tunesmith.objectives.tokens import completion_logps

# ---------------------------------------------------------------------------------------------------
# Batches


def collate_pairs(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Chosen conversations then rejected ones, padded together: (2B, T) tensors as `collate` makes them, plus
    `ref_logps` (2B,) when the examples carry precomputed reference log-probs."""
    rows = [Example(e.input_ids, e.labels, e.source) for e in examples]
    rows += [Example(e.rejected_ids, e.rejected_labels, e.source) for e in examples]
    batch = collate(rows, pad_token_id)
    if examples[0].ref_logps is not None:
        batch["ref_logps"] = torch.tensor([e.ref_logps[0] for e in examples] + [e.ref_logps[1] for e in examples],
                                          dtype=torch.float32)
    return batch


def collate_unpaired(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`collate` plus `desirable` (B,) bool and, when precomputed, `ref_logps` (B,)."""
    batch = collate(examples, pad_token_id)
    batch["desirable"] = torch.tensor([bool(e.desirable) for e in examples])
    if examples[0].ref_logps is not None:
        batch["ref_logps"] = torch.tensor([e.ref_logps[0] for e in examples], dtype=torch.float32)
    return batch


def pair_count(batch: dict[str, torch.Tensor]) -> int:
    if "sequence_lengths" in batch:  # pairs.collate_pairs_flat: one row
        return batch["sequence_lengths"].numel() // 2
    return batch["input_ids"].shape[0] // 2


def row_count(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].shape[0]


# ---------------------------------------------------------------------------------------------------
# Policy and reference log-probabilities


def policy_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (R,) and completion token counts (R,) of every conversation, with grad."""
    return conversation_logps(model, batch)


def conversation_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`completion_logps` of a padded batch (a row per conversation) or of a padding-free pair batch."""
    return flat_sequence_logps(model, batch) if "sequence_ids" in batch else completion_logps(model, batch)


@torch.no_grad()
def reference_logps(model, batch: dict[str, torch.Tensor], ref_model=None) -> torch.Tensor:
    """Summed completion log-probs (R,) under the reference: precomputed, a frozen copy, or adapters off."""
    if "ref_logps" in batch:
        return batch["ref_logps"]
    if ref_model is not None:
        return conversation_logps(ref_model, batch)[0]
    with adapters_disabled(model):
        return conversation_logps(model, batch)[0]


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator[None]:
    """The base model under a PEFT model: its adapters are bypassed inside the block."""
    peft_model = getattr(model, "module", model)  # under DDP the PEFT model is wrapped
    if not hasattr(peft_model, "disable_adapter"):
        raise ConfigError("the reference model: with strategy full or freeze there are no adapters to switch off; "
                          "set align.precompute_ref=true (or the run keeps a frozen copy)")
    with peft_model.disable_adapter():
        yield


def precompute_reference(model, examples: Sequence[Example], pad_token_id: int, batch_size: int,
                         device: torch.device, collate_fn=None) -> list[list[float]]:
    """Reference log-probs of every example ([chosen, rejected] for pairs, [completion] otherwise), computed
    once with the model as it is now (before training, the reference), so no reference is kept afterwards.
    `collate_fn`: the objective's, so the reference sees the batches the policy will (default: padded rows)."""
    was_training = model.training
    model.eval()
    out: list[list[float]] = []
    pairs = examples[0].rejected_ids is not None if len(examples) else False
    collate_fn = collate_fn or (collate_pairs if pairs else collate)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate_fn(chunk, pad_token_id).items()}
        with torch.no_grad():
            logps = conversation_logps(model, batch)[0].tolist()
        n = len(chunk)
        out += [[logps[i], logps[n + i]] for i in range(n)] if pairs else [[v] for v in logps]
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------
# Metrics (sums: the loop divides by the number of pairs)


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor, prefix: str = "rewards") -> dict[str, float]:
    """Sums over pairs of the chosen and rejected rewards, their margin and how often chosen wins."""
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    return {f"{prefix}/chosen": float(chosen.sum()), f"{prefix}/rejected": float(rejected.sum()),
            f"{prefix}/margin": float((chosen - rejected).sum()),
            f"{prefix}/accuracy": float((chosen > rejected).float().sum())}


# ---------------------------------------------------------------------------------------------------
# KTO's window-level reference point


def mismatched_rows(batches: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> list[Example]:
    """Each row's prompt followed by the next row's completion (over the whole window, wrapping around): the
    rows on which KTO estimates KL(policy || reference) for prompts and answers that do not belong together."""
    prompts, completions = [], []
    for batch in batches:
        for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                     batch["token_mask"].tolist()):
            n = sum(mask)
            start = next(i for i, t in enumerate(labels[:n]) if t != IGNORE_INDEX)
            prompts.append(ids[:start])
            completions.append(ids[start:n])
    rows = []
    for i, prompt in enumerate(prompts):
        completion = completions[(i + 1) % len(completions)]
        rows.append(Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion))
    return rows


# ---------------------------------------------------------------------------------------------------
# The objectives


def dpo_loss(model, batch: dict[str, torch.Tensor], *, beta: float, loss_type: str, label_smoothing: float,
             ref_model=None) -> LossOutput:
    """DPO (sigmoid, robust, ipo, hinge) on a pair batch; IPO on length-averaged log-probs."""
    from tunesmith.objectives.dpo import dpo_losses

    n = pair_count(batch)
    logps, num_tokens = policy_logps(model, batch)
    ref = reference_logps(model, batch, ref_model)
    if loss_type == "ipo":
        logps, ref = logps / num_tokens.clamp(min=1), ref / num_tokens.clamp(min=1)
    losses, chosen, rejected = dpo_losses(logps[:n], logps[n:], ref[:n], ref[n:], beta, loss_type, label_smoothing)
    return LossOutput(losses.sum(), n, {**reward_metrics(chosen, rejected), **_logp_metrics(logps, n)})


def simpo_loss(model, batch: dict[str, torch.Tensor], *, beta: float, gamma: float, label_smoothing: float
               ) -> LossOutput:
    """SimPO: reference-free, on length-averaged log-probs."""
    from tunesmith.objectives.simpo import simpo_losses

    n = pair_count(batch)
    logps, num_tokens = policy_logps(model, batch)
    average = logps / num_tokens.clamp(min=1)
    losses, chosen, rejected = simpo_losses(average[:n], average[n:], beta, gamma, label_smoothing)
    return LossOutput(losses.sum(), n, {**reward_metrics(chosen, rejected), **_logp_metrics(logps, n)})


def orpo_loss(model, batch: dict[str, torch.Tensor], *, lam: float) -> LossOutput:
    """ORPO: the chosen answers' token-mean NLL plus the weighted log-odds-ratio term; reference-free."""
    from tunesmith.objectives.orpo import orpo_losses

    n = pair_count(batch)
    logps, num_tokens = policy_logps(model, batch)
    average = logps / num_tokens.clamp(min=1)
    losses, nll, log_odds = orpo_losses(-logps[:n], num_tokens[:n], average[:n], average[n:], lam)
    metrics = {"nll": float(nll.sum()), "log_odds": float(log_odds.sum()),
               "odds_accuracy": float((log_odds > 0).float().sum()), **_logp_metrics(logps, n)}
    return LossOutput(losses.sum(), n, metrics)


def kto_loss(model, batch: dict[str, torch.Tensor], *, beta: float, desirable_weight: float,
             undesirable_weight: float, ref_model=None) -> LossOutput:
    """KTO on unpaired examples; the reference point `kto_z0` was put in the batch by `kto_prepare`."""
    from tunesmith.objectives.kto import kto_losses

    logps, _ = policy_logps(model, batch)
    ref = reference_logps(model, batch, ref_model)
    desirable = batch["desirable"]
    losses, rewards = kto_losses(logps, ref, desirable, batch["kto_z0"], beta, desirable_weight, undesirable_weight)
    metrics = {"rewards/desirable": float(rewards[desirable].sum()),
               "rewards/undesirable": float(rewards[~desirable].sum()),
               "desirable": float(desirable.sum()), "kl": float(batch["kto_z0"]) * len(losses)}
    return LossOutput(losses.sum(), len(losses), metrics)


@torch.no_grad()
def kto_prepare(model, batches: list[dict[str, torch.Tensor]], accelerator, step: int | None = None, *,
                ref_model=None, pad_token_id: int = 0, batch_size: int = 8) -> None:
    """KTO's reference point z0 = max(0, mean KL estimate) over the mismatched rows of the whole window (all
    processes), stored as `kto_z0` in every batch of the window."""
    from tunesmith.objectives.kto import kto_reference_point

    rows = mismatched_rows(batches, pad_token_id)
    policy, ref = [], []
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(accelerator.device) for k, v in collate(rows[start : start + batch_size], pad_token_id).items()}
        policy.append(policy_logps(model, batch)[0])
        ref.append(reference_logps(model, batch, ref_model))
    policy_sum = accelerator.reduce(torch.cat(policy).sum().reshape(1), "sum")
    ref_sum = accelerator.reduce(torch.cat(ref).sum().reshape(1), "sum")
    count = accelerator.reduce(torch.tensor([len(rows)], device=accelerator.device, dtype=torch.float32), "sum")
    z0 = kto_reference_point(policy_sum / count, ref_sum / count)
    for batch in batches:
        batch["kto_z0"] = z0


def reward_loss(model, batch: dict[str, torch.Tensor], *, margin: float) -> LossOutput:
    """Bradley-Terry on the scalar scores of a sequence-classification model (one score per conversation)."""
    from tunesmith.objectives.reward import bradley_terry_losses

    n = pair_count(batch)
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits.squeeze(-1).float()  # (2B,)
    margins = torch.full((n,), margin, device=scores.device) if margin else None
    losses, _ = bradley_terry_losses(scores[:n], scores[n:], margins)
    return LossOutput(losses.sum(), n, reward_metrics(scores[:n], scores[n:], prefix="scores"))


def _logp_metrics(logps: torch.Tensor, n: int) -> dict[str, float]:
    logps = logps.detach()
    return {"logps/chosen": float(logps[:n].sum()), "logps/rejected": float(logps[n:].sum())}
