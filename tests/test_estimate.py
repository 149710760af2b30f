"""`tunesmith estimate`: the memory formulas against hand-computed numbers and against what autograd really keeps,
the peak against the tensors alive during real training steps, orderings, and the command."""

from __future__ import annotations

import dataclasses
import json
import weakref

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import chat_rows, write_jsonl
from tunesmith.cli import main
from tunesmith.config import Config
from tunesmith.demo.tiny import build_model, model_config, save_tiny
from tunesmith.model.strategies import apply_strategy, parameter_counts
from tunesmith.objectives import build_objective
from tunesmith.train.estimate import (Plan, activation_bytes, advice, dora_fixed_bytes, estimate_memory,
                                      flops_per_token, layer_activation_bytes, logits_bytes, mask_bytes, model_shape,
                                      trainable_params, weight_bytes)
from tunesmith.train.optim import build_optimizer

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_config(vocab: int = 400, kv_heads: int = 2, tie: bool = False):
    """2 layers, hidden 64, intermediate 128, 4 query heads of 16, `kv_heads` key/value heads."""
    return model_config("llama", vocab, 64, 2, 4, kv_heads, 128, 512, tie)


def plan(**changes) -> Plan:
    base = Plan(rows=2, seq_len=8, loss_rows=14, mask=False, weight_bytes=4, amp=False, strategy="full")
    return dataclasses.replace(base, **changes)


def test_parameters_and_weight_bytes_of_a_two_layer_llama_by_hand():
    """embeddings 400*64 = 25,600 and an untied head as many; per block q 64*64 = 4,096, k and v 64*32 = 2,048 each,
    o 4,096, gate/up/down 64*128 = 8,192 each, two norms 64 each: 36,992; final norm 64.
    Total 2*25,600 + 2*36,992 + 64 = 125,248 parameters: 500,992 bytes in fp32, half in bf16.
    LoRA r=8 on every linear: 8*(in+out) = 1,024 + 768 + 768 + 1,024 + 3*1,536 = 8,192 per block, 16,384 in all."""
    shape = model_shape(tiny_config())
    assert shape.params == 125_248 == sum(p.numel() for p in build_model("llama", 400, 64, 2, 4, 2, 128).parameters())
    assert weight_bytes(shape, plan()) == 500_992
    assert weight_bytes(shape, plan(weight_bytes=2)) == 250_496
    lora = plan(strategy="lora", lora_r=8, lora_targets=LORA_TARGETS)
    assert trainable_params(shape, lora) == 16_384
    peft_model = apply_strategy(build_model("llama", 400, 64, 2, 4, 2, 128), "lora", lora_r=8, target_modules="auto")
    assert parameter_counts(peft_model)[0] == 16_384
    assert weight_bytes(shape, lora) == 500_992 + 4 * 16_384  # adapters in fp32 on top of the base
    assert model_shape(tiny_config(tie=True)).params == 125_248 - 25_600


def test_qlora_weight_bytes_by_hand():
    """QLoRA r=8 on the tiny Llama (test above: 125,248 parameters, 2 x 36,864 in block linears, 16,384 adapter
    parameters), 4-bit weights at 0.5 bytes: 73,728 * 0.5 = 36,864, adapters 16,384 * 4 = 65,536.
    CUDA: the other 51,520 parameters in fp32, 206,080: 308,480.
    CPU, checkpoint stored and loaded in fp32: the whole file stays mapped, 125,248 * 4 = 500,992: 603,392.
    CPU, checkpoint stored in bf16: released after loading, as on CUDA."""
    shape = model_shape(tiny_config())
    qlora = plan(strategy="qlora", lora_r=8, lora_targets=LORA_TARGETS, quant_bytes=0.5)
    assert weight_bytes(shape, dataclasses.replace(qlora, device="cuda")) == 308_480
    assert weight_bytes(shape, qlora) == 603_392
    assert weight_bytes(dataclasses.replace(shape, stored_bytes=2), qlora) == 308_480


