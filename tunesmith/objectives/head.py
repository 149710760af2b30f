"""The language-model head and the next-token loss fused, on the loss-bearing positions only.

A causal LM's last step is `logits = hidden @ W.T` over every position, (B, T, V), and the loss then reads one
entry per supervised position. Here the head runs only on the N positions that carry loss, a chunk of rows at
a time, and each chunk's gradient (softmax - one-hot) is turned into the gradients of the hidden states and of
W while the chunk's logits exist. Neither pass ever holds more than one chunk of logits, so the memory of the
loss does not grow with the vocabulary or the sequence, and the head costs two matmuls per supervised
position (forward, input gradient) plus one for W when W trains, where the usual path pays for every position
and recomputes (or keeps) the logits for backward.

`head_logps` does the same for per-token log-probabilities (the preference losses of padding-free pairs, which
weigh each conversation's tokens by that conversation's factor): with a frozen head (LoRA and the other
adapters) each row's input gradient is made in the forward pass and scaled in backward (`LinearLogps`); a head
that trains recomputes its chunks in backward.

It applies to models whose logits are exactly `lm_head(hidden)` with a plain `nn.Linear` head (Llama, Qwen2,
Mistral, GPT-2, ...): the head is called on the final hidden states through hooks, inside the model's own
forward pass (so DDP and other wrappers see an ordinary forward), and asked for nothing. `head_nll` and
`head_logps` return None when a model is not of that kind, and the caller takes the ordinary path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunesmith.objectives.tokens import IGNORE_INDEX, causal_lm, model_inputs, shift_labels

# A chunk's logits live in one float32 buffer, reused by every chunk and turned into the softmax in place: 2^23
# values (32 MiB) whatever the vocabulary, so chunk rows = 2^23 / V, but never fewer than MIN_CHUNK_ROWS: the
# head's matmuls read all of W once per chunk, and with fewer rows they wait on memory. Gemma 3's 262k x 640 head
# over 937 loss positions, forward and input gradient, on one CPU thread: 23.0 s at 16 rows a chunk, 14.5 at 64,
# 12.6 at 128 (a 128 MiB buffer), 10.8 at 256.
CHUNK_ELEMENTS = 1 << 23
MIN_CHUNK_ROWS = 128


def chunk_rows(vocab: int) -> int:
    """Rows of logits per chunk for a head of `vocab` outputs."""
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab)


# Configuration keys of models that scale or cap the logits after the head (the fused loss would skip that).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class LinearNLL(torch.autograd.Function):
    """sum_i -log softmax(h_i @ W.T + b)[t_i], with the gradients computed in the forward pass, chunk by chunk.

    Inputs: hidden (N, d), weight (V, d), bias (V,) or None, targets (N,) int64, chunk rows. Returns a 0-dim
    float32 tensor. The loss is a plain sum, so its gradient with respect to every input is the forward's
    gradient times one scalar: backward only scales what the forward stored.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows: int):
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        buffer = _chunk_buffer(hidden, weight, rows)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logp, grad = softmax_chunk(h, weight, bias, t, buffer)
            total -= logp.sum()
            if need_h or need_w or need_b:
                # d(-log p_t)/d logits = softmax - one_hot(t), in place of the softmax
                grad[torch.arange(len(t), device=grad.device), t] -= 1.0
                grad = grad.to(h.dtype)
                if need_h:
                    grad_h[start:start + rows] = grad @ weight.to(h.dtype)
                if need_w:
                    grad_w += (grad.t() @ h).float()
                if need_b:
                    grad_b += grad.float().sum(0)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.needs = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_output if need else None for need in ctx.needs]
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None


