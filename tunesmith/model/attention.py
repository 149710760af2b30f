"""Attention over rows that hold several documents (packed or padding-free batches), one document at a time.

`transformers`' SDPA path reads documents out of restarting position ids and builds a (L, L) block-diagonal
mask, so attention costs as much as if the whole row were one sequence, and a mask of L^2 entries is built per
forward pass. With several documents of lengths l_i in a row of length L = sum(l_i), running causal SDPA on
each document alone costs sum(l_i^2) instead of L^2 and needs no mask (the flash-attention varlen idea,
written with the SDPA kernels every device has).

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
    spans = []
    for row in position_ids:
        starts = (row == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        spans.append(list(zip(starts, [*starts[1:], row.numel()])))
    return spans


# The spans of the last position ids seen: every layer of a forward pass gets the same tensor, so its documents are
# found once per pass (one host sync, not one per layer). The entry holds the tensor, so its identity stays unique.
_last_spans: list = [None, None]


def _cached_documents(position_ids: torch.Tensor, rows: int) -> list[list[tuple[int, int]]]:
    if _last_spans[0] is not position_ids:
        _last_spans[:] = [position_ids, documents(position_ids.expand(rows, -1))]
    return _last_spans[1]


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """Causal SDPA on each document of each row. query (B, H, L, D), key and value (B, H_kv, L, D); returns
    (B, L, H, D) like transformers' SDPA function. Anything but a full causal pass over rows without a padding
    mask (a mask, a cache, q and kv of different lengths) goes to that function unchanged."""
    position_ids = kwargs.get("position_ids")
    if (attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]
            or kwargs.get("cache") is not None or not getattr(module, "is_causal", True)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    dropout = dropout if module.training else 0.0
    rows = []
    for b, spans in enumerate(_cached_documents(position_ids, query.shape[0])):
        rows.append(torch.cat([
            F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                           dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
            for s, e in spans], dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def varlen_mask(**kwargs) -> torch.Tensor | None:
    """No mask for a full pass without a padding mask (the attention splits the documents itself); otherwise
    the mask SDPA gets. transformers calls mask functions with keyword arguments only."""
    if kwargs.get("attention_mask") is None and kwargs["q_length"] == kwargs["kv_length"] \
            and not kwargs.get("q_offset") and not kwargs.get("kv_offset"):
        return None
    return sdpa_mask(**kwargs)


def supports_varlen(config) -> bool:
    """Models whose attention is plain causal attention over the whole document: no sliding window (its mask
    would be skipped) and no logit soft-capping (SDPA has none)."""
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    layer_types = getattr(config, "layer_types", None) or ()
    return not sliding and "sliding_attention" not in layer_types \
        and getattr(config, "attn_logit_softcapping", None) is None


AttentionInterface.register(VARLEN, varlen_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, varlen_mask)
