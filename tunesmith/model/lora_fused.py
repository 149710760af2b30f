"""LoRA's update added inside one matrix multiply instead of three passes over the layer's output.

peft's `lora.Linear` computes `result = base(x) + lora_B(lora_A(dropout(x))) * scaling`: after the adapter's
rank-r product it multiplies a (tokens x out) tensor by the scale, then adds it to the base output (a third
(tokens x out) tensor), and backward multiplies the (tokens x out) gradient by the scale again. A LoRA step on a
CPU spends a few percent of its time in those elementwise passes (docs/PERFORMANCE.md, "Distance to the limit").
Here the same sum is one BLAS call that accumulates into the base output: `result.addmm_(h, B^T, alpha=scaling)`
with h = lora_A(dropout(x)) (rows of r values); its backward scales only the small (tokens x r) and (r x out)
products. The arithmetic is the same (the scale is applied to the product in both), so results agree to float
rounding (tests/test_lora_fused.py checks outputs and every gradient against peft's own forward).

Only the plain case takes the fused path: one active LoRA adapter, not merged, no adapter-specific arguments, no
DoRA or other variant, no bias on lora_B, and dtypes that addmm accepts together (the same, or autocast deciding);
anything else runs peft's forward unchanged. The adapters' weights, their names and what peft saves are untouched.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def fuse_lora_forward(model: nn.Module) -> int:
    """Give each of `model`'s plain LoRA linears (peft's `lora.Linear` itself, not a subclass such as the 4-bit
    one) the fused forward; returns how many."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear:
            module.forward = types.MethodType(fused_forward, module)
            count += 1
    return count


def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's `lora.Linear.forward`, with the adapter's product accumulated into the base output (see above)."""
    adapter = _plain_adapter(self, x, args, kwargs)
    if adapter is None:
        return type(self).forward(self, x, *args, **kwargs)
    rows = x.reshape(-1, x.shape[-1])  # 2-D from the start, so that the base output is no view to write into
    result = self.base_layer(rows)
    lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
    h = lora_a(self.lora_dropout[adapter](self._cast_input_dtype(rows, lora_a.weight.dtype)))
    h = h.to(result.dtype)  # under autocast both are in its lower precision already
    weight = lora_b.weight.t().to(result.dtype)
    if result._base is None:
        fused = result.addmm_(h, weight, alpha=self.scaling[adapter])
    else:  # a view (GPT-2's Conv1D reshapes its output): writing into it would copy the gradient back
        fused = torch.addmm(result, h, weight, alpha=self.scaling[adapter])
    return fused.view(*x.shape[:-1], fused.shape[-1])


def _plain_adapter(layer, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one active vanilla LoRA adapter of `layer` when the fused path applies, else None. Without autocast
    the input, the base weight and the adapters must share a dtype (peft casts between them otherwise)."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A or adapter in layer.lora_variant or layer.lora_B[adapter].bias is not None:
        return None
    dtypes = {x.dtype, layer.get_base_layer().weight.dtype, layer.lora_A[adapter].weight.dtype,
              layer.lora_B[adapter].weight.dtype}
    if len(dtypes) > 1 and not torch.is_autocast_enabled(x.device.type):
        return None
    return adapter
