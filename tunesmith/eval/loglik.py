"""Multiple choice by log-likelihood: which option does the model find most probable after the prompt?

The score of an option is the sum of the log-probabilities of its tokens given the prompt,
log p(option | prompt) = sum_t log p(option_t | prompt, option_<t). Longer options collect more negative terms,
so the score can be length-normalised:

    none   the sum (favours short options)
    token  the sum divided by the option's number of tokens (mean log-prob per token)
    char   the sum divided by the option's number of characters (does not depend on the tokenizer; the
           normalisation lm-evaluation-harness calls acc_norm uses bytes, the same for ASCII text)

    logps = continuation_logps(model, [(prompt_ids, option_ids) for option_ids in options], pad_token_id)
    winner = best_option(option_scores(logps, [len(o) for o in option_ids], [len(t) for t in texts], "token"))
"""

from __future__ import annotations

from typing import Sequence

import torch

from tunesmith.data.batching import collate
from tunesmith.data.tokenize import IGNORE_INDEX, Example
from tunesmith.model.reft import positions_as_trained
from tunesmith.objectives.tokens import model_inputs, sequence_logps

LENGTH_NORMALIZATION = ("none", "token", "char")


@torch.no_grad()
def continuation_logps(model, pairs: Sequence[tuple[list[int], list[int]]], pad_token_id: int,
                       batch_size: int = 8) -> list[float]:
    """log p(continuation | context) for each (context ids, continuation ids) pair, batch by batch.

    Each pair is scored as one right-padded sequence context + continuation whose labels cover the
    continuation only, so only its tokens' log-probs are summed; logits are dropped after each batch.

    Args:
        pairs: (context ids, at least one token; continuation ids, at least one token).
        pad_token_id: fills the padding (never scored, so any id works).
    Returns:
        One float per pair, in input order.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        examples = [_example(context, continuation) for context, continuation in pairs[start:start + batch_size]]
        batch = {k: v.to(device) for k, v in collate(examples, pad_token_id).items()}
        with positions_as_trained(model, batch):  # ReFT: the context is the prompt, as in generation
            logits = model(**model_inputs(batch)).logits  # (B, T, V)
        logps, _ = sequence_logps(logits, batch["labels"])  # (B,)
        scores += logps.tolist()
    model.train(was_training)
    return scores


def _example(context: list[int], continuation: list[int]) -> Example:
    if not context or not continuation:
        raise ValueError("a scored pair needs at least one context token and one continuation token")
    return Example(context + continuation, [IGNORE_INDEX] * len(context) + continuation)


def option_scores(logps: Sequence[float], num_tokens: Sequence[int], num_chars: Sequence[int],
                  length_normalize: str = "none") -> list[float]:
    """The options' scores: summed log-probs, or divided by token or character counts (see the module doc)."""
    if length_normalize == "none":
        return list(logps)
    if length_normalize == "token":
        return [lp / n for lp, n in zip(logps, num_tokens, strict=True)]
    if length_normalize == "char":
        return [lp / max(n, 1) for lp, n in zip(logps, num_chars, strict=True)]
    raise ValueError(f"length_normalize: {length_normalize!r} is not one of {', '.join(LENGTH_NORMALIZATION)}")


def best_option(scores: Sequence[float]) -> int:
    """Index of the highest score (the first one on a tie)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
