"""Attention over rows that hold several documents (packed or padding-free batches), one document at a time.

`transformers`' SDPA path reads documents out of restarting position ids and builds a (L, L) block-diagonal
mask, so attention costs as much as if the whole row were one sequence, and a mask of L^2 entries is built per
forward pass. With several documents of lengths l_i in a row of length L = sum(l_i), running causal SDPA on
each document alone costs sum(l_i^2) instead of L^2 and needs no mask (the flash-attention varlen idea,
written with the SDPA kernels every device has).

Sliding-window layers (Gemma 3, Mistral, Qwen2 with its window on) get the window inside each document: a document
no longer than the window needs no mask, a longer one gets its band.

A row may also branch: a run of position ids that restarts at q > 0 instead of 0 continues the first q tokens of
the document before it (a preference pair's two answers after one shared prompt: objectives/pairs.py). Its
queries attend to those q tokens and causally to themselves, so the shared tokens are computed once for both.

`VARLEN` is registered with transformers' attention and mask interfaces. It behaves exactly like "sdpa" for
every other input (padding masks, generation with a cache), so a model loaded with it can also be evaluated
and sample from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

VARLEN = "sdpa_varlen"


def documents(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row of (B, L) position ids, the (start, end) of each document: a document starts where its
    position id is 0 (and at the row's first token)."""
    return [[(s, e) for s, e, root, _ in row if root == s] for row in runs(position_ids)]


def runs(position_ids: torch.Tensor) -> list[list[tuple[int, int, int, int]]]:
    """Per row of (B, L) position ids, (start, end, root, shared) for each run of consecutive ids. A run that
    starts at id 0, or the row's first run, starts a document: root = start, shared = 0. A run that restarts at
    id q > 0 branches off the document before it: it continues that document's first `shared` = q tokens, which
    start at `root`; a document's later runs that continue it contiguously belong to its first run."""
    out = []
    for row in position_ids.tolist():
        spans, root, root_end = [], 0, 0
        breaks = [i for i in range(1, len(row)) if row[i] != row[i - 1] + 1]
        for s, e in zip([0, *breaks], [*breaks, len(row)]):
            if s == 0 or row[s] == 0:
                root, root_end = s, e
                spans.append((s, e, s, 0))
            elif row[s] <= root_end - root:
                spans.append((s, e, root, row[s]))
            else:
                raise ValueError(f"position ids restart at {row[s]} (index {s}), beyond the {root_end - root} "
                                 f"tokens of the document they would continue")
        out.append(spans)
    return out


# The runs of the last position ids seen: every layer of a forward pass gets the same tensor, so its runs are
# found once per pass (one host sync, not one per layer). The entry holds the tensor, so its identity stays unique.
_last_runs: list = [None, None]


def _cached_runs(position_ids: torch.Tensor, rows: int) -> list[list[tuple[int, int, int, int]]]:
    if _last_runs[0] is not position_ids:
        _last_runs[:] = [position_ids, runs(position_ids.expand(rows, -1))]
    return _last_runs[1]


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """Causal SDPA on each document of each row (and each branch, over its shared tokens and itself). query
    (B, H, L, D), key and value (B, H_kv, L, D); returns (B, L, H, D) like transformers' SDPA function. Anything
    but a full causal pass over rows without a padding mask (a mask, a cache, q and kv of different lengths)
    goes to that function unchanged."""
    position_ids = kwargs.get("position_ids")
    if (attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]
            or kwargs.get("cache") is not None or not getattr(module, "is_causal", True)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if "sliding_window" not in kwargs and _declares_window(module.config):
        raise RuntimeError(f"{type(module).__name__} does not pass its sliding window to the attention function: "
                           f"{VARLEN} cannot apply it (load the model with attn_implementation 'sdpa')")
    options = {"dropout_p": dropout if module.training else 0.0, "scale": scaling,
               "enable_gqa": query.shape[1] != key.shape[1]}
    window = kwargs.get("sliding_window")
    rows = []
    for b, spans in enumerate(_cached_runs(position_ids, query.shape[0])):
        q, k, v = query[b:b + 1], key[b:b + 1], value[b:b + 1]
        rows.append(torch.cat([_run_attention(q, k, v, s, e, root, shared, window, options)
                               for s, e, root, shared in spans], dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def _run_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: int, e: int, root: int, shared: int,
                   window: int | None, options: dict) -> torch.Tensor:
    """One run's attention output (1, H, e - s, D): causal over itself, after its document's `shared` first tokens,
    each query seeing only the last `window` tokens up to itself when a window is given."""
    n = e - s
    banded = window is not None and shared + n > window  # a shorter document lies inside every window
    if not shared and not banded:
        return F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, **options)
    keys = torch.cat([k[:, :, root:root + shared], k[:, :, s:e]], dim=2)
    values = torch.cat([v[:, :, root:root + shared], v[:, :, s:e]], dim=2)
    # query i (of n) sees the shared tokens and the run's first i + 1 tokens: the lower-right causal mask
    mask = torch.ones(n, shared + n, dtype=torch.bool, device=q.device).tril(diagonal=shared)
    if banded:  # and, like transformers' sliding_window_overlay, only keys less than `window` positions back
        mask &= torch.ones_like(mask).triu(diagonal=shared - window + 1)
    return F.scaled_dot_product_attention(q[:, :, s:e], keys, values, attn_mask=mask, **options)


def varlen_mask(**kwargs) -> torch.Tensor | None:
    """No mask for a full pass without a padding mask (the attention splits the documents itself); otherwise
    the mask SDPA gets. transformers calls mask functions with keyword arguments only."""
    if kwargs.get("attention_mask") is None and kwargs["q_length"] == kwargs["kv_length"] \
            and not kwargs.get("q_offset") and not kwargs.get("kv_offset"):
        return None
    return sdpa_mask(**kwargs)


# Model types with sliding-window layers whose attention passes its window to the attention function (checked
# against transformers' sliding mask in tests/test_padding_free.py); others keep transformers' own masks.
WINDOW_PASSING = frozenset({"gemma3_text", "mistral", "qwen2", "qwen3"})


def _declares_window(config) -> bool:
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return bool(sliding) or "sliding_attention" in (getattr(config, "layer_types", None) or ())


def supports_varlen(config) -> bool:
    """Models whose attention is causal attention over the document, within a sliding window the attention
    function is told of (WINDOW_PASSING) or none, and without logit soft-capping (SDPA has none)."""
    return (not _declares_window(config) or config.model_type in WINDOW_PASSING) \
        and getattr(config, "attn_logit_softcapping", None) is None


AttentionInterface.register(VARLEN, varlen_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, varlen_mask)
