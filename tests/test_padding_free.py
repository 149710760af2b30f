"""Padding-free batches, attention per document and the fused head + loss: the same numbers as the padded,
full-logits path they replace (loss, token count, every gradient), on Llama, Qwen2 and GPT-2."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, Qwen2Config, Qwen2MoeConfig)

from conftest import chat_rows, write_jsonl
from tunesmith.data.batching import collate, collate_flat
from tunesmith.data.pack import pack_examples
from tunesmith.data.tokenize import IGNORE_INDEX, Example
from tunesmith.model.attention import VARLEN, documents, supports_varlen
from tunesmith.objectives import head
from tunesmith.objectives.sft import sft_loss
from tunesmith.objectives.tokens import model_inputs, summed_nll

pytestmark = pytest.mark.usefixtures("one_thread")


def _examples(n: int, vocab: int, seed: int = 0) -> list[Example]:
    """Examples of 4..30 tokens whose first part is a masked prompt."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = [rng.randrange(5, vocab) for _ in range(rng.randint(4, 30))]
        prompt = rng.randint(1, len(ids) - 1)
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:], f"ex{i}"))
    return out


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train()


def test_flat_collate_lays_examples_end_to_end():
    a = Example([7, 8, 9], [IGNORE_INDEX, 8, 9], "a")
    b = Example([4, 5], [4, 5], "b")  # a first label that is supervised: nothing may predict it across a boundary
    packed = Example([1, 2, 3, 4], [IGNORE_INDEX, 2, IGNORE_INDEX, 4], "c;d", position_ids=[0, 1, 0, 1])
    batch = collate_flat([a, b, packed])
    assert batch["input_ids"].tolist() == [[7, 8, 9, 4, 5, 1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 8, 9, IGNORE_INDEX, 5, IGNORE_INDEX, 2, IGNORE_INDEX, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0, 1]]
    assert batch["token_mask"].tolist() == [[1] * 9] and "attention_mask" not in batch
    assert documents(batch["position_ids"]) == [[(0, 3), (3, 5), (5, 7), (7, 9)]]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_varlen_attention_equals_each_document_alone(model_dirs, tokenizer, family):
    model = AutoModelForCausalLM.from_pretrained(model_dirs[family]).eval()
    varlen = copy.deepcopy(model)
    varlen.set_attn_implementation(VARLEN)
    docs = _examples(5, len(tokenizer))
    batch = collate_flat(docs)
    with torch.no_grad():
        got = varlen(**model_inputs(batch)).logits[0]
        block_mask = model(**model_inputs(batch)).logits[0]  # transformers' block-diagonal mask over the row
        alone = torch.cat([model(input_ids=torch.tensor([d.input_ids]), use_cache=False).logits[0] for d in docs])
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, block_mask, rtol=1e-5, atol=1e-5)