def _chunk_buffer(hidden: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
    """The float32 (rows, V) buffer every chunk's logits are written into."""
    return hidden.new_empty((min(rows, hidden.shape[0]), weight.shape[0]), dtype=torch.float32)


def softmax_chunk(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, t: torch.Tensor,
                  buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For the rows h (n, d): log p(t) (n,) float32 and the softmax (n, V), which is written over the first n rows
    of `buffer` (no other (n, V) tensor is made where h and W are float32 and autocast is off). log p(t) is
    (x_t - max) - log sum exp(x - max), as log_softmax computes it."""
    logits = buffer[:h.shape[0]]
    if h.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type):
        torch.mm(h, weight.t(), out=logits)
        if bias is not None:
            logits += bias
    else:  # a 16-bit or autocast matmul gives its own dtype: its (n, V) result is copied in
        logits.copy_(F.linear(h, weight, bias))
    shifted = logits.sub_(logits.amax(dim=-1, keepdim=True))
    picked = shifted.gather(1, t[:, None]).squeeze(1)
    probs = shifted.exp_()
    sums = probs.sum(dim=-1, keepdim=True)
    return picked - sums.log().squeeze(1), probs.div_(sums)


def linear_nll(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (float32, 0-dim) of `targets` (N,) given final hidden states (N, d)."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + head.weight.sum() * 0.0  # keeps the graph (and DDP) whole
    return LinearNLL.apply(hidden, head.weight, head.bias, targets, chunk_rows(head.out_features))


def fused_head(model) -> nn.Linear | None:
    """The model's plain linear LM head when the fused loss applies to it, else None."""
    inner = causal_lm(model)
    if inner is None or any(getattr(inner.config, key, None) not in (None, 1, 1.0) for key in LOGIT_TRANSFORMS):
        return None
    head = inner.get_output_embeddings()
    if type(head) is not nn.Linear or any(type(p).__name__ == "DTensor" for p in head.parameters()):
        return None  # a wrapped head (LoRA on the head, trainable tokens) or a sharded one
    return head


class LinearLogps(torch.autograd.Function):
    """log softmax(h_i @ W.T + b)[t_i] for each i, chunk by chunk, for a head that does not train.

    d logp_i / d h_i = (one_hot(t_i) - softmax_i) @ W is a (d,) vector per row, computed while the chunk's logits
    exist; backward scales each row by its incoming gradient. So the (N, V) logits are never kept or recomputed,
    as in LinearNLL, but the rows may be weighted differently (a preference loss weighs each sequence's tokens by
    that sequence's factor). A head whose weight trains needs sum_i g_i (...)^T h_i, which depends on g: see
    `linear_logps`. Inputs: hidden (N, d), weight (V, d), bias (V,) or None, targets (N,), chunk rows; returns (N,)
    float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows: int):
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        buffer = _chunk_buffer(hidden, weight, rows)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logps[start:start + rows], grad = softmax_chunk(h, weight, bias, t, buffer)
            if grad_h is not None:
                grad.neg_()[torch.arange(len(t), device=grad.device), t] += 1.0  # one_hot - softmax, in place
                grad_h[start:start + rows] = grad.to(h.dtype) @ weight.to(h.dtype)
        if grad_h is not None:
            ctx.save_for_backward(grad_h)
        return logps

    @staticmethod
    def backward(ctx, grad_output):
        (grad_h,) = ctx.saved_tensors
        return (grad_output[:, None] * grad_h.float()).to(grad_h.dtype), None, None, None, None


def linear_logps(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) (N,) float32 given final hidden states (N, d), chunked. A frozen head takes `LinearLogps`;
    a training one recomputes each chunk's logits in backward (checkpointed), which gives its weight gradient."""
    rows = chunk_rows(head.out_features)
    if not any(p.requires_grad for p in head.parameters()):
        return LinearLogps.apply(hidden, head.weight, head.bias, targets, rows)
    out = []
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start:start + rows], targets[start:start + rows]
        out.append(checkpoint(_chunk_logps, h, head.weight, head.bias, t, use_reentrant=False,
                              preserve_rng_state=False))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32) + head.weight.sum() * 0.0


def _chunk_logps(h, weight, bias, t):
    return -F.cross_entropy(F.linear(h, weight, bias).float(), t, reduction="none")


def head_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int] | None:
    """Summed next-token NLL over the batch's loss-bearing positions and their count, or None when the model's
    head is not a plain linear layer (then use `tokens.summed_nll` on the logits)."""
    found = on_supervised_hidden(model, batch, linear_nll)
    return None if found is None else (found[0], int(found[1].sum()))


def head_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """log p of each supervised target (N,) float32, in row-major order of `tokens.target_mask`, or None when the
    model's head is not a plain linear layer (then use `tokens.token_logps` on the logits)."""
    found = on_supervised_hidden(model, batch, linear_logps)
    return None if found is None else found[0]


def on_supervised_hidden(model, batch: dict[str, torch.Tensor], fn) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`fn(hidden (N, d), head, targets (N,))` on the final hidden states of the batch's N positions that predict a
    supervised token, computed inside the model's forward pass, and those positions' (B, T) mask; None when the
    model's head is not a plain linear layer (`fused_head`).

    The model runs its ordinary forward pass; a hook hands the head an empty sequence (so it computes nothing) and
    calls `fn` with the head's weights as they are inside the forward pass.
    """
    head = fused_head(model)
    if head is None:
        return None
    targets = shift_labels(batch["labels"])  # (B, T)
    keep = targets != IGNORE_INDEX
    result: dict[str, torch.Tensor] = {}

    def take_hidden(module, args):
        (hidden,) = args
        result["out"] = fn(hidden[keep], module, targets[keep])
        # A new empty tensor, not a view: autograd would keep the view's storage, every hidden state, alive
        return (hidden.new_empty((hidden.shape[0], 0, hidden.shape[2])),)

    handle = head.register_forward_pre_hook(take_hidden)
    try:
        model(**model_inputs(batch))
    finally:
        handle.remove()
    return result["out"], keep