def test_qlora_on_a_cpu_keeps_the_checkpoint_mapped(tmp_path):
    """Why the fp32 checkpoint counts in QLoRA's weights on a CPU: loaded in 4 bit, its unquantised weights (the
    embeddings) are the memory-mapped file's own pages, so the file stays mapped."""
    from tunesmith.model.load import load_model
    from tunesmith.model.strategies import quantization_config

    build_model("llama", 400, 64, 2, 4, 2, 128).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), quantization_config=quantization_config("nf4", True, torch.float32))
    assert model_shape(model.config).stored_bytes == 4
    spans = [[int(a, 16) for a in line.split()[0].split("-")] for line in open("/proc/self/maps")
             if str(tmp_path / "model.safetensors") in line]
    embedding = model.get_input_embeddings().weight.data_ptr()
    assert any(start <= embedding < end for start, end in spans)


def test_activation_bytes_per_token_of_one_block_by_hand():
    """Full fine-tuning in fp32, no mask, H = 64, I = 128, q width 64, k/v width 32, per token:
    norm inputs 2*4*64 = 512, 1/rms 8, normalised inputs (norm weights train) 2*64*4 = 512,
    SDPA q, k, v, out (64 + 32 + 32 + 64)*4 = 768 and log-sum-exp 4*4 = 16, MLP gate, up, silu 3*128*4 = 1,536,
    linear inputs: norm outputs 2*64*4 = 512 (shared by q/k/v and gate/up), down_proj's 128*4 = 512
    (o_proj reads the SDPA output already kept). Total 4,376.
    With a padding mask k and v are repeated to 4 heads (+2*32*4), and each layer keeps the mask in fp32 (R*T*T*4).
    LoRA: no normalised inputs (-512), + r=8 per adapted module 7*8*4; block 0's input needs no gradient, so its
    first norm keeps neither its fp32 input nor 1/rms (-256 - 4)."""
    shape = model_shape(tiny_config())
    assert layer_activation_bytes(shape, plan(), 1) == 4_376
    assert layer_activation_bytes(shape, plan(mask=True), 1) == 4_376 + 256
    assert mask_bytes(plan(mask=True)) == 2 * 8 * 8 * 4
    lora = plan(strategy="lora", lora_r=8, lora_targets=LORA_TARGETS)
    assert layer_activation_bytes(shape, lora, 1) == 4_376 - 512 + 224
    assert layer_activation_bytes(shape, lora, 0) == 4_376 - 512 - 256 - 4 + 224


def test_logits_and_chunked_loss_bytes_by_hand():
    """R = 2 rows of T = 8, N = 14 loss rows, V = 400, fp32 (one chunk):
    forward: logits 2*8*400*4 = 25,600 + loss rows 14*400*4 = 22,400 + fp32 log-softmax 22,400 = 70,400;
    chunk backward: loss rows 22,400 + three fp32 chunk buffers 67,200 = 89,600;
    logits backward: gradient of the loss rows 22,400 + of the logits 25,600 = 48,000.
    bf16 (no autocast): 2-byte logits and rows, but the chunk's fp32 buffers stay 4 bytes (+ the fp32 upcast)."""
    shape = model_shape(tiny_config())
    assert logits_bytes(shape, plan()) == {"forward": 70_400, "chunk backward": 89_600, "logits backward": 48_000}
    half = logits_bytes(shape, plan(weight_bytes=2))
    assert half["forward"] == 12_800 + 11_200 + 22_400 + 22_400 and half["chunk backward"] == 11_200 + 67_200
    # Under mixed precision accelerate hands the loss fp32 logits, whatever the weights.
    assert logits_bytes(shape, plan(amp=True, weight_bytes=2))["chunk backward"] == 89_600