def test_varlen_model_pads_and_generates_like_sdpa(model_dirs, tokenizer):
    """Inputs with a padding mask and generation with a cache take SDPA's own path: the same numbers."""
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()
    varlen = copy.deepcopy(model)
    varlen.set_attn_implementation(VARLEN)
    ids = torch.randint(5, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    right, left = torch.ones(2, 9, dtype=torch.long), torch.ones(2, 9, dtype=torch.long)
    right[1, 5:] = 0
    left[1, :4] = 0
    with torch.no_grad():
        torch.testing.assert_close(varlen(input_ids=ids, attention_mask=right).logits,
                                   model(input_ids=ids, attention_mask=right).logits)
    kwargs = {"input_ids": ids, "attention_mask": left, "max_new_tokens": 6, "do_sample": False,
              "pad_token_id": tokenizer.pad_token_id}
    assert torch.equal(varlen.generate(**kwargs), model.generate(**kwargs))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("layout", ["padded", "flat", "packed"])
def test_fused_loss_and_gradients_equal_the_full_logits(model_dirs, tokenizer, family, layout):
    """Full fine-tuning (so the head's weight gradient, tied to the embeddings on GPT-2, is checked too)."""
    model = _no_dropout(AutoModelForCausalLM.from_pretrained(model_dirs[family]))
    examples = _examples(6, len(tokenizer), seed=1)
    batch = {"padded": lambda: collate(examples, tokenizer.pad_token_id), "flat": lambda: collate_flat(examples),
             "packed": lambda: collate(pack_examples(examples, 64), tokenizer.pad_token_id)}[layout]()
    results = []
    for fused in (False, True):
        copy_ = copy.deepcopy(model)
        if layout != "padded":
            copy_.set_attn_implementation(VARLEN)
        out = sft_loss(copy_, batch, fused=fused)
        out.loss_sum.backward()
        results.append((out, {n: p.grad for n, p in copy_.named_parameters()}))
    (full, full_grads), (fused, fused_grads) = results
    reference = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        expected, count = summed_nll(model(**model_inputs(reference)).logits, reference["labels"])
    assert fused.num_units == full.num_units == count
    assert fused.loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    assert full.loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    assert fused_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_loss_chunks_and_bias_give_the_same_numbers():
    """One row per chunk or all rows in one chunk; a head with a bias; every input's gradient against autograd
    through the plain logits, also with a non-unit upstream gradient."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 50)
    targets = torch.randint(0, 50, (37,), generator=g)
    expected = torch.nn.functional.cross_entropy(layer(hidden), targets, reduction="sum")
    (expected * 3.0).backward()
    want = [t.grad.clone() for t in (hidden, layer.weight, layer.bias)]
    for chunk_rows in (1, 5, 1000):
        for t in (hidden, layer.weight, layer.bias):
            t.grad = None
        got = head.LinearNLL.apply(hidden, layer.weight, layer.bias, targets, chunk_rows)
        (got * 3.0).backward()
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)
        for t, w in zip((hidden, layer.weight, layer.bias), want):
            torch.testing.assert_close(t.grad, w, rtol=1e-4, atol=1e-5)  # fp32 sums in another order


def test_fused_chunk_holds_a_fixed_number_of_logits(monkeypatch):
    """Rows per chunk shrink as the vocabulary grows, down to MIN_CHUNK_ROWS: every chunk's logits are written
    into one buffer of at most max(CHUNK_ELEMENTS, MIN_CHUNK_ROWS x V) values."""
    seen, original = [], head.softmax_chunk

    def spy(h, weight, bias, t, buffer):
        seen.append((h.shape[0], buffer.data_ptr(), buffer.numel()))
        return original(h, weight, bias, t, buffer)

    monkeypatch.setattr(head, "softmax_chunk", spy)
    for vocab, rows in ((1000, 3000), (64_000, 131), (262_144, 128)):
        seen.clear()
        layer = torch.nn.Linear(8, vocab, bias=False)
        hidden = torch.randn(3000, 8, requires_grad=True)
        head.linear_nll(hidden, layer, torch.randint(0, vocab, (3000,))).backward()
        assert max(n for n, _, _ in seen) == rows and sum(n for n, _, _ in seen) == 3000
        assert len({(pointer, size) for _, pointer, size in seen}) == 1  # one buffer for all chunks
        assert seen[0][2] == rows * vocab <= max(head.CHUNK_ELEMENTS, head.MIN_CHUNK_ROWS * vocab)


def test_fused_head_only_for_plain_heads(model_dirs):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    assert head.fused_head(model) is model.lm_head
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    assert head.fused_head(lora) is not None
    lora_head = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["lm_head"]))
    assert head.fused_head(lora_head) is None  # the head is a LoRA layer
    prompt = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert head.fused_head(prompt) is None  # virtual tokens shift the positions
    capped = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2))
    capped.config.final_logit_softcapping = 30.0
    assert head.fused_head(capped) is None


def test_varlen_only_for_plain_causal_attention():
    assert supports_varlen(LlamaConfig())
    assert supports_varlen(Gemma3TextConfig()) and supports_varlen(MistralConfig(sliding_window=64))
    assert not supports_varlen(Gemma2Config())  # attention logit soft-capping
    # qwen2_moe's attention does not pass its window to the attention function: transformers' masks keep it
    assert not supports_varlen(Qwen2MoeConfig(use_sliding_window=True, sliding_window=64, max_window_layers=0))
    assert supports_varlen(Qwen2MoeConfig())


_WINDOW = 6  # shorter than most of _examples' documents (4..30 tokens), longer than some
_TINY = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2}
_SLIDING = {
    "gemma3": lambda: Gemma3TextConfig(**_TINY, head_dim=8, sliding_window=_WINDOW,
                                       layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "mistral": lambda: MistralConfig(**_TINY, sliding_window=_WINDOW),
    "qwen2": lambda: Qwen2Config(**_TINY, use_sliding_window=True, sliding_window=_WINDOW, max_window_layers=1),
}


@pytest.mark.parametrize("family", sorted(_SLIDING))
def test_varlen_applies_the_sliding_window_in_each_document(family):
    """Documents longer than the window get its band, as transformers' sliding mask gives each one alone; the
    window is really in force (without it the logits differ)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_SLIDING[family](), attn_implementation="sdpa").eval()
    assert supports_varlen(model.config)
    varlen = copy.deepcopy(model)
    varlen.set_attn_implementation(VARLEN)
    docs = _examples(6, 96, seed=0)
    assert max(len(d.input_ids) for d in docs) > 2 * _WINDOW and min(len(d.input_ids) for d in docs) <= _WINDOW
    with torch.no_grad():
        got = varlen(**model_inputs(collate_flat(docs))).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([d.input_ids]), use_cache=False).logits[0] for d in docs])
        unwindowed = copy.deepcopy(model)
        unwindowed.config.sliding_window = 10_000
        for layer in unwindowed.model.layers:
            if getattr(layer.self_attn, "sliding_window", None):
                layer.self_attn.sliding_window = 10_000
        wide = torch.cat([unwindowed(input_ids=torch.tensor([d.input_ids]), use_cache=False).logits[0]
                          for d in docs])
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
    assert (got - wide).abs().max() > 1e-3


