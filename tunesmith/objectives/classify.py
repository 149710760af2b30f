"""Sequence classification and regression on a model with a task head (`AutoModelForSequenceClassification`).

    classification   loss = sum over rows of -log softmax(logits)[label]        logits (B, C)
    regression       loss = sum over rows of (prediction - target)^2            logits (B, 1)

The loss unit is a row, so the loop's division by the rows of the whole accumulation window gives the mean; the
`accuracy` metric is a count of correct rows, which that division turns into a fraction. Rows are encoded and
left-padded by `tunesmith.data.labelled`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from tunesmith.data.labelled import LabelledText, collate_labelled
from tunesmith.objectives.base import LossOutput, Objective


def row_count(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].shape[0]


def classify_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's outputs (B, C) for a `collate_labelled` batch."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        del inputs["position_ids"]  # soft prompts come first and PEFT numbers the positions itself
    return model(**inputs, use_cache=False).logits


def classify_loss(model, batch: dict[str, torch.Tensor]) -> LossOutput:
    """Summed cross-entropy (or squared error for `targets`) over the rows, and the rows' count.

    Metrics (sums over rows): accuracy (classification) or abs_error (regression).
    """
    logits = classify_logits(model, batch).float()  # (B, C)
    if "targets" in batch:
        error = logits.squeeze(-1) - batch["targets"]  # (B,)
        return LossOutput((error ** 2).sum(), len(error), {"abs_error": float(error.detach().abs().sum())})
    labels = batch["class_labels"]
    loss_sum = F.cross_entropy(logits, labels, reduction="sum")
    correct = float((logits.detach().argmax(-1) == labels).sum())
    return LossOutput(loss_sum, len(labels), {"accuracy": correct})


@torch.no_grad()
def predict(model, examples: Sequence[LabelledText], pad_token_id: int, batch_size: int = 32) -> torch.Tensor:
    """Predicted class ids (N,) long, or predicted values (N,) float for a regression head."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(examples), batch_size):
        batch = collate_labelled(examples[start : start + batch_size], pad_token_id)
        logits = classify_logits(model, {k: v.to(device) for k, v in batch.items()}).float().cpu()
        out.append(logits.squeeze(-1) if "targets" in batch else logits.argmax(-1))
    model.train(was_training)
    return torch.cat(out)


def accuracy(model, examples: Sequence[LabelledText], pad_token_id: int, batch_size: int = 32) -> float:
    """Share of `examples` whose predicted class is their label."""
    predicted = predict(model, examples, pad_token_id, batch_size)
    return float((predicted == torch.tensor([e.target for e in examples])).float().mean())


def classify_objective():
    """The `classify` objective for the loop: loss per row, rows as the unit, left-padded batches."""

    return Objective(classify_loss, row_count, collate_labelled)