def test_flops_per_token_by_hand():
    """Matmul parameters: 2 blocks * 36,864 + the head 400*64 = 99,328. Full: 6 per parameter; frozen weights with
    adapters: 4 (no weight gradients); causal attention 6 * layers * 64 * T in both. DoRA with dropout runs each
    adapted linear again on the dropped input, forward and backward: + 4 * 2 * 36,864."""
    shape = model_shape(tiny_config())
    assert shape.matmul_params == 99_328
    assert flops_per_token(shape, plan()) == 6 * 99_328 + 6 * 2 * 64 * 8
    lora = plan(strategy="lora", lora_targets=LORA_TARGETS)
    assert flops_per_token(shape, lora) == 4 * 99_328 + 6 * 2 * 64 * 8
    assert flops_per_token(shape, dataclasses.replace(lora, strategy="dora")) == flops_per_token(shape, lora)
    dora = dataclasses.replace(lora, strategy="dora", lora_dropout=0.1)
    assert flops_per_token(shape, dora) == flops_per_token(shape, lora) + 4 * 2 * 36_864
    # The head (6 * 400 * 64 per position with its weight gradient) on 14 of 16 positions under the fused loss,
    # on 6 of 8 from the first answer token on (logit_positions), on all of them otherwise.
    head = 6 * 400 * 64
    assert flops_per_token(shape, plan(fused_loss=True)) == pytest.approx(flops_per_token(shape, plan()) - head / 8)
    assert flops_per_token(shape, plan(logit_positions=6)) == pytest.approx(flops_per_token(shape, plan()) - head / 4)