def test_varlen_branch_sees_its_window_over_the_shared_prefix():
    """A branch (position ids restarting at q > 0) with a window: each query sees the last `window` tokens of the
    prefix + branch document, as that document alone does."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_SLIDING["gemma3"](), attn_implementation="sdpa").eval()
    varlen = copy.deepcopy(model)
    varlen.set_attn_implementation(VARLEN)
    prefix, chosen, rejected = torch.arange(5, 13), torch.arange(20, 27), torch.arange(40, 44)
    ids = torch.cat([prefix, chosen, rejected])[None]
    positions = torch.cat([torch.arange(15), torch.arange(8, 12)])[None]
    with torch.no_grad():
        got = varlen(input_ids=ids, position_ids=positions).logits[0]
        first = model(input_ids=torch.cat([prefix, chosen])[None]).logits[0]
        second = model(input_ids=torch.cat([prefix, rejected])[None]).logits[0]
    torch.testing.assert_close(got[:15], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[15:], second[8:], rtol=1e-5, atol=1e-5)


def _config(path, model_dir, data, out, cache, **data_keys) -> str:
    cfg = {"model": {"name_or_path": str(model_dir)},
           "data": {"train": [str(data)], "template": "chatml", "max_seq_len": 256, "cache_dir": str(cache),
                    **data_keys},
           "strategy": {"name": "lora", "lora": {"r": 4, "alpha": 8}},
           "train": {"output_dir": str(out), "max_steps": 4, "micro_batch_size": 4, "grad_accum": 2,
                     "lr": 1e-3, "seed": 3},
           "tracking": {"progress_bar": False, "log_level": "warning"}}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_padding_free_run_trains_like_the_padded_run(model_dirs, tmp_path):
    """`tunesmith train` with data.padding_free: the same loss at every step and the same adapter as padding."""
    from tunesmith.cli import main

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    runs = {}
    for name, keys in (("padded", {}), ("flat", {"padding_free": True})):
        assert main(["train", _config(tmp_path / f"{name}.yaml", model_dirs["qwen2"], data, tmp_path / name,
                                      tmp_path / "cache", **keys)]) == 0
        runs[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                      if '"loss"' in line]
    assert len(runs["flat"]) == 4
    assert runs["flat"] == pytest.approx(runs["padded"], rel=1e-5)
    a = load_file(tmp_path / "padded" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "flat" / "final" / "adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    saved = json.loads((tmp_path / "flat" / "final" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(model_dirs["qwen2"])

