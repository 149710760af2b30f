"""Token-level numerics shared by every objective: shifting, masking, log-probabilities and entropies.

Every per-token quantity is computed over the loss-bearing rows only, `chunk_size` rows at a time, in float32.
Under autograd each chunk is checkpointed: only the logits (in their own dtype) are kept for the backward
pass and the float32 work is redone chunk by chunk there, so neither pass holds a float32 copy of the
(B, T, V) logits, whatever the batch.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunesmith.data.tokenize import IGNORE_INDEX

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """What the model is called with: a padded batch passes attention_mask, a packed one position_ids.

    No KV cache: besides being useless in a full forward pass, a cache stops `transformers` from reading
    packed documents out of the position ids.
    """
    return {**{k: batch[k] for k in MODEL_INPUTS if k in batch}, "use_cache": False}


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with logits: position t predicts token t+1; the last position predicts nothing.

    Args:
        labels: (B, T) with IGNORE_INDEX where no loss is taken.
    Returns:
        (B, T) targets, IGNORE_INDEX in the last column.
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def count_loss_tokens(labels: torch.Tensor) -> int:
    """Number of positions that carry loss in a (B, T) label tensor (before shifting)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where position t predicts a supervised token t+1 (the positions `token_logps` fills)."""
    return shift_labels(labels) != IGNORE_INDEX


def _chunked(fn: Callable[..., torch.Tensor], rows: torch.Tensor, *args: torch.Tensor, chunk_size: int):
    """fn (which upcasts) on `chunk_size`-row slices of rows (N, V) and of each (N,) arg, concatenated: (N,).

    Checkpointed under autograd, so each chunk's float32 intermediates are freed at once and rebuilt in backward.
    """
    out = []
    for start in range(0, rows.shape[0], chunk_size):
        pieces = [rows[start : start + chunk_size], *(a[start : start + chunk_size] for a in args)]
        if torch.is_grad_enabled() and rows.requires_grad:
            out.append(checkpoint(fn, *pieces, use_reentrant=False, preserve_rng_state=False))
        else:
            out.append(fn(*pieces))
    return torch.cat(out) if out else rows.new_zeros(0, dtype=torch.float32)


def _target_logp(chunk: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(chunk.float(), targets, reduction="none")  # (n,)


def _entropy(chunk: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(chunk.float(), dim=-1)  # (n, V)
    return -(logp.exp() * logp).sum(-1)


def picked_logps(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(target_mask (B, T), log-probs (N,) of the N supervised targets in row-major order)."""
    keep = target_mask(labels)  # (B, T)
    return keep, _chunked(_target_logp, logits[keep], shift_labels(labels)[keep], chunk_size=chunk_size)


def token_logps(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Log-probability of each next-token target, in float32.

    Args:
        logits: (B, T, V) in any float dtype.
        labels: (B, T) unshifted, IGNORE_INDEX where no loss is taken.
    Returns:
        (B, T) float32: at position t, log p(labels[t+1] | tokens <= t); 0 where `target_mask(labels)` is False.
    """
    keep, picked = picked_logps(logits, labels, chunk_size)
    return torch.zeros(keep.shape, dtype=torch.float32, device=logits.device).masked_scatter(keep, picked)


def token_entropy(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Entropy (nats) of each predictive distribution at the positions `token_logps` fills.

    Args:
        logits: (B, T, V) in any float dtype.
        labels: (B, T) unshifted, IGNORE_INDEX where no loss is taken.
    Returns:
        (B, T) float32, 0 where `target_mask(labels)` is False.
    """
    keep = target_mask(labels)  # (B, T)
    values = _chunked(_entropy, logits[keep], chunk_size=chunk_size)  # (N,)
    return torch.zeros(keep.shape, dtype=torch.float32, device=logits.device).masked_scatter(keep, values)


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's supervised tokens, and how many there are.

    Divide the first by the second for the length-averaged log-probs IPO, SimPO and ORPO use.

    Args:
        logits: (B, T, V) in any float dtype.
        labels: (B, T) unshifted, IGNORE_INDEX where no loss is taken.
    Returns:
        (sum of log-probs (B,) float32, number of supervised tokens (B,) int64).
    """
    return token_logps(logits, labels, chunk_size).sum(-1), target_mask(labels).sum(-1)


def answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits where they are read, and the labels cut to match.

    Only positions from the one before the batch's first supervised token on predict a supervised token, so
    the model is asked for the logits of those last positions alone (transformers' `logits_to_keep`): the
    language-model head and the log-softmax skip the prompt, which is often most of an instruction-tuning
    batch. Any loss over the returned pair equals the loss over the full logits and labels. Models that cannot
    trim (prompt learning, which prepends virtual tokens, and wrappers without the argument) get the full ones.

    Returns:
        logits (B, T - s, V) and labels (B, T - s), s the first position that predicts a supervised token.
    """
    labels = batch["labels"]
    supervised = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()  # positions t+1 that are predicted at t
    start = int(supervised[0]) if len(supervised) else 0
    if start > 0 and accepts_logits_to_keep(model):
        return model(**model_inputs(batch), logits_to_keep=labels.shape[1] - start).logits, labels[:, start:]
    return model(**model_inputs(batch)).logits, labels


def completion_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` of a model on a batch, computed from `answer_logits`.

    Returns:
        (summed log-probs (B,) float32, supervised token counts (B,) int64).
    """
    return sequence_logps(*answer_logits(model, batch))


def causal_lm(model):
    """The `transformers` model under a DDP and a peft wrapper, whose positions are the input's; None for prompt
    learning (virtual tokens come first) and for models that are not a `PreTrainedModel`."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    model = getattr(model, "module", model)  # DDP
    if isinstance(model, PeftModel):
        if model.active_peft_config.is_prompt_learning:
            return None
        model = model.get_base_model()
    return model if isinstance(model, PreTrainedModel) else None


def accepts_logits_to_keep(model) -> bool:
    """Whether `model(..., logits_to_keep=k)` returns the logits of the last k positions of the input."""
    inner = causal_lm(model)
    return inner is not None and "logits_to_keep" in inspect.signature(type(inner).forward).parameters


def summed_nll(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4096) -> tuple[torch.Tensor, int]:
    """Sum of next-token negative log-likelihoods over loss-bearing positions, in float32.

    Args:
        logits: (B, T, V) in any float dtype.
        labels: (B, T) unshifted, IGNORE_INDEX where no loss is taken.
    Returns:
        (loss sum as a 0-dim float32 tensor, number of loss tokens).
    """
    picked = picked_logps(logits, labels, chunk_size)[1]  # (N,)
    return -picked.sum(), int(picked.numel())