def _saved_bytes(model, batch, fused: bool = False) -> int:
    """Bytes of every distinct storage autograd keeps for the backward pass of the SFT loss (parameters not counted);
    `fused`: the fused head + loss, else the loss over the model's logits. Only what the graph still holds when
    the forward pass ends counts: DoRA builds and drops a small graph per module (its lora_B @ lora_A, detached)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    packed: list[tuple[weakref.ref, int, int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            packed.append((weakref.ref(t), storage.data_ptr(), storage.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = build_objective("sft", fused_loss=fused).loss(model, batch)  # holds the graph
    alive = {pointer: size for ref, pointer, size in packed if ref() is not None}
    del out  # the graph is freed only after its saved tensors were counted
    return sum(alive.values())


# LoRA dropout over several target-module sets: peft applies one dropout per adapted module, so modules reading one
# input each keep their own dropped copy (and mask); what keeps which depends on which inputs need gradients.
DROPOUT_CASES = [dict(strategy="lora", lora_dropout=0.1, lora_targets=targets, **more) for targets, more in [
    (LORA_TARGETS, {}), (("q_proj",), {}), (("q_proj", "k_proj"), {}), (("q_proj", "v_proj"), dict(mask=True)),
    (("o_proj",), {}), (("down_proj",), {}), (("gate_proj", "up_proj"), dict(weight_bytes=2)),
    (LORA_TARGETS, dict(weight_bytes=2, mask=True)), (LORA_TARGETS, dict(fused_loss=True))]]
# DoRA: each adapted module keeps its base and adapter outputs and a few out-sized vectors; with dropout the base
# output is recomputed from the dropped input, and with 16-bit weights that keeps an fp32 copy of the weight.
DORA_CASES = [dict(strategy="dora", lora_targets=targets, **more) for targets, more in [
    (LORA_TARGETS, {}), (("q_proj", "v_proj"), dict(mask=True)), (("o_proj", "down_proj"), {}),
    (LORA_TARGETS, dict(weight_bytes=2)), (LORA_TARGETS, dict(lora_dropout=0.1)),
    (("q_proj", "gate_proj"), dict(lora_dropout=0.1, weight_bytes=2)), (LORA_TARGETS, dict(fused_loss=True))]]


@pytest.mark.parametrize("case", [dict(), dict(mask=True), dict(strategy="lora"), dict(weight_bytes=2),
                                  dict(strategy="lora", weight_bytes=2, mask=True), dict(fused_loss=True),
                                  dict(fused_loss=True, strategy="lora", mask=True),
                                  dict(strategy="lora", lora_targets=("o_proj",)),
                                  dict(strategy="lora", lora_targets=("down_proj",))] + DROPOUT_CASES + DORA_CASES)
def test_activations_equal_what_autograd_keeps(case):
    """The formula against the tensors autograd saves in a real forward pass (the reference implementation), to the
    byte. Besides the activations the loss keeps: the logits' loss rows, or (fused) the hidden states' gradient and,
    when the head trains, its weight's gradient, both fp32. The estimate leaves out what is too small to matter,
    added here: the rotary cos and sin tables (2 x T x head_dim in the model dtype, shared by the layers), the
    loss's bool mask of positions (R x T), the unfused loss's int64 targets (8 N) and, when the embeddings train,
    their int64 input ids (8 R x T)."""
    p = plan(rows=2, seq_len=24, **case)
    model = build_model("llama", 400, 64, 2, 4, 2, 128).to(torch.bfloat16 if p.weight_bytes == 2 else torch.float32)
    if p.strategy in ("lora", "dora"):
        targets = p.lora_targets or LORA_TARGETS
        model = apply_strategy(model, p.strategy, lora_r=8, lora_dropout=p.lora_dropout, target_modules=list(targets))
        p = dataclasses.replace(p, lora_r=8, lora_targets=targets)
    model.train()
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 20:] = 0 if p.mask else 1
    labels = ids.masked_fill(mask == 0, -100)
    p = dataclasses.replace(p, loss_rows=int((labels[:, 1:] != -100).sum()))
    loss = p.loss_rows * 64 * 4 + (400 * 64 * 4 if p.strategy == "full" else 0) if p.fused_loss \
        else p.loss_rows * 400 * p.weight_bytes
    left_out = 2 * 24 * 16 * p.weight_bytes + 2 * 24 + (0 if p.fused_loss else 8 * p.loss_rows) \
        + (8 * 2 * 24 if p.strategy == "full" else 0)
    expected = activation_bytes(model_shape(tiny_config()), p) + loss + left_out
    saved = _saved_bytes(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, p.fused_loss)
    assert saved == expected


def _norm_family(family: str):
    """Tiny blocks with norms Llama's lack: Qwen3's q_norm and k_norm; Gemma 3's too, with post-attention and
    post-MLP norms, norms computed as x / rms * (1 + weight), and a GELU MLP."""
    from transformers import Gemma3TextConfig, Qwen3Config

    sizes = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32)
    if family == "qwen3":
        return Qwen3Config(**sizes)
    return Gemma3TextConfig(**sizes, sliding_window=512, layer_types=["full_attention"] * 2)


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
@pytest.mark.parametrize("case", [dict(), dict(strategy="lora"), dict(strategy="lora", lora_dropout=0.1),
                                  dict(strategy="lora", lora_targets=("k_proj", "down_proj"))])
def test_norm_activations_equal_what_autograd_keeps(family, case):
    """The extra norms' inputs, to the byte, as in the test above (fused loss). Besides what that test adds, Gemma's
    norms keep the (1 + weight) they multiply by: one hidden-sized (or head_dim-sized, for q_norm and k_norm) fp32
    vector per norm whose input needs grads, and the embeddings' fp32 scale when they train: left out too. Block 0
    with LoRA: its input needs no grads, so its first norm keeps nothing; with only k_proj and down_proj adapted
    q_norm keeps nothing there either."""
    config = _norm_family(family)
    shape = model_shape(config)
    assert (shape.norms, shape.head_norms) == ((4, True) if family == "gemma3_text" else (2, True))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    p = plan(rows=2, seq_len=24, fused_loss=True, **case)
    if p.strategy == "lora":
        targets = p.lora_targets or LORA_TARGETS
        model = apply_strategy(model, "lora", lora_r=8, lora_dropout=p.lora_dropout, target_modules=list(targets))
        p = dataclasses.replace(p, lora_r=8, lora_targets=targets)
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    p = dataclasses.replace(p, loss_rows=46)
    full = p.strategy == "full"
    left_out = 2 * 24 * 32 * 4 + 2 * 24 + p.loss_rows * 64 * 4 + (400 * 64 * 4 + 8 * 48 if full else 0)
    if family == "gemma3_text":  # (1 + weight) per norm, as listed in the docstring
        q_norm = full or "q_proj" in p.lora_targets
        block0 = (full + 3) * 64 + (q_norm + 1) * 32  # every adapter set here has k_proj: k_norm keeps its own
        left_out += 4 * (block0 + (4 * 64 + 2 * 32) + 64) + (4 if full else 0)  # block 1 and the final norm
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    assert _saved_bytes(model.train(), batch, fused=True) == activation_bytes(shape, p) + left_out


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [dict(), dict(lora_dropout=0.1, mask=True)])
def test_qlora_activations_equal_what_autograd_keeps(tmp_path, compute, case):
    """QLoRA on the tiny Llama loaded in 4 bit through bitsandbytes: what autograd keeps is what the estimate says,
    to the byte, as in the test above. The 4-bit matmuls keep nothing (the weight is frozen and dequantised again
    for the input's gradient) and return their input's dtype, the fp32 residual stream, whatever the compute
    dtype; the logits are fp32 (peft leaves the head fp32)."""
    from tunesmith.model.load import load_model
    from tunesmith.model.strategies import quantization_config

    build_model("llama", 400, 64, 2, 4, 2, 128).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), quantization_config=quantization_config("nf4", True, compute))
    p = plan(rows=2, seq_len=24, strategy="qlora", lora_r=8, lora_targets=LORA_TARGETS, **case)
    model = apply_strategy(model, "qlora", lora_r=8, lora_dropout=p.lora_dropout).train()
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 20:] = 0 if p.mask else 1
    labels = ids.masked_fill(mask == 0, -100)
    p = dataclasses.replace(p, loss_rows=int((labels[:, 1:] != -100).sum()))
    left_out = 2 * 24 * 16 * 4 + 2 * 24 + 8 * p.loss_rows  # rotary tables, position mask, targets (see above)
    expected = activation_bytes(model_shape(tiny_config()), p) + p.loss_rows * 400 * 4 + left_out
    assert _saved_bytes(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}) == expected


def test_lora_dropout_bytes_by_hand():
    """LoRA r=8 with dropout on all 7 linears of the tiny Llama, per token. Each adapter runs lora_A(dropout(x)) on
    its own: it keeps its dropped input for lora_A's weight gradient and, when x requires grad, the dropout's mask.
    Input elements of the 7 adapters: q, k, v 3*64, o 64, gate and up 2*64, down 128: 512.
    fp32 on a CPU, block 1: dropped input (4) + fp32 noise (4): 512*8 = 4,096, while the inputs that the adapters
    shared are no longer kept: both norm outputs 2*64*4 and down_proj's input 128*4 (-1,024): +3,072.
    Block 0: its input needs no gradient, so neither do q, k, v's: no noise for them (-3*64*4): +2,304.
    CUDA (native_dropout keeps a bool mask): 512*(4+1) - 1,024 = +1,536.
    Under autocast the dropped input is kept as its bf16 cast, in place of the bf16 copy each adapter kept of x:
    512*(2+4) - 512*2 = +2,048."""
    shape = model_shape(tiny_config())
    lora = plan(strategy="lora", lora_r=8, lora_targets=LORA_TARGETS)
    dropout = dataclasses.replace(lora, lora_dropout=0.05)
    assert layer_activation_bytes(shape, dropout, 1) - layer_activation_bytes(shape, lora, 1) == 3_072
    assert layer_activation_bytes(shape, dropout, 0) - layer_activation_bytes(shape, lora, 0) == 2_304
    cuda = dataclasses.replace(dropout, device="cuda")
    assert layer_activation_bytes(shape, cuda, 1) - layer_activation_bytes(shape, lora, 1) == 1_536
    out, _ = torch.native_dropout(torch.ones(4, requires_grad=True), 0.5, True)  # what F.dropout runs on CUDA
    assert out.grad_fn._saved_result1.dtype == torch.bool
    amp = dataclasses.replace(lora, amp=True)
    assert layer_activation_bytes(shape, dataclasses.replace(amp, lora_dropout=0.05), 1) \
        - layer_activation_bytes(shape, amp, 1) == 2_048


def test_dora_bytes_by_hand():
    """DoRA r=8 on all 7 linears of the tiny Llama. Output features of one block: q 64, k 32, v 32, o 64, gate 128,
    up 128, down 64: 512. Per token each module keeps its base output and its adapter's output: fp32, 512*(4+4) =
    4,096 over LoRA; bf16 weights: a 2-byte base output and the fp32 adapter's, 512*6 = 3,072.
    Per block: the weight norm and m / norm, 512*4*2 = 4,096, and m / norm - 1 where the input requires grad:
    block 1 all 512 (+2,048), block 0 not q, k, v (+(512 - 128)*4 = 1,536). With dropout and bf16 weights peft
    recomputes the base output in fp32 from the dropped input, keeping an fp32 copy of each weight whose input
    requires grad: block 1 all 36,864 weights (147,456 bytes), block 0 all but q, k, v (28,672: 114,688 bytes)."""
    shape = model_shape(tiny_config())
    lora = plan(strategy="lora", lora_r=8, lora_targets=LORA_TARGETS)
    dora = dataclasses.replace(lora, strategy="dora")
    assert layer_activation_bytes(shape, dora, 1) - layer_activation_bytes(shape, lora, 1) == 4_096
    assert dora_fixed_bytes(shape, dora, 1) == 6_144 and dora_fixed_bytes(shape, dora, 0) == 5_632
    half, half_lora = (dataclasses.replace(p, weight_bytes=2) for p in (dora, lora))
    assert layer_activation_bytes(shape, half, 1) - layer_activation_bytes(shape, half_lora, 1) == 3_072
    dropped = dataclasses.replace(half, lora_dropout=0.1)
    assert dora_fixed_bytes(shape, dropped, 1) == 6_144 + 147_456
    assert dora_fixed_bytes(shape, dropped, 0) == 5_632 + 114_688
    assert dora_fixed_bytes(shape, dataclasses.replace(dora, lora_dropout=0.1), 1) == 6_144  # fp32: no copy


def test_lora_dropout_under_autocast_adds_what_autograd_keeps():
    """Under bf16 autocast (fp32 weights) with LoRA on all 7 linears: what dropout adds to the tensors autograd
    saves equals what it adds to the estimate, to the byte (the dropped input is kept as its bf16 cast, the fp32
    noise where the input requires grad, and the bf16 copies of the shared inputs go): per token 2,048 in block 1
    and 1,280 in block 0, whose q, k, v inputs need no gradient (test_lora_dropout_bytes_by_hand), 48 tokens."""
    shape, ids = model_shape(tiny_config()), torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    saved, estimated = [], []
    for dropout in (0.0, 0.1):
        model = apply_strategy(build_model("llama", 400, 64, 2, 4, 2, 128), "lora", lora_r=8, lora_dropout=dropout)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            saved.append(_saved_bytes(model.train(), batch))
        p = plan(rows=2, seq_len=24, amp=True, strategy="lora", lora_targets=LORA_TARGETS, lora_dropout=dropout)
        estimated.append(activation_bytes(shape, p))
    assert saved[1] - saved[0] == estimated[1] - estimated[0] == 48 * (2_048 + 1_280)


class LiveTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the storages alive, counting every storage an operation creates until it is freed; the peak."""

    def __init__(self, existing):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0
        for t in existing:
            self._track(t)

    def _track(self, t) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() in self.sizes or not storage.nbytes():
            return
        self.sizes[storage.data_ptr()] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, storage.data_ptr())

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


