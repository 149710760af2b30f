"""Preference training on the one loop: pair encoding, the reference model, accumulation, learning."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import write_jsonl
from tunesmith.config import config_from_dict
from tunesmith.config.schema import AlignConfig
from tunesmith.data.formats import load_rows
from tunesmith.data.templates import install_template
from tunesmith.data.tokenize import IGNORE_INDEX, tokenize_rows
from tunesmith.errors import ConfigError
from tunesmith.model.strategies import apply_strategy
from tunesmith.objectives import build_objective
from tunesmith.objectives.align import adapters_disabled, collate_pairs, mismatched_rows, policy_logps
from tunesmith.objectives.tokens import accepts_logits_to_keep, completion_logps, model_inputs, sequence_logps
from tunesmith.data.batching import collate
from tunesmith.track.metrics import read_metrics
from tunesmith.train.loop import train_step
from tunesmith.train.run import train


def preference_rows(n: int, seed: int) -> list[dict]:
    """Two answers with the same tokens in another order (so neither wins by length); numbers differ between
    seeds, so held-out pairs are new prompts."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        rows.append({"prompt": f"What is {a} plus {b}?", "chosen": f"It is {a + b}. Hello world.",
                     "rejected": f"world. Hello is It {a + b}"})
    return rows


def unpaired_rows(n: int, seed: int) -> list[dict]:
    rows = []
    for i, pair in enumerate(preference_rows(n, seed)):
        good = i % 2 == 0
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"],
                     "label": good})
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefs")
    return {
        "pairs": write_jsonl(root / "pairs.jsonl", preference_rows(32, seed=1)),
        "heldout": write_jsonl(root / "heldout.jsonl", preference_rows(16, seed=2)),
        "unpaired": write_jsonl(root / "unpaired.jsonl", unpaired_rows(32, seed=3)),
        "unpaired_heldout": write_jsonl(root / "unpaired_heldout.jsonl", unpaired_rows(16, seed=4)),
    }


def chat_tokenizer(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    install_template(tokenizer, "chatml")
    return tokenizer


def examples_of(tokenizer, path, n=8):
    examples, _ = tokenize_rows(tokenizer, load_rows(path)[:n], max_seq_len=256)
    return examples


def run_config(model_dir, train_file, out, objective, validation=None, **sections) -> dict:
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": [str(train_file)], "validation": [str(validation)] if validation else [],
                 "template": "chatml", "max_seq_len": 128},
        "strategy": {"name": "lora", "lora": {"r": 8, "alpha": 16}},
        "train": {"output_dir": str(out), "objective": objective, "max_steps": 24, "micro_batch_size": 8,
                  "lr": 5e-3, "seed": 3},
        "tracking": {"progress_bar": False, "log_level": "warning"},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


# ---------------------------------------------------------------------------------------------------
# Data


def test_a_preference_row_encodes_to_two_conversations_with_the_same_prompt(tokenizer, data):
    """Golden decoding: the supervised tokens of each side are exactly its answer and the end-of-turn token,
    and the prompt is what `apply_chat_template(..., add_generation_prompt=True)` gives at inference."""
    tok = chat_tokenizer(tokenizer)
    example = examples_of(tok, data["pairs"], 1)[0]
    row = preference_rows(1, seed=1)[0]
    prompt = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                     tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    for ids, labels, answer in ((example.input_ids, example.labels, row["chosen"]),
                                (example.rejected_ids, example.rejected_labels, row["rejected"])):
        assert ids[: len(prompt_ids)] == prompt_ids
        assert all(t == IGNORE_INDEX for t in labels[: len(prompt_ids)])
        supervised = [t for t in labels if t != IGNORE_INDEX]
        assert tok.decode(supervised) == answer + "<|im_end|>"


