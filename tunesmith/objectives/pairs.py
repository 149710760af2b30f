"""Preference pairs without padding, each pair's prompt computed once (`data.padding_free` for dpo, simpo, orpo;
`lay_out` also serves GRPO's groups of samples: objectives/rl.py).

A padded pair batch holds 2B rows, chosen then rejected, each padded to the longest, so every prompt runs through
the model twice. Here a step's pairs lie end to end in one row, each as

    tokens     [ shared prefix  | chosen answer      | rejected answer    ]
    positions    0 .. p-1         p .. p+C-1           p .. p+R-1

The rejected answer's position ids restart at p instead of 0: the attention (model/attention.py, "branches") lets
its queries see the prefix's p tokens and itself, never the chosen answer, so each answer gets the hidden states
it would get in a row of its own and the prefix is computed once, for the policy and the reference alike. The
prefix is the two conversations' longest common prefix, cut one token before either's first supervised token:
every supervised target is then predicted inside its own branch, and the rest of the loss is unchanged.

Only a model whose attention runs through `VARLEN` can read branches; for any other (soft-capped attention, or a
sliding window its attention function is not told of: attention.supports_varlen) the pairs are laid out
padding-free without sharing (each conversation a document of its own), which transformers' attention reads from
the restarting position ids.

The batch carries `sequence_ids` (1, L): which of the 2B conversations (chosen i is i, rejected i is B + i) each
position belongs to, -1 on a shared prefix; and `sequence_lengths` (2B,): each conversation's length, the
tokens the data holds (what the loop reports as tokens).
"""

from __future__ import annotations

from typing import Sequence

import torch

from tunesmith.data.tokenize import IGNORE_INDEX, Example
from tunesmith.objectives.head import head_logps
from tunesmith.objectives.tokens import causal_lm, model_inputs, picked_logps, target_mask


def shared_prefix(example: Example) -> int:
    """How many leading tokens a pair's two conversations can share (`common_prompt`)."""
    return common_prompt([(example.input_ids, example.labels), (example.rejected_ids, example.rejected_labels)])


def common_prompt(sequences: Sequence[tuple[list[int], list[int]]]) -> int:
    """How many leading tokens (ids, labels) sequences can share: their common prefix, up to one token before the
    first supervised token of any of them (0: nothing to share)."""
    common = 0
    for column in zip(*(ids for ids, _ in sequences)):
        if any(t != column[0] for t in column):
            break
        common += 1
    first = min([common, *(_first_supervised(labels) for _, labels in sequences)])
    return max(first - 1, 0)


def _first_supervised(labels: list[int]) -> int:
    return next((i for i, t in enumerate(labels) if t != IGNORE_INDEX and i > 0), len(labels))


def lay_out(groups: Sequence[Sequence[tuple[int, list[int], list[int]]]], share: bool) -> dict[str, torch.Tensor]:
    """Groups of (owner, ids, labels) sequences end to end in one row: each group's `common_prompt` once (when
    `share`), then each sequence's rest, its position ids continuing the prompt (a branch).

    Returns:
        input_ids, labels, token_mask (ones), position_ids and sequence_ids (the owner of each position; -1 on a
        shared prompt), each (1, L).
    """
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    owners: list[int] = []
    for group in groups:
        p = common_prompt([(seq, seq_labels) for _, seq, seq_labels in group]) if share else 0
        ids += group[0][1][:p]
        labels += [IGNORE_INDEX] * p
        positions += range(p)
        owners += [-1] * p
        for owner, seq, seq_labels in group:
            ids += seq[p:]
            labels += [IGNORE_INDEX, *seq_labels[p + 1:]]  # nothing predicts a branch's (or document's) first token
            positions += range(p, len(seq))
            owners += [owner] * (len(seq) - p)
    row = torch.tensor(ids)[None]
    return {"input_ids": row, "labels": torch.tensor(labels)[None], "token_mask": torch.ones_like(row),
            "position_ids": torch.tensor(positions)[None], "sequence_ids": torch.tensor(owners)[None]}