@pytest.mark.parametrize("case", [dict(), dict(strategy="lora"), dict(gradient_checkpointing=True),
                                  dict(rows=1, seq_len=6), dict(fused_loss=False),
                                  dict(fused_loss=False, strategy="lora")])
def test_peak_equals_the_tensors_alive_in_real_training_steps(case):
    """Two optimizer steps (the second with AdamW's state) of the real loss, optimizer and backward pass: the
    largest number of tensor bytes alive at once equals the estimated peak (the fourth case peaks in the update).
    The fused head + loss (the default) and the loss over the full logits."""
    p = plan(**{"rows": 4, "seq_len": 48, "fused_loss": True, **case})
    model = build_model("llama", 2000, 64, 2, 4, 2, 128)
    if p.strategy == "lora":
        model = apply_strategy(model, "lora", lora_r=8)
        p = dataclasses.replace(p, lora_r=8, lora_targets=LORA_TARGETS)
    if p.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = build_optimizer(model, 1e-3, 0.0, (0.9, 0.999), 1e-8)
    ids = torch.randint(0, 2000, (p.rows, p.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    p = dataclasses.replace(p, loss_rows=p.rows * (p.seq_len - 1))
    tracker = LiveTensors([*model.parameters(), *model.buffers()])
    with tracker:
        for _ in range(2):
            build_objective("sft", fused_loss=p.fused_loss).loss(model, batch).loss_sum.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary tables, not in the estimate
    estimate = estimate_memory(model_shape(AutoConfig.for_model("llama", **_dims(2000))), p)
    assert estimate.peak == pytest.approx(tracker.peak - buffers, rel=0.02)
    assert estimate.peak_phase == ("update" if p.rows == 1 else "loss")


def _dims(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, tie_word_embeddings=False)


def test_orderings():
    shape = model_shape(AutoConfig.for_model("llama", **_dims(8000)))
    full = estimate_memory(shape, plan(rows=4, seq_len=256, loss_rows=1020))
    lora = estimate_memory(shape, plan(rows=4, seq_len=256, loss_rows=1020, strategy="lora",
                                       lora_targets=LORA_TARGETS))
    assert lora.peak < full.peak and lora.components["optimizer state"] < full.components["optimizer state"] / 50
    checkpointed = estimate_memory(shape, plan(rows=4, seq_len=256, loss_rows=1020, gradient_checkpointing=True))
    assert checkpointed.components["activations"] < full.components["activations"] / 5
    half = estimate_memory(shape, plan(rows=4, seq_len=256, loss_rows=1020, weight_bytes=2))
    assert half.components["weights"] == full.components["weights"] / 2
    qlora = estimate_memory(shape, plan(rows=4, seq_len=256, loss_rows=1020, strategy="qlora",
                                        lora_targets=LORA_TARGETS, quant_bytes=0.5, device="cuda"))
    assert qlora.components["weights"] < lora.components["weights"]
    longer = estimate_memory(shape, plan(rows=4, seq_len=512, loss_rows=2044))
    assert longer.peak > full.peak
    dpo = estimate_memory(shape, plan(rows=8, seq_len=256, loss_rows=2040, reference_copy=True, reference_pass=True))
    assert dpo.components["reference model"] == full.components["weights"] and dpo.peak > full.peak


def test_advice_offers_qlora_only_off_a_cpu():
    """Weights are the biggest part of the peak of LoRA on 4 wide blocks with one short row. On CUDA the advice is
    QLoRA (its 4-bit linears beat bf16's 2 bytes); on a CPU, where bitsandbytes' 4-bit path peaked at 1.08-1.11x
    LoRA's memory (README), it is bf16 weights, and with bf16 weights already only the reason QLoRA is left out."""
    shape = model_shape(AutoConfig.for_model("llama", vocab_size=400, hidden_size=256, num_hidden_layers=4,
                                             num_attention_heads=4, intermediate_size=1024))
    lora = plan(rows=1, seq_len=8, loss_rows=7, strategy="lora", lora_targets=LORA_TARGETS)

    def said(**changes) -> str:
        p = dataclasses.replace(lora, **changes)
        est = estimate_memory(shape, p)
        assert max(est.at_peak, key=est.components.get) == "weights"
        return advice(Config(), shape, p, est)

    assert "strategy.name=qlora would give" in said(device="cuda", weight_bytes=2)
    assert "strategy.name=qlora would give" in said(device="cuda")
    on_cpu = said(device="cpu")
    assert "model.dtype=bf16 would give" in on_cpu and "QLoRA is not offered on a CPU" in on_cpu
    assert said(device="cpu", weight_bytes=2) == ("weights is the biggest part of the peak (QLoRA is not offered on "
                                                  "a CPU: bitsandbytes dequantises the 4-bit weights in every pass "
                                                  "there, and it peaked at 1.08-1.11x LoRA's memory)")


@pytest.fixture
def sft_config(model_dirs, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(16))
    path = tmp_path / "sft.yaml"
    path.write_text(json.dumps({
        "model": {"name_or_path": str(model_dirs["llama"])},
        "data": {"train": [str(data)], "template": "chatml", "max_seq_len": 96, "cache_dir": str(tmp_path / "cache")},
        "strategy": {"name": "lora", "lora": {"r": 4, "alpha": 8}},
        "train": {"output_dir": str(tmp_path / "run"), "micro_batch_size": 4, "max_steps": 3},
        "tracking": {"progress_bar": False},
    }))
    return path


def test_the_command_prints_the_table_and_writes_estimate_json(sft_config, tmp_path, capsys):
    assert main(["estimate", str(sft_config), "train.gradient_checkpointing=true"]) == 0
    out = capsys.readouterr().out
    for text in ("weights", "optimizer state", "activations", "logits and loss", "peak", "tokens/s", "to lower it"):
        assert text in out
    report = json.loads((tmp_path / "run" / "estimate.json").read_text())
    assert report["plan"]["gradient_checkpointing"] and report["plan"]["source"] == "data.max_seq_len"
    assert report["plan"]["rows"] == 4 and report["plan"]["seq_len"] == 96
    assert report["plan"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert torch.cuda.is_available() or "one block measured" in report["device"]
    assert report["tokens_per_s"] == report["device_flops"] * report["utilisation"] / report["flops_per_token"]
    assert report["peak_bytes"] == max(report["phases_bytes"].values()) > report["components_bytes"]["weights"]
    assert not (tmp_path / "run" / "final").exists()  # nothing trained


def test_prepared_data_gives_the_longest_batch(sft_config, tmp_path, capsys):
    assert main(["prepare", str(sft_config), "data.max_seq_len=512"]) == 0
    assert main(["estimate", str(sft_config), "data.max_seq_len=512"]) == 0
    plan_ = json.loads((tmp_path / "run" / "estimate.json").read_text())["plan"]
    assert plan_["source"] == "prepared data" and plan_["seq_len"] < 512  # the longest example, not the limit
    assert plan_["loss_rows"] < plan_["rows"] * (plan_["seq_len"] - 1)  # prompts carry no loss


@pytest.mark.slow
def test_measure_is_close_to_the_estimate(tokenizer, tmp_path, capsys):
    """3 real steps in a fresh process. A 32k vocabulary, so that the tensors outweigh the ~20 MiB that a
    training run adds besides them (see docs/PERFORMANCE.md)."""
    model_dir = save_tiny(tmp_path / "model", build_model("llama", 32000, 128, 2, 4), tokenizer)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(16))
    path = tmp_path / "full.yaml"
    path.write_text(json.dumps({
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": [str(data)], "template": "chatml", "max_seq_len": 128, "cache_dir": str(tmp_path / "c")},
        "strategy": {"name": "full"}, "train": {"output_dir": str(tmp_path / "run"), "micro_batch_size": 4},
    }))
    assert main(["estimate", str(path), "--measure"]) == 0
    measured = json.loads((tmp_path / "run" / "estimate.json").read_text())["measured"]
    assert abs(measured["relative_error"]) < 0.25
    assert "measured peak" in capsys.readouterr().out


@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_rl_logits_follow_the_objective(sft_config, objective):
    """GRPO's update reads its log-probs from the head on the completion positions only (like the fused loss: one
    chunk of logits); PPO's value head reads the same forward pass, which keeps its (R, T, V) logits."""
    from tunesmith.config import load_config
    from tunesmith.train.estimate import plan_from_config

    cfg = load_config(sft_config, [f"train.objective={objective}", "align.rewards=[exact_answer]"])
    p = plan_from_config(cfg, model_shape(tiny_config()), None, device="cpu")[0]
    assert p.fused_loss == (objective == "grpo")
    logits = estimate_memory(model_shape(tiny_config()), p).components["logits and loss"]
    assert (logits < p.rows * p.seq_len * 400 * 4) == (objective == "grpo")
