"""RL on the one loop (GRPO, PPO): prompts, rollouts with their stop token, rewards, logging, learning."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_jsonl
from tunesmith.config import config_from_dict
from tunesmith.config.schema import AlignConfig
from tunesmith.data.batching import collate
from tunesmith.data.formats import load_rows
from tunesmith.data.templates import install_template
from tunesmith.data.tokenize import IGNORE_INDEX, Example, tokenize_rows
from tunesmith.errors import ConfigError
from tunesmith.objectives import build_objective
from tunesmith.objectives.rewards import answer_format, exact_answer
from tunesmith.objectives.rl import GRPO, Rollout, collate_groups, mean_reward, sample_completions, split_prompts
from tunesmith.track.metrics import read_metrics
from tunesmith.model.stops import set_stop_tokens
from tunesmith.train.run import train


def arithmetic_rows() -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": str(a + b)}]} for a in range(5) for b in range(5)]


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("grpo") / "arith.jsonl", arithmetic_rows())


def run_config(model_dir, data_file, out, **sections) -> dict:
    """A small full-fine-tuning GRPO config; `sections` override keys, e.g. train={"objective": "ppo"}."""
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": [str(data_file)], "template": "chatml", "max_seq_len": 64},
        "strategy": {"name": "full"},
        "train": {"output_dir": str(out), "objective": "grpo", "max_steps": 2, "micro_batch_size": 5, "lr": 1e-3,
                  "seed": 1, "scheduler": "constant"},
        "align": {"group_size": 4, "max_new_tokens": 4},
        "tracking": {"progress_bar": False, "log_level": "warning"},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def test_rewards_on_final_answers():
    assert exact_answer("The answer is 7.", "7") == 1.0
    assert exact_answer("7", "7") == 1.0
    assert exact_answer("It is 8", "7") == 0.0
    assert exact_answer("Paris.", "paris") == 1.0
    assert answer_format("12", "") == 1.0 and answer_format("", "") == 0.0
    assert answer_format("word " * 40, "") == 0.0


def test_prompts_are_the_tokens_before_the_answer(tokenizer, arithmetic):
    tok = copy.deepcopy(tokenizer)
    install_template(tok, "chatml")
    examples, _ = tokenize_rows(tok, load_rows(arithmetic)[:3], max_seq_len=64)
    prompts, references = split_prompts(collate(examples, tok.pad_token_id))
    for e, prompt, reference in zip(examples, prompts, references):
        start = next(i for i, t in enumerate(e.labels) if t != IGNORE_INDEX)
        assert prompt == e.input_ids[:start]
        assert reference == [t for t in e.labels if t != IGNORE_INDEX]
    assert tok.decode(references[0], skip_special_tokens=True) == "0"


def test_completions_keep_the_stop_token_they_stopped_at(tokenizer, model_dirs):
    tok = copy.deepcopy(tokenizer)
    install_template(tok, "chatml")
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    model.resize_token_embeddings(len(tok))
    set_stop_tokens(model, tok)
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # make the end-of-turn token by far the likeliest after the first sampled token
        model.lm_head.weight[stop] = 0
        model.lm_head.bias = None
    prompt = tok("hello", add_special_tokens=False)["input_ids"]
    completions = sample_completions(model, [prompt] * 3, tok.pad_token_id, Rollout(max_new_tokens=6))
    for c in completions:
        assert 1 <= len(c) <= 6
        assert stop not in c[:-1]  # nothing after a stop token
        assert c[-1] == stop or len(c) == 6


def test_a_grpo_run_logs_rewards_and_writes_samples(model_dirs, arithmetic, tmp_path):
    cfg = run_config(model_dirs["llama"], arithmetic, tmp_path / "run", strategy={"name": "lora"},
                     align={"group_size": 4, "max_new_tokens": 4, "kl_beta": 0.05, "samples_per_step": 2})
    train(config_from_dict(cfg))
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("reward", "reward_std", "clip_fraction", "approx_kl", "kl", "completion_tokens"):
        assert key in records[0], key
    assert 0.0 <= records[0]["reward"] <= 1.0
    assert records[0]["loss_tokens"] == 5 * 4  # units: one per sampled sequence
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 2, 2]
    assert all({"prompt", "completion", "reward"} <= s.keys() for s in samples)
    assert "What is" in samples[0]["prompt"]


def test_unknown_reward_is_refused_naming_the_key(tokenizer):
    with pytest.raises(ConfigError, match=r"align.rewards\[1\]"):
        build_objective("grpo", AlignConfig(rewards=["exact_answer", "no_such_module:fn"]), tokenizer=tokenizer)


@pytest.mark.slow
def test_grpo_with_an_exact_answer_reward_raises_the_mean_reward(model_dirs, arithmetic, tmp_path):
    """A briefly instruction-tuned model answers about half the sums; GRPO raises its sampled mean reward."""
    sft = run_config(model_dirs["llama"], arithmetic, tmp_path / "sft",
                     train={"objective": "sft", "max_steps": 60, "micro_batch_size": 25, "lr": 3e-3})
    train(config_from_dict(sft))
    grpo = run_config(tmp_path / "sft" / "final", arithmetic, tmp_path / "grpo",
                      train={"max_steps": 30, "micro_batch_size": 25, "lr": 1e-3}, align={"group_size": 8})
    train(config_from_dict(grpo))

    tok = AutoTokenizer.from_pretrained(tmp_path / "sft" / "final")
    examples, _ = tokenize_rows(tok, load_rows(arithmetic), max_seq_len=64)
    scorer = GRPO(tok, Rollout(group_size=16, max_new_tokens=4), [exact_answer])
    rewards = []
    for stage in ("sft", "grpo"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / stage / "final")
        torch.manual_seed(0)
        rewards.append(mean_reward(scorer, model, examples, batch_size=25))
    assert 0.2 < rewards[0] < 0.8, "the tuned model should answer some sums, not all"
    assert rewards[1] > rewards[0] + 0.05, rewards


def test_a_ppo_run_trains_a_value_head_and_delivers_only_the_policy(model_dirs, arithmetic, tmp_path):
    from safetensors.torch import load_file

    cfg = run_config(model_dirs["llama"], arithmetic, tmp_path / "run", strategy={"name": "lora"},
                     train={"objective": "ppo", "max_steps": 4, "save_every": 2},
                     align={"group_size": 2, "ppo_epochs": 2, "kl_coef": 0.1, "kl_target": 0.5, "kl_horizon": 100})
    train(config_from_dict(cfg))
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    for key in ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "reward", "kl", "kl_coef"):
        assert key in records[0], key
    assert records[0]["approx_kl"] == pytest.approx(0.0, abs=1e-6)  # the first step trains on its own samples
    assert records[1]["approx_kl"] > 0  # the second reuses them after an update
    assert records[2]["kl_coef"] != records[0]["kl_coef"]  # adaptive: moved after the first rollout
    saved = load_file(tmp_path / "run" / "checkpoints" / "step-4" / "trainable.safetensors")
    assert any(name.endswith("v_head.weight") for name in saved)
    final = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    assert not any("v_head" in name for name in final)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [1, 3]  # new rollouts every ppo_epochs steps


@pytest.mark.slow
def test_ppo_with_an_exact_answer_reward_raises_the_mean_reward(model_dirs, arithmetic, tmp_path):
    sft = run_config(model_dirs["llama"], arithmetic, tmp_path / "sft",
                     train={"objective": "sft", "max_steps": 60, "micro_batch_size": 25, "lr": 3e-3})
    train(config_from_dict(sft))
    ppo = run_config(tmp_path / "sft" / "final", arithmetic, tmp_path / "ppo",
                     train={"objective": "ppo", "max_steps": 20, "micro_batch_size": 25, "lr": 1e-3},
                     align={"group_size": 4, "ppo_epochs": 2, "kl_coef": 0.02, "vf_coef": 0.5})
    train(config_from_dict(ppo))

    tok = AutoTokenizer.from_pretrained(tmp_path / "sft" / "final")
    examples, _ = tokenize_rows(tok, load_rows(arithmetic), max_seq_len=64)
    scorer = GRPO(tok, Rollout(group_size=16, max_new_tokens=4), [exact_answer])
    rewards = []
    for stage in ("sft", "ppo"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / stage / "final")
        torch.manual_seed(0)
        rewards.append(mean_reward(scorer, model, examples, batch_size=25))
    assert rewards[1] > rewards[0] + 0.05, rewards


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_grpo_loss_from_the_head_on_completions_equals_the_logits_path(model_dirs, tokenizer, strategy,
                                                                       monkeypatch):
    """GRPO's policy and reference log-probs come from the head on the completion positions only
    (`completion_token_logps`): the same loss, metrics, reference log-probs and gradients as the (R, T, V) logits
    path, with the head training (full, a frozen reference copy) and frozen (LoRA, adapters off for the
    reference), and the model's own head call gets no position at all."""
    from tunesmith.model.strategies import apply_strategy
    from tunesmith.objectives import rl

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    reference = copy.deepcopy(model).eval() if strategy == "full" else None
    if strategy == "lora":
        model = apply_strategy(model, "lora", lora_r=4, target_modules="auto")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(6):  # 2 prompts x G = 3, completions of different lengths: padded rows
        prompt = torch.randint(5, len(tokenizer), (5 + 3 * (i // 3),), generator=generator).tolist()
        completion = torch.randint(5, len(tokenizer), (2 + i,), generator=generator).tolist()
        rows.append(Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, f"c{i}"))
    batch = collate(rows, tokenizer.pad_token_id)
    batch["rewards"] = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0])
    batch["advantages"] = rl.group_advantages(batch["rewards"], 3)
    batch["completion_tokens"] = torch.tensor([2 + i for i in range(6)])
    grpo = GRPO(tokenizer, Rollout(group_size=3), [], beta=0.1, ref_model=reference)

    def run(positions: list[int]):
        clone = copy.deepcopy(model).train()
        clone.get_output_embeddings().register_forward_hook(lambda m, args, out: positions.append(args[0].shape[1]))
        with torch.no_grad():
            ref = grpo.reference_token_logps(clone, batch)
        out = grpo.loss(clone, {**batch, "ref_token_logps": ref})
        out.loss_sum.backward()
        return out, ref, {n: p.grad for n, p in clone.named_parameters() if p.grad is not None}

    head_positions: list[int] = []
    fused, fused_ref, fused_grads = run(head_positions)
    assert head_positions and set(head_positions) == {0}
    monkeypatch.setattr(rl, "head_logps", lambda *_: None)
    full, full_ref, full_grads = run([])
    torch.testing.assert_close(fused_ref, full_ref, rtol=1e-5, atol=1e-6)
    assert int((fused_ref != 0).sum()) == sum(2 + i for i in range(6))
    torch.testing.assert_close(fused.loss_sum, full.loss_sum, rtol=1e-5, atol=1e-6)
    assert fused.num_units == full.num_units and fused.metrics.keys() == full.metrics.keys()
    for name, value in full.metrics.items():
        assert fused.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert fused_grads.keys() == full_grads.keys() and len(full_grads) > 0
    for name, grad in full_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _group_rows(vocab: int) -> list[Example]:
    """2 prompts (of 6 and 9 tokens) x G = 3 completions of 2..7 tokens, each prompt's rows adjacent."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for g in range(2):
        prompt = torch.randint(5, vocab, (6 + 3 * g,), generator=generator).tolist()
        for k in range(3):
            completion = torch.randint(5, vocab, (2 + 3 * g + k,), generator=generator).tolist()
            rows.append(Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, f"c{g}{k}"))
    return rows


def test_grouped_rollouts_lie_in_one_row_with_each_prompt_once():
    """Golden layout: each group's prompt up to its last token once, then each sample as a branch that restarts
    at that token (which predicts the completion's first token)."""
    rows = [Example([1, 2, 3, 10, 11], [IGNORE_INDEX] * 3 + [10, 11]),
            Example([1, 2, 3, 20], [IGNORE_INDEX] * 3 + [20]),
            Example([4, 5, 30, 31, 32], [IGNORE_INDEX] * 2 + [30, 31, 32]),
            Example([4, 5, 40], [IGNORE_INDEX] * 2 + [40])]
    batch = collate_groups(rows, 2, share_prompts=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 10, 11, 3, 20, 4, 5, 30, 31, 32, 5, 40]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 3, 4, 1, 2]]
    assert batch["sequence_ids"].tolist() == [[-1, -1, 0, 0, 0, 1, 1, -1, 2, 2, 2, 2, 3, 3]]
    i = IGNORE_INDEX
    assert batch["labels"].tolist() == [[i, i, i, 10, 11, i, 20, i, i, 30, 31, 32, i, 40]]
    assert batch["sequence_lengths"].tolist() == [5, 4, 5, 3]
    unshared = collate_groups(rows, 2, share_prompts=False)
    assert unshared["input_ids"].shape[1] == sum(len(r.input_ids) for r in rows)
    assert unshared["position_ids"].tolist()[0][:9] == [0, 1, 2, 3, 4, 0, 1, 2, 3]


