"""Preference pairs padding-free with each pair's prompt computed once (objectives/pairs.py): the same log-probs,
counts, losses and gradients as the padded pair batch they replace, on Llama, Qwen2 and GPT-2, with the head
training, frozen (LoRA) or read from the logits; and a DPO run that trains like the padded one."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import write_jsonl
from test_align import chat_tokenizer, examples_of, preference_rows, run_config
from tunesmith.config import config_from_dict
from tunesmith.config.schema import AlignConfig
from tunesmith.data.batching import example_tokens
from tunesmith.data.tokenize import IGNORE_INDEX, Example
from tunesmith.errors import ConfigError
from tunesmith.model.attention import VARLEN, runs
from tunesmith.model.strategies import apply_strategy
from tunesmith.objectives import build_objective
from tunesmith.objectives.align import collate_pairs, dpo_loss, pair_count
from tunesmith.objectives import pairs as pairs_module
from tunesmith.objectives.pairs import collate_pairs_flat, flat_sequence_logps, shared_prefix
from tunesmith.objectives.tokens import completion_logps
from tunesmith.train.run import train

pytestmark = pytest.mark.usefixtures("one_thread")

X = IGNORE_INDEX


def _pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> Example:
    return Example(prompt + chosen, [X] * len(prompt) + chosen, "p", rejected_ids=prompt + rejected,
                   rejected_labels=[X] * len(prompt) + rejected)


def test_a_pair_row_shares_the_prompt_but_its_last_token():
    a = _pair([1, 2, 3], [4, 5], [6, 7, 8])
    b = _pair([9, 10], [11], [12, 13])
    assert [shared_prefix(a), shared_prefix(b)] == [2, 1]
    batch = collate_pairs_flat([a, b])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 3, 6, 7, 8, 9, 10, 11, 10, 12, 13]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 4, 5, 0, 1, 2, 1, 2, 3]]
    assert batch["labels"].tolist() == [[X, X, X, 4, 5, X, 6, 7, 8, X, X, 11, X, 12, 13]]
    assert batch["sequence_ids"].tolist() == [[-1, -1, 0, 0, 0, 2, 2, 2, 2, -1, 1, 1, 3, 3, 3]]
    assert batch["sequence_lengths"].tolist() == [5, 3, 6, 4]
    assert pair_count(batch) == 2 and example_tokens(batch) == 18  # the data's tokens, not the row's 15
    assert runs(batch["position_ids"]) == [[(0, 5, 0, 0), (5, 9, 0, 2), (9, 12, 9, 0), (12, 15, 9, 1)]]


def test_answers_that_start_alike_share_only_the_prompt():
    """Common answer tokens are supervised: each branch must predict them itself."""
    pair = _pair([1, 2, 3], [4, 4, 5], [4, 4, 6])
    assert shared_prefix(pair) == 2
    unshared = collate_pairs_flat([pair], share_prompts=False)
    assert unshared["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]]
    assert unshared["sequence_ids"].tolist() == [[0] * 6 + [1] * 6]
    assert unshared["labels"].tolist() == [[X, X, X, 4, 4, 5, X, X, X, 4, 4, 6]]


def test_a_branch_cannot_continue_more_than_its_document():
    with pytest.raises(ValueError, match="restart at 4"):
        runs(torch.tensor([[0, 1, 2, 4, 5]]))


@pytest.fixture(scope="module")
def pairs(tokenizer, tmp_path_factory):
    tok = chat_tokenizer(tokenizer)
    path = write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", preference_rows(8, seed=5))
    return tok, examples_of(tok, path, 6)


def _model(model_dirs, family, tok, strategy):
    model = AutoModelForCausalLM.from_pretrained(model_dirs[family])
    model.resize_token_embeddings(len(tok))
    if strategy == "lora":
        model = apply_strategy(model, "lora", lora_r=4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("strategy", ["full", "lora", "logits"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_shared_prompt_logps_equal_the_padded_batch(model_dirs, pairs, family, strategy):
    """Every conversation's summed log-prob and count, and the gradient of a weighted sum of them (each sequence
    its own weight, as a preference loss weighs them), against padded rows; the head trains (full), is frozen
    (LoRA: `LinearLogps`) or is not fused (the logits path)."""
    tok, examples = pairs
    padded_model = _model(model_dirs, family, tok, "full" if strategy == "logits" else strategy)
    flat_model = copy.deepcopy(padded_model)
    flat_model.set_attn_implementation(VARLEN)
    if strategy == "logits":  # a head the fused path does not take
        flat_model.config.logit_scale = 1.0 + 1e-9
    batch = collate_pairs_flat(examples)
    assert batch["input_ids"].shape[1] < sum(len(e.input_ids) + len(e.rejected_ids) for e in examples)
    want, want_counts = completion_logps(padded_model, collate_pairs(examples, tok.pad_token_id))
    got, got_counts = flat_sequence_logps(flat_model, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert got_counts.tolist() == want_counts.tolist()
    weights = torch.linspace(-1.0, 2.0, len(want))
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    want_grads, got_grads = _grads(padded_model), _grads(flat_model)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name, grad in want_grads.items():
        assert float((got_grads[name] - grad).norm() / grad.norm().clamp(min=1e-12)) < 1e-5, name


def test_unshared_pairs_on_sdpa_equal_the_padded_batch(model_dirs, pairs):
    """A model whose attention cannot read branches gets the pairs without sharing; transformers' SDPA reads the
    documents from the restarting position ids."""
    tok, examples = pairs
    model = _model(model_dirs, "llama", tok, "full").eval()
    objective = build_objective("dpo", AlignConfig(), padding_free=True, model=model)
    batch = objective.collate(examples, tok.pad_token_id)
    assert batch["input_ids"].shape[1] == sum(len(e.input_ids) + len(e.rejected_ids) for e in examples)
    with torch.no_grad():
        got = flat_sequence_logps(model, batch)[0]
        want = completion_logps(model, collate_pairs(examples, tok.pad_token_id))[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_dpo_loss_with_the_reference_adapters_off(model_dirs, pairs):
    """The reference pass (adapters off, no grad) reads the same shared row: the same loss and metrics."""
    tok, examples = pairs
    model = _model(model_dirs, "qwen2", tok, "lora")
    flat_model = copy.deepcopy(model)
    flat_model.get_base_model().set_attn_implementation(VARLEN)
    objective = build_objective("dpo", AlignConfig(beta=0.5), padding_free=True, model=flat_model)
    assert objective.collate.keywords == {"share_prompts": True}
    padded = dpo_loss(model, collate_pairs(examples, tok.pad_token_id), beta=0.5, loss_type="sigmoid",
                      label_smoothing=0.0)
    flat = objective.loss(flat_model, objective.collate(examples, tok.pad_token_id))
    assert flat.num_units == padded.num_units == len(examples)
    assert float(flat.loss_sum.detach()) == pytest.approx(float(padded.loss_sum.detach()), rel=1e-5)
    assert flat.metrics == pytest.approx(padded.metrics, rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_padding_free_dpo_run_trains_like_the_padded_run(objective, model_dirs, tmp_path, monkeypatch):
    """`tunesmith train` with data.padding_free: the same loss at every step and the same adapters as padded pairs;
    the logged tokens are the conversations' tokens in both."""
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(16, seed=7))
    shared = []

    def recording(examples, pad_token_id=None, *, share_prompts=True):
        shared.append(share_prompts)
        return collate_pairs_flat(examples, pad_token_id, share_prompts=share_prompts)

    monkeypatch.setattr(pairs_module, "collate_pairs_flat", recording)
    results = {}
    for name, padding_free in (("padded", False), ("flat", True)):
        cfg = run_config(model_dirs["llama"], data, tmp_path / name, objective,
                         data={"padding_free": padding_free},
                         train={"max_steps": 3, "micro_batch_size": 4, "grad_accum": 2})
        train(config_from_dict(cfg))
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        results[name] = [(r["loss"], r["tokens"]) for r in records if "loss" in r and "tokens" in r]
    assert len(results["flat"]) == 3 and shared and all(shared)  # build_model set VARLEN: the prompts were shared
    assert [t for _, t in results["flat"]] == [t for _, t in results["padded"]]
    assert [v for v, _ in results["flat"]] == pytest.approx([v for v, _ in results["padded"]], rel=1e-5)
    a = load_file(tmp_path / "padded" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "flat" / "final" / "adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.mark.parametrize(("objective", "strategy", "message"), [
    ("kto", "lora", "data.padding_free: applies to sft, clm, dpo, simpo, orpo, grpo, not kto"),
    ("reward", "lora", "not reward"),
    ("ppo", "lora", "not ppo"),
    ("dpo", "prompt_tuning", "strategy prompt_tuning"),
])
def test_padding_free_is_refused_where_pairs_cannot_share(objective, strategy, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"model": {"name_or_path": "m"}, "data": {"padding_free": True},
                          "strategy": {"name": strategy}, "train": {"objective": objective}})


def test_the_estimate_reads_padding_free_pairs_as_one_fused_row(model_dirs, tmp_path):
    """`tunesmith estimate`: a micro-batch of B pairs padding-free is one row of the 2B conversations (an upper
    bound: the shared prompts are not credited), their log-probs from the head on the answers only."""
    from tunesmith.cli import main

    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(8, seed=7))
    plans = {}
    for name, padding_free in (("padded", False), ("flat", True)):
        cfg = run_config(model_dirs["llama"], data, tmp_path / name, "dpo", data={"padding_free": padding_free},
                         train={"micro_batch_size": 4})
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cfg))
        assert main(["estimate", str(path)]) == 0
        plans[name] = json.loads((tmp_path / name / "estimate.json").read_text())
    flat, padded = plans["flat"]["plan"], plans["padded"]["plan"]
    assert (padded["rows"], padded["seq_len"], padded["fused_loss"]) == (8, 128, False)
    assert (flat["rows"], flat["seq_len"], flat["fused_loss"]) == (1, 8 * 128, True)
    assert plans["flat"]["peak_bytes"] < plans["padded"]["peak_bytes"]