def test_pair_batches_hold_chosen_rows_then_rejected_rows(tokenizer, data):
    tok = chat_tokenizer(tokenizer)
    examples = examples_of(tok, data["pairs"], 3)
    batch = collate_pairs(examples, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    for i, e in enumerate(examples):
        assert batch["input_ids"][i, : len(e.input_ids)].tolist() == e.input_ids
        assert batch["input_ids"][3 + i, : len(e.rejected_ids)].tolist() == e.rejected_ids
        assert batch["labels"][3 + i, len(e.rejected_ids):].eq(IGNORE_INDEX).all()


def test_kto_mismatched_rows_pair_each_prompt_with_the_next_completion(tokenizer, data):
    tok = chat_tokenizer(tokenizer)
    examples = examples_of(tok, data["unpaired"], 4)
    batches = [collate(examples[:2], tok.pad_token_id), collate(examples[2:], tok.pad_token_id)]
    rows = mismatched_rows(batches, tok.pad_token_id)

    def split(e):
        start = next(i for i, t in enumerate(e.labels) if t != IGNORE_INDEX)
        return e.input_ids[:start], e.input_ids[start:]

    for i, row in enumerate(rows):
        prompt, _ = split(examples[i])
        _, completion = split(examples[(i + 1) % 4])
        assert row.input_ids == prompt + completion
        assert [t for t in row.labels if t != IGNORE_INDEX] == completion


# ---------------------------------------------------------------------------------------------------
# The reference model


def test_lora_with_adapters_disabled_gives_the_base_models_log_probs_exactly(tokenizer, model_dirs, data):
    tok = chat_tokenizer(tokenizer)
    batch = collate_pairs(examples_of(tok, data["pairs"], 4), tok.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    base.resize_token_embeddings(len(tok))
    with torch.no_grad():
        expected, _ = policy_logps(base, batch)
    model = apply_strategy(copy.deepcopy(base), "lora", lora_r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the output
        changed, _ = policy_logps(model, batch)
        with adapters_disabled(model):
            reference, _ = policy_logps(model, batch)
    assert not torch.allclose(changed, expected)
    assert torch.equal(reference, expected)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_logits_from_the_first_answer_token_on_give_the_full_log_probs_and_gradients(family, tokenizer, model_dirs,
                                                                                     data):
    """`completion_logps` asks the model for the logits of the answer positions only (the prompt needs no
    language-model head); its log-probs and the LoRA gradients equal those of the full logits."""
    tok = chat_tokenizer(tokenizer)
    batch = collate_pairs(examples_of(tok, data["pairs"], 4), tok.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(model_dirs[family])
    base.resize_token_embeddings(len(tok))
    model = apply_strategy(base, "lora", lora_r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert accepts_logits_to_keep(model)
    lengths = []  # positions the language-model head computes
    head = model.get_base_model().get_output_embeddings()
    hook = head.register_forward_hook(lambda module, inputs, output: lengths.append(output.shape[1]))
    results = []
    for trimmed in (True, False):
        model.zero_grad()
        if trimmed:
            logps, counts = completion_logps(model, batch)
        else:
            logps, counts = sequence_logps(model(**model_inputs(batch)).logits, batch["labels"])
        logps.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logps.detach(), counts, grads))
    hook.remove()
    first = int((batch["labels"][:, 1:] != IGNORE_INDEX).any(0).nonzero()[0])
    width = batch["input_ids"].shape[1]
    assert lengths == [width - first, width] and first > 0  # the prompt's logits were skipped
    (a, ca, ga), (b, cb, gb) = results
    assert torch.equal(ca, cb)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6)


def test_full_fine_tuning_has_no_adapters_to_disable(tokenizer, model_dirs, data):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    with pytest.raises(ConfigError, match="precompute_ref"):
        with adapters_disabled(model):
            pass


# ---------------------------------------------------------------------------------------------------
# Gradient accumulation equals the large batch, for every preference loss


def _model_for(objective, model_dirs, tok):
    if objective == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(model_dirs["llama"], num_labels=1)
        model.config.pad_token_id = tok.pad_token_id
        model.resize_token_embeddings(len(tok))
        return apply_strategy(model, "lora", lora_r=4, task_type="SEQ_CLS")
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    model.resize_token_embeddings(len(tok))
    model = apply_strategy(model, "lora", lora_r=4)
    with torch.no_grad():  # a policy away from its reference, so every term of every loss is live
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


@pytest.mark.parametrize("objective", ["dpo", "ipo", "simpo", "orpo", "kto", "reward"])
def test_gradient_accumulation_equals_large_batch(objective, tokenizer, model_dirs, data):
    """Micro-batch 2 x accumulation 4 gives the gradient and logged loss of batch 8 x 1 (fp32, rel 1e-5)."""
    tok = chat_tokenizer(tokenizer)
    name, align = objective, AlignConfig()
    if objective == "ipo":
        name, align = "dpo", AlignConfig(loss_type="ipo")
    examples = examples_of(tok, data["unpaired" if objective == "kto" else "pairs"], 8)
    accelerator = Accelerator(cpu=True)
    results = []
    for micro, accum in ((8, 1), (2, 4)):
        torch.manual_seed(0)
        model = _model_for(objective, model_dirs, tok)
        obj = build_objective(name, align, pad_token_id=tok.pad_token_id)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        batches = [obj.collate(examples[i : i + micro], tok.pad_token_id) for i in range(0, 8, micro)]
        stats = train_step(model, obj, optimizer, scheduler, accelerator, batches, None)
        grads = {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}
        results.append((stats["loss_sum"] / stats["units"], stats["metrics"], grads))
    (loss_big, metrics_big, grads_big), (loss_acc, metrics_acc, grads_acc) = results
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    assert metrics_acc == pytest.approx(metrics_big, rel=1e-4, abs=1e-5)  # sums of per-row float32 log-probs
    for n, grad in grads_big.items():  # relative to each gradient's norm: float32 noise on near-zero entries
        assert float((grads_acc[n] - grad).norm() / grad.norm().clamp(min=1e-12)) < 1e-5, n
    assert any(g.abs().sum() > 0 for g in grads_big.values())


# ---------------------------------------------------------------------------------------------------
# Learning, end to end through `train`


def preference_rate(model, tok, path) -> float:
    """Share of pairs whose chosen answer the model finds more likely than the rejected one."""
    batch = collate_pairs(examples_of(tok, path, 64), tok.pad_token_id)
    with torch.no_grad():
        logps, _ = policy_logps(model, batch)
    n = batch["input_ids"].shape[0] // 2
    return float((logps[:n] > logps[n:]).float().mean())


def _final_model(run_dir, base_dir):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(run_dir / "final")
    base.resize_token_embeddings(len(tok))
    return PeftModel.from_pretrained(base, run_dir / "final").eval(), tok


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_raises_the_preference_rate_on_held_out_pairs(precompute, tokenizer, model_dirs, data, tmp_path):
    cfg = run_config(model_dirs["llama"], data["pairs"], tmp_path / "dpo", "dpo", validation=data["heldout"],
                     align={"beta": 0.5, "precompute_ref": precompute})
    train(config_from_dict(cfg))
    model, tok = _final_model(tmp_path / "dpo", model_dirs["llama"])
    with adapters_disabled(model):
        before = preference_rate(model, tok, data["heldout"])
    after = preference_rate(model, tok, data["heldout"])
    assert after >= 0.9 and after > before
    evals = [r for r in read_metrics(tmp_path / "dpo" / "metrics.jsonl") if "eval_loss" in r]
    assert evals[-1]["eval_rewards/accuracy"] >= 0.9
    assert evals[-1]["eval_rewards/margin"] > 0


def test_precomputed_reference_gives_the_same_losses_as_the_live_one(model_dirs, data, tmp_path):
    """Full fine-tuning: a frozen copy or log-probs computed once before training, same run."""
    losses = []
    for precompute in (False, True):
        out = tmp_path / f"run-{precompute}"
        cfg = run_config(model_dirs["llama"], data["pairs"], out, "dpo", strategy={"name": "full"},
                         train={"max_steps": 3, "lr": 1e-4}, align={"precompute_ref": precompute})
        train(config_from_dict(cfg))
        losses.append([r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert losses[0][0] == pytest.approx(0.6931472, rel=1e-5)  # policy == reference at the first step: log 2


def test_reward_model_orders_held_out_pairs(tokenizer, model_dirs, data, tmp_path):
    cfg = run_config(model_dirs["llama"], data["pairs"], tmp_path / "rm", "reward", validation=data["heldout"],
                     train={"max_steps": 30})
    train(config_from_dict(cfg))
    evals = [r for r in read_metrics(tmp_path / "rm" / "metrics.jsonl") if "eval_loss" in r]
    assert evals[-1]["eval_scores/accuracy"] >= 0.9
    # The saved adapter includes the score head: reload with plain peft and score the held-out pairs.
    from peft import PeftModel

    tok = __import__("transformers").AutoTokenizer.from_pretrained(tmp_path / "rm" / "final")
    base = AutoModelForSequenceClassification.from_pretrained(model_dirs["llama"], num_labels=1)
    base.config.pad_token_id = tok.pad_token_id
    base.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(base, tmp_path / "rm" / "final").eval()
    batch = collate_pairs(examples_of(tok, data["heldout"], 16), tok.pad_token_id)
    with torch.no_grad():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    assert float((scores[:16] > scores[16:]).float().mean()) >= 0.9


def test_orpo_and_simpo_move_their_margins_the_right_way(model_dirs, data, tmp_path):
    for objective, key in (("orpo", "eval_log_odds"), ("simpo", "eval_rewards/margin")):
        out = tmp_path / objective
        cfg = run_config(model_dirs["llama"], data["pairs"], out, objective, validation=data["heldout"],
                         train={"max_steps": 16}, eval={"every": 8}, align={"beta": 2.0})
        train(config_from_dict(cfg))
        evals = [r[key] for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
        assert evals[-1] > evals[0] and evals[-1] > 0, (objective, evals)


def test_kto_raises_desirable_rewards_and_lowers_undesirable_ones(model_dirs, data, tmp_path):
    cfg = run_config(model_dirs["llama"], data["unpaired"], tmp_path / "kto", "kto",
                     validation=data["unpaired_heldout"], train={"max_steps": 16}, align={"beta": 0.5})
    train(config_from_dict(cfg))
    last = [r for r in read_metrics(tmp_path / "kto" / "metrics.jsonl") if "eval_loss" in r][-1]
    assert last["eval_rewards/desirable"] > 0 > last["eval_rewards/undesirable"]


def test_dpo_is_deterministic(model_dirs, data, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = run_config(model_dirs["qwen2"], data["pairs"], tmp_path / name, "dpo",
                         strategy={"lora": {"r": 4, "alpha": 8, "dropout": 0.1}}, train={"max_steps": 10,
                                                                                        "micro_batch_size": 4})
        train(config_from_dict(cfg))
        runs.append([r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r])
    assert len(runs[0]) == 10 and runs[0] == runs[1]


# ---------------------------------------------------------------------------------------------------
# Refused configurations


def test_a_preference_objective_on_chat_data_is_refused(model_dirs, tmp_path):
    from conftest import chat_rows

    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    cfg = run_config(model_dirs["llama"], chat, tmp_path / "run", "dpo")
    with pytest.raises(ConfigError, match="train.objective: dpo trains on preference pairs"):
        train(config_from_dict(cfg))


def test_packing_is_refused_for_preference_objectives(model_dirs, data, tmp_path):
    cfg = run_config(model_dirs["llama"], data["pairs"], tmp_path / "run", "dpo", data={"pack": True})
    with pytest.raises(ConfigError, match="data.pack"):
        config_from_dict(cfg)
