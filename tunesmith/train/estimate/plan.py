"""The training side of the estimate: how a config trains, as plain numbers (`Plan`), and the dtypes that follow."""

from __future__ import annotations

from dataclasses import dataclass

ADAPTERS = ("lora", "dora", "qlora")  # strategies whose trained parameters are fp32 adapters on a frozen base


@dataclass(frozen=True)
class Plan:
    """How the config trains, as plain numbers: everything the estimate depends on besides the model shape."""

    rows: int  # sequences in one micro-batch forward (pairs: chosen + rejected; RL: prompts x group)
    seq_len: int  # padded length of the longest micro-batch
    loss_rows: int  # positions whose logits enter the loss (N)
    mask: bool  # an attention mask reaches SDPA (padding or packing)
    weight_bytes: int  # model dtype
    amp: bool  # train.mixed_precision: 16-bit autocast
    strategy: str
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ()
    lora_dropout: float = 0.0  # peft applies one dropout per adapted module when > 0
    quant_bytes: float = 0.5  # QLoRA bytes per 4-bit weight, scales included
    freeze_layers: int = 0  # strategy freeze: the last N blocks train
    head_trains: bool = False  # strategy freeze/head: the LM head trains
    gradient_checkpointing: bool = False
    grad_accum: int = 1
    reference_copy: bool = False  # a frozen copy of the model
    reference_pass: bool = False  # a no-grad reference forward while the policy's graph is alive
    vocab_logits: bool = True  # False for a reward model (a scalar head)
    eval_rows: int = 0  # rows of a validation batch (0: no validation data)
    source: str = "data.max_seq_len"  # where seq_len and loss_rows come from
    logit_positions: int = 0  # positions the LM head computes (`answer_logits` skips the prompt); 0: seq_len
    fused_loss: bool = False  # head and loss fused on the loss positions (no logits tensor)
    device: str = "cpu"  # where the step runs: "cpu" or "cuda"


def residual_bytes(plan: Plan) -> int:
    """Bytes of the residual stream's elements: the model dtype; QLoRA leaves everything but the 4-bit linears fp32."""
    return 4 if plan.strategy == "qlora" else plan.weight_bytes


def matmul_bytes(plan: Plan) -> int:
    """Bytes of a matmul output's elements: 16 bit under autocast, else the model dtype (QLoRA: fp32, whatever its
    compute dtype: bitsandbytes casts each 4-bit matmul's output back to its input's, the fp32 residual stream)."""
    return 2 if plan.amp else residual_bytes(plan)


def param_dtype_bytes(plan: Plan) -> int:
    """Bytes of a trainable parameter (and of its gradient and AdamW states): adapters are fp32."""
    return 4 if plan.strategy in ADAPTERS else plan.weight_bytes


def dropout_mask_bytes(plan: Plan) -> int:
    """Bytes per element of the mask a LoRA dropout keeps for its input's gradient. On CUDA `F.dropout` is the fused
    `native_dropout`, which keeps a bool mask; elsewhere it is `input * noise` and keeps the scaled noise, in the
    input's dtype (peft has cast the input to the fp32 adapter's)."""
    return 1 if plan.device == "cuda" else 4