@pytest.mark.parametrize("strategy", ["full", "lora"])
@pytest.mark.parametrize("share_prompts", [True, False])
def test_padding_free_grpo_loss_equals_padded_rows(model_dirs, tokenizer, strategy, share_prompts):
    """GRPO on `collate_groups`' one row (each prompt once for its G samples, through the per-document attention;
    or each sample a document of its own): the same loss, units, metrics, reference log-probs and gradients as the
    padded rows."""
    from tunesmith.model.attention import VARLEN
    from tunesmith.model.strategies import apply_strategy
    from tunesmith.objectives import rl
    from tunesmith.objectives.tokens import causal_lm

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    reference = copy.deepcopy(model).eval() if strategy == "full" else None
    if strategy == "lora":
        model = apply_strategy(model, "lora", lora_r=4, target_modules="auto")
    flat_model = copy.deepcopy(model)
    causal_lm(flat_model).set_attn_implementation(VARLEN)
    flat_reference = None if reference is None else copy.deepcopy(reference)  # as build_reference copies the policy
    if flat_reference is not None:
        flat_reference.set_attn_implementation(VARLEN)
    rows = _group_rows(len(tokenizer))
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0])

    def run(clone, batch, ref_model):
        grpo = GRPO(tokenizer, Rollout(group_size=3), [], beta=0.1, ref_model=ref_model)
        batch = {**batch, "rewards": rewards, "advantages": rl.group_advantages(rewards, 3),
                 "completion_tokens": torch.tensor([len(r.input_ids) for r in rows])}
        clone.train()
        with torch.no_grad():
            batch["ref_token_logps"] = grpo.reference_token_logps(clone, batch)
        out = grpo.loss(clone, batch)
        out.loss_sum.backward()
        return out, grpo.count_units(batch), {n: p.grad for n, p in clone.named_parameters() if p.grad is not None}

    flat, flat_units, flat_grads = run(flat_model, collate_groups(rows, 3, share_prompts), flat_reference)
    padded, padded_units, padded_grads = run(copy.deepcopy(model), collate(rows, tokenizer.pad_token_id), reference)
    torch.testing.assert_close(flat.loss_sum, padded.loss_sum, rtol=1e-5, atol=1e-6)
    assert flat.num_units == padded.num_units == flat_units == padded_units == 6
    for name, value in padded.metrics.items():
        assert flat.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert flat_grads.keys() == padded_grads.keys() and len(padded_grads) > 0
    for name, grad in padded_grads.items():
        torch.testing.assert_close(flat_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_padding_free_grpo_run_trains_like_the_padded_run(model_dirs, arithmetic, tmp_path, monkeypatch):
    """`tunesmith train` with data.padding_free: the rollouts share their prompts, and every step logs the loss,
    reward and units of the padded run."""
    from tunesmith.objectives import rl

    seen = []
    original = rl.collate_groups
    monkeypatch.setattr(rl, "collate_groups", lambda *a: seen.append(a[2]) or original(*a))
    logged = {}
    for name, padding_free in (("padded", False), ("flat", True)):
        cfg = run_config(model_dirs["llama"], arithmetic, tmp_path / name, strategy={"name": "lora"},
                         data={"padding_free": padding_free}, align={"group_size": 4, "max_new_tokens": 4,
                                                                   "kl_beta": 0.05})
        train(config_from_dict(cfg))
        logged[name] = [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
    assert seen and all(seen)  # the flat run's rollouts shared their prompts
    assert [r["step"] for r in logged["flat"]] == [r["step"] for r in logged["padded"]] == [1, 2]
    for a, b in zip(logged["padded"], logged["flat"]):
        assert (a["loss_tokens"], a["reward"]) == (b["loss_tokens"], b["reward"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