def collate_pairs_flat(examples: Sequence[Example], pad_token_id: int | None = None, *,
                       share_prompts: bool = True) -> dict[str, torch.Tensor]:
    """A step's pairs in one row, each pair's prompt shared by its two answers (or not, `share_prompts=False`).

    Returns:
        input_ids, labels, token_mask (ones), position_ids and sequence_ids, each (1, L); sequence_lengths (2B,);
        ref_logps (2B,) when the examples carry precomputed reference log-probs. `pad_token_id` is unused.
    """
    n = len(examples)
    batch = lay_out([[(i, e.input_ids, e.labels), (n + i, e.rejected_ids, e.rejected_labels)]
                     for i, e in enumerate(examples)], share_prompts)
    batch["sequence_lengths"] = torch.tensor([len(e.input_ids) for e in examples]
                                             + [len(e.rejected_ids) for e in examples])
    if examples[0].ref_logps is not None:
        batch["ref_logps"] = torch.tensor([e.ref_logps[0] for e in examples] + [e.ref_logps[1] for e in examples],
                                          dtype=torch.float32)
    return batch


def reads_branches(model) -> bool:
    """Whether the model's attention reads a pair's shared prefix (`VARLEN`, set by build_model for
    data.padding_free where the architecture allows it)."""
    from tunesmith.model.attention import VARLEN

    inner = causal_lm(model)
    return inner is not None and getattr(inner.config, "_attn_implementation", None) == VARLEN


def flat_sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (2B,) float32 and supervised token counts (2B,) of each conversation of a
    `collate_pairs_flat` batch, as `tokens.completion_logps` gives them for the padded batch.

    The head runs on the supervised positions only (`head.head_logps`) where the model allows it, otherwise on
    the model's logits.
    """
    picked, owners = _owned_logps(model, batch)
    count = batch["sequence_lengths"].numel()
    sums = torch.zeros(count, dtype=torch.float32, device=picked.device).index_add(0, owners, picked)
    return sums, torch.bincount(owners, minlength=count)


def flat_token_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each sequence of a `lay_out` batch with `sequence_lengths`: (S, C) float32, sequence
    s's supervised tokens in order, left-aligned, and the (S, C) bool mask of where they are (C: the most any
    sequence has). Computed as `flat_sequence_logps` computes them."""
    picked, owners = _owned_logps(model, batch)
    counts = torch.bincount(owners, minlength=batch["sequence_lengths"].numel())
    order = torch.argsort(owners, stable=True)  # each sequence's tokens together, in their order
    starts = torch.cumsum(counts, 0) - counts
    ordinal = torch.empty_like(owners)
    ordinal[order] = torch.arange(len(owners), device=owners.device) - starts[owners[order]]
    width = int(counts.max()) if len(counts) else 0
    logps = picked.new_zeros(len(counts), width).index_put((owners, ordinal), picked)
    return logps, torch.arange(width, device=counts.device)[None] < counts[:, None]


def sequence_token_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Supervised tokens (S,) of each sequence of a `lay_out` batch with `sequence_lengths`."""
    return torch.bincount(_owners(batch), minlength=batch["sequence_lengths"].numel())


def _owners(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sequence (N,) of each supervised target, in row-major order of `tokens.target_mask`."""
    owner = torch.full_like(batch["sequence_ids"], -1)
    owner[:, :-1] = batch["sequence_ids"][:, 1:]  # position t predicts token t + 1
    return owner[target_mask(batch["labels"])]


def _owned_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p of each supervised target (N,) in row-major order, and the sequence it belongs to (N,)."""
    picked = head_logps(model, batch)  # (N,)
    if picked is None:
        picked = picked_logps(model(**model_inputs(batch)).logits, batch["labels"], chunk_size=4096)[1]
    return picked, _owners(batch)
