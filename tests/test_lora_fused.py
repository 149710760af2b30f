"""The fused LoRA forward (tunesmith/model/lora_fused.py) against peft's own: the same outputs and the same
gradients for every adapter weight and the input, with and without dropout, on Llama and GPT-2 (Conv1D), under
bf16 autocast, with the adapters off, merged, or a second adapter active."""

from __future__ import annotations

import copy

import pytest
import torch

from tunesmith.demo.tiny import build_model
from tunesmith.model.strategies import apply_strategy

LLAMA_LINEARS = 2 * 7  # q, k, v, o, gate, up, down in each of 2 blocks


def adapted(family: str, dropout: float = 0.0):
    """(fused, peft's): the same model with the same LoRA adapters (B random, so that they change the output),
    one with tunesmith's fused forward (what apply_strategy installs), the other with peft's."""
    model = apply_strategy(build_model(family, 97, hidden_size=32, num_heads=4), "lora", lora_r=4, lora_alpha=8,
                           lora_dropout=dropout)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    plain = copy.deepcopy(model)
    for module in plain.modules():
        module.__dict__.pop("forward", None)  # back to peft's class method
    return model, plain


def run(model, ids, seed=0, autocast=False):
    """Logits and the gradients of every trainable weight after a backward pass of a fixed function of them."""
    torch.manual_seed(seed)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    (logits.float().square().mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=name)


IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))


def test_apply_strategy_installs_it_on_every_adapted_linear():
    model, plain = adapted("llama")
    assert sum("forward" in m.__dict__ for m in model.modules()) == LLAMA_LINEARS
    assert sum("forward" in m.__dict__ for m in plain.modules()) == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_outputs_and_gradients_equal_peft(family, dropout):
    model, plain = adapted(family, dropout)
    model.train()
    plain.train()
    assert_same(run(model, IDS), run(plain, IDS))


def test_under_bf16_autocast():
    model, plain = adapted("llama")
    assert_same(run(model, IDS, autocast=True), run(plain, IDS, autocast=True), rtol=2e-2, atol=2e-2)


@torch.no_grad()
def test_adapters_off_merged_and_two_active_take_peft_forward():
    model, plain = adapted("llama")
    fused_out = model(input_ids=IDS).logits
    with model.disable_adapter(), plain.disable_adapter():
        off = model(input_ids=IDS).logits
        torch.testing.assert_close(off, plain(input_ids=IDS).logits)
    assert not torch.allclose(off, fused_out, atol=1e-3)  # the adapters do change the output
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=IDS).logits, fused_out, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    for m in (model, plain):
        m.add_adapter("second", copy.deepcopy(m.peft_config["default"]))
        m.base_model.set_adapter(["default", "second"])
        for name, p in m.named_parameters():
            if ".second." in name:  # A and B the same in both models
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    assert not torch.allclose(model(input_ids=IDS).logits, fused_out, atol=1e-3)
    torch.testing.assert_close(model(input_ids=IDS).logits, plain(input_ids=IDS).logits)
