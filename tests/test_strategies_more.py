"""Head-only, prompt tuning, prefix tuning (and ReFT / features through `tunesmith train`), the classify objective,
and compare-strategies: each strategy trains exactly what it claims, leaves the base bitwise as it was, and
reloads to the same outputs."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import chat_rows, write_jsonl
from test_features import sentiment_dir  # noqa: F401 (a fixture, used by name)
from tunesmith.config import config_from_dict
from tunesmith.errors import ConfigError, DataError
from tunesmith.model.heads import train_only_head
from tunesmith.model.prompt_tuning import PromptSpec, strip_virtual_tokens
from tunesmith.model.strategies import apply_strategy, parameter_counts
from tunesmith.objectives import build_objective
from tunesmith.objectives.base import LossOutput
from tunesmith.data.labelled import LabelledText, collate_labelled, encode_labelled
from tunesmith.objectives.classify import accuracy, classify_logits, classify_loss, classify_objective, predict
from tunesmith.train.loop import train_step
from tunesmith.train.optim import build_optimizer, build_scheduler

HIDDEN, LAYERS = 64, 2  # the tiny models of conftest


pytestmark = pytest.mark.usefixtures("one_thread")


def _causal(model_dirs, family):
    return AutoModelForCausalLM.from_pretrained(model_dirs[family]).eval()


def _classifier(path, num_labels=3, pad_token_id=3):
    torch.manual_seed(0)  # the new head's initial weights
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                              pad_token_id=pad_token_id).eval()


def _trainable(model) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def _frozen_state(model, trainable: set[str]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}


def _train(model, objective, batches, steps=3, lr=1e-2):
    optimizer = build_optimizer(model, lr, 0.0, (0.9, 0.999), 1e-8)
    scheduler = build_scheduler(optimizer, steps, 0, "constant")
    accelerator = Accelerator(cpu=True)
    model.train()
    for step in range(steps):
        train_step(model, objective, optimizer, scheduler, accelerator, [batches[step % len(batches)]], 1.0)
    return model.eval()


def _qa_batch(tokenizer):
    """Prompt + answer rows of different lengths, the answers supervised."""
    from tunesmith.data.batching import collate
    from tunesmith.data.tokenize import Example, encode_completion

    pairs = [("What is 2 plus 3?", " It is 5."), ("What is 4 plus 4? Please.", " It is 8."),
             ("The capital of Peru?", " Lima."), ("Hello world", " Hello.")]
    return collate([Example(*encode_completion(tokenizer, p, a)) for p, a in pairs], tokenizer.pad_token_id)


# ---------------------------------------------------------------------------------------------------
# What trains


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_head_only_trains_only_the_lm_head(model_dirs, family, tokenizer):
    model = apply_strategy(_causal(model_dirs, family), "head")
    assert _trainable(model) == {"lm_head.weight": len(tokenizer) * HIDDEN}


def test_head_only_unties_a_tied_lm_head_so_the_embeddings_stay_frozen(tmp_path, tokenizer):
    from tunesmith.demo.tiny import build_model

    tied = build_model("llama", vocab_size=len(tokenizer), tie_embeddings=True)
    embeddings = tied.get_input_embeddings().weight.detach().clone()
    model = train_only_head(tied)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert _trainable(model) == {"lm_head.weight": len(tokenizer) * HIDDEN}
    _train(model, build_objective("sft"), [_qa_batch(tokenizer)])
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert not torch.equal(model.lm_head.weight, embeddings)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item() < 1e-6


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_new_classification_head_alone_trains_and_freeze_trains_it_too(model_dirs, family):
    model = apply_strategy(_classifier(model_dirs[family]), "head", task_type="SEQ_CLS")
    assert _trainable(model) == {"score.weight": 3 * HIDDEN}
    frozen = apply_strategy(_classifier(model_dirs[family]), "freeze", freeze_last_n_layers=1, task_type="SEQ_CLS")
    assert "score.weight" in _trainable(frozen)


@pytest.mark.parametrize("family,kv_width", [("llama", HIDDEN), ("qwen2", HIDDEN), ("gpt2", HIDDEN)])
def test_soft_prompts_train_only_their_virtual_tokens(model_dirs, family, kv_width):
    prompt = apply_strategy(_causal(model_dirs, family), "prompt_tuning", prompt=PromptSpec(num_virtual_tokens=5))
    assert _trainable(prompt) == {"prompt_encoder.default.embedding.weight": 5 * HIDDEN}
    prefix = apply_strategy(_causal(model_dirs, family), "prefix_tuning", prompt=PromptSpec(num_virtual_tokens=5))
    # a key and a value vector per virtual token, layer and (key/value) head
    assert _trainable(prefix) == {"prompt_encoder.default.embedding.weight": 5 * LAYERS * 2 * kv_width}
    assert parameter_counts(prefix)[0] == 5 * LAYERS * 2 * kv_width


def test_prompt_tuning_text_init_starts_from_the_texts_embeddings(model_dirs, tokenizer):
    model = apply_strategy(_causal(model_dirs, "llama"), "prompt_tuning",
                           prompt=PromptSpec(num_virtual_tokens=4, init_text="Answer briefly and politely."))
    ids = tokenizer("Answer briefly and politely.", add_special_tokens=False)["input_ids"]
    start = model.prompt_encoder["default"].embedding.weight.detach()
    embeddings = model.get_input_embeddings().weight.detach()
    assert torch.equal(start, embeddings[(ids * 4)[:4]])


def test_features_is_not_a_loop_strategy(model_dirs):
    with pytest.raises(ConfigError, match="features trains no weights"):
        apply_strategy(_causal(model_dirs, "llama"), "features")


# ---------------------------------------------------------------------------------------------------
# Training changes only what trains; saved results reload to the same outputs


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("name", ["head", "prompt_tuning", "prefix_tuning"])
def test_lm_strategies_train_their_parameters_only_and_reload_exactly(model_dirs, tokenizer, tmp_path, family, name):
    from peft import PeftModel

    model = apply_strategy(_causal(model_dirs, family), name, prompt=PromptSpec(num_virtual_tokens=4))
    trainable = set(_trainable(model))
    frozen, before = _frozen_state(model, trainable), {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = _qa_batch(tokenizer)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape[:2] == batch["input_ids"].shape, "the loss sees one logit row per input token"
    _train(model, build_objective("sft"), [batch])
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], frozen[n]) for n in frozen), "the base is bitwise unchanged"
    assert all(not torch.equal(params[n], before[n]) for n in trainable), "every trainable tensor moved"
    model.save_pretrained(tmp_path)
    if name == "head":
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    else:
        reloaded = PeftModel.from_pretrained(_causal(model_dirs, family), tmp_path)
        if name == "prompt_tuning":
            strip_virtual_tokens(reloaded)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        diff = (reloaded.eval()(**inputs).logits - model(**inputs).logits).abs().max().item()
        changed = (_causal(model_dirs, family)(**inputs).logits - model(**inputs).logits).abs().max().item()
    assert diff < 1e-6 and changed > 1e-4


@pytest.mark.parametrize("name", ["head", "prompt_tuning", "prefix_tuning", "lora"])
def test_classification_strategies_train_the_head_and_reload_exactly(model_dirs, tokenizer, tmp_path, name):
    from peft import PeftModel

    if name == "prefix_tuning" and not _declares_past_key_values(_classifier(model_dirs["llama"])):
        _assert_prefix_refused_where_peft_fails(model_dirs["llama"])
        return
    model = apply_strategy(_classifier(model_dirs["llama"]), name, task_type="SEQ_CLS", lora_r=2,
                           prompt=PromptSpec(num_virtual_tokens=4))
    trainable = set(_trainable(model))
    assert any(n.endswith("score.weight") or "score.modules_to_save" in n for n in trainable), trainable
    frozen = _frozen_state(model, trainable)
    rows = [type("Row", (), {"text": t, "label": l, "source": "x"}) for t, l in
            [("Hello world", "a"), ("What is two plus three?", "b"), ("The capital of Peru is Lima.", "c")]]
    examples, _ = encode_labelled(tokenizer, rows, ["a", "b", "c"], 64)
    batch = collate_labelled(examples, tokenizer.pad_token_id)
    _train(model, classify_objective(), [batch], steps=3, lr=5e-2)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], frozen[n]) for n in frozen), "the base is bitwise unchanged"
    model.save_pretrained(tmp_path)
    if name == "head":
        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    else:
        reloaded = PeftModel.from_pretrained(_classifier(model_dirs["llama"]), tmp_path)
    with torch.no_grad():
        got, want = classify_logits(reloaded.eval(), batch), classify_logits(model, batch)
    assert got.shape == (3, 3) and (got - want).abs().max().item() < 1e-6


def _declares_past_key_values(classifier) -> bool:
    return "past_key_values" in inspect.signature(classifier.forward).parameters


def _assert_prefix_refused_where_peft_fails(path):
    """transformers 5.x calls the KV cache `cache`: PEFT's own prefix tuning of a classifier then fails at the
    first forward pass. tunesmith refuses it before training, naming the key; were PEFT to pass the prefix again,
    the first assertion fails and the refusal must go."""
    from peft import PrefixTuningConfig, get_peft_model

    plain = get_peft_model(_classifier(path), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="does not support past key values"):
        plain(input_ids=torch.tensor([[5, 6, 7]]))
    with pytest.raises(ConfigError, match="strategy.name: prefix_tuning cannot train a classification or reward"):
        apply_strategy(_classifier(path), "prefix_tuning", task_type="SEQ_CLS", prompt=PromptSpec(num_virtual_tokens=4))


# ---------------------------------------------------------------------------------------------------
# The classify objective


class _Fixed(torch.nn.Module):
    """Returns the logits it was given, whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, **_):
        return type("Out", (), {"logits": self.logits})


def test_classify_loss_is_summed_cross_entropy_and_counts_correct_rows():
    """logits [[2, 0], [0, 1], [3, 3]], labels [0, 0, 1]:
    loss = -log s(2,0)[0] - log s(0,1)[0] - log s(3,3)[1] = log(1+e^-2) + log(1+e^1) + log 2; correct: row 0 only
    (row 2 is a tie and argmax picks class 0)."""
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    batch = collate_labelled([LabelledText([4, 5], 0), LabelledText([6], 0), LabelledText([7, 8, 9], 1)], 0)
    out = classify_loss(_Fixed(logits), batch)
    want = math.log(1 + math.exp(-2)) + math.log(1 + math.e) + math.log(2)
    assert isinstance(out, LossOutput) and out.num_units == 3
    assert out.loss_sum.item() == pytest.approx(want, rel=1e-6)
    assert out.metrics == {"accuracy": 1.0}


def test_regression_loss_is_summed_squared_error():
    batch = collate_labelled([LabelledText([4], 1.5), LabelledText([5, 6], -2.0)], 0)
    out = classify_loss(_Fixed(torch.tensor([[1.0], [0.0]])), batch)
    assert out.loss_sum.item() == pytest.approx(0.5 ** 2 + 2.0 ** 2)
    assert out.metrics == {"abs_error": pytest.approx(2.5)}


def test_classification_batches_are_left_padded_with_positions_from_the_first_real_token():
    batch = collate_labelled([LabelledText([4, 5, 6], 1), LabelledText([7], 0)], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[4, 5, 6], [0, 0, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch["class_labels"].tolist() == [1, 0]


def test_encode_labelled_maps_labels_truncates_and_names_bad_rows(tokenizer):
    rows = [type("Row", (), {"text": "Hello world " * 20, "label": "b", "source": "f.jsonl:1"}),
            type("Row", (), {"text": "Hi", "label": "zz", "source": "f.jsonl:2"})]
    examples, report = encode_labelled(tokenizer, rows[:1], ["a", "b"], max_len=8)
    assert examples[0].target == 1 and len(examples[0].input_ids) == 8 and report["truncated"] == 1
    with pytest.raises(DataError, match=r"f.jsonl:2: label: 'zz' is not one of the classes"):
        encode_labelled(tokenizer, rows, ["a", "b"], 8)


def test_a_rows_prediction_does_not_depend_on_its_batch(model_dirs, tokenizer):
    model = _classifier(model_dirs["gpt2"], pad_token_id=tokenizer.pad_token_id)  # absolute positions
    texts = ["Hello world", "What is two plus three? It is five.", "Lima"]
    examples = [LabelledText(tokenizer(t)["input_ids"], 0) for t in texts]
    with torch.no_grad():
        together = classify_logits(model, collate_labelled(examples, tokenizer.pad_token_id))
        alone = torch.cat([classify_logits(model, collate_labelled([e], tokenizer.pad_token_id)) for e in examples])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_head_only_is_well_above_chance_on_sentiment(sentiment_dir):
    """Only a 2 x 64 head on a frozen random tiny Llama, trained with the loop's step on 96 reviews."""
    from tunesmith.data.formats import load_rows

    tokenizer = AutoTokenizer.from_pretrained(sentiment_dir / "model")
    labels = ["negative", "positive"]
    train, _ = encode_labelled(tokenizer, load_rows(sentiment_dir / "train.jsonl"), labels, 64)
    test, _ = encode_labelled(tokenizer, load_rows(sentiment_dir / "test.jsonl"), labels, 64)
    model = apply_strategy(_classifier(sentiment_dir / "model", 2, tokenizer.pad_token_id), "head",
                           task_type="SEQ_CLS")
    assert _trainable(model) == {"score.weight": 2 * HIDDEN}
    before = accuracy(model, test, tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(0)
    batches = [collate_labelled([train[i] for i in torch.randperm(len(train), generator=generator)[:16].tolist()],
                                tokenizer.pad_token_id) for _ in range(12)]
    _train(model, classify_objective(), batches, steps=120, lr=5e-2)
    after = accuracy(model, test, tokenizer.pad_token_id)
    assert after >= 0.85 and after > before + 0.2, (before, after)
    assert predict(model, test[:4], tokenizer.pad_token_id).dtype == torch.long


# ---------------------------------------------------------------------------------------------------
# Through `tunesmith train` (run.py wires features, the classify objective and ReFT's positions)


def _config(model_dir, out, **sections):
    raw = {"model": {"name_or_path": str(model_dir)}, "data": {"max_seq_len": 64},
           "strategy": {"name": "head"}, "train": {"output_dir": str(out), "max_steps": 4, "micro_batch_size": 8,
                                                    "lr": 5e-2, "log_every": 1},
           "tracking": {"progress_bar": False}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return config_from_dict(raw)


def _classification_config(sentiment_dir, out, strategy, **train):
    return _config(sentiment_dir / "model", out, strategy={"name": strategy},
                   data={"train": [str(sentiment_dir / "train.jsonl")], "test": [str(sentiment_dir / "test.jsonl")],
                         "format": "classification", "split": {"validation": 16}, "cache_dir": str(out) + "-cache"},
                   train={"objective": "classify", **train})


def test_train_classify_head_writes_a_model_plain_transformers_reloads(sentiment_dir, tmp_path):
    from tunesmith.train.run import train

    report = train(_classification_config(sentiment_dir, tmp_path / "run", "head", max_steps=30))
    assert report["trainable_parameters"] == 2 * HIDDEN
    final = tmp_path / "run" / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert model.config.id2label == {0: "negative", 1: "positive"}
    tokenizer = AutoTokenizer.from_pretrained(final)
    from tunesmith.data.formats import load_rows

    test, _ = encode_labelled(tokenizer, load_rows(sentiment_dir / "test.jsonl"), ["negative", "positive"], 64)
    assert accuracy(model, test, tokenizer.pad_token_id) >= 0.75
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "eval_accuracy" in records[-1] and (tmp_path / "run" / "data_report.md").is_file()


def test_train_reft_saves_only_interventions_that_reload_to_the_trained_logits(model_dirs, tmp_path):
    from safetensors.torch import load_file

    from tunesmith.model.reft import WEIGHTS_FILE, load_reft
    from tunesmith.model.trainable import load_trainable_state
    from tunesmith.train.checkpoint import latest_checkpoint
    from tunesmith.model.build import build_model
    from tunesmith.model.run_tokenizer import build_tokenizer
    from tunesmith.train.run import train

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(12, seed=5))
    cfg = _config(model_dirs["llama"], tmp_path / "run", data={"train": [str(data)], "template": "chatml"},
                  strategy={"name": "reft", "reft": {"rank": 2, "first": 1, "last": 2}})
    report = train(cfg)
    assert report["trainable_parameters"] == LAYERS * (2 * 2 * HIDDEN + 2)
    final = tmp_path / "run" / "final"
    assert set(load_file(final / WEIGHTS_FILE)) == {f"interventions.{i}.{n}" for i in (0, 1) for n in
                                                   ("rotate.parametrizations.weight.original", "source.weight",
                                                    "source.bias")}
    tokenizer = AutoTokenizer.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    base.resize_token_embeddings(len(tokenizer))
    reloaded = load_reft(base, final)
    tokenizer_, added = build_tokenizer(cfg)
    trained = build_model(cfg, tokenizer_, added)
    load_trainable_state(trained, load_file(latest_checkpoint(tmp_path / "run" / "checkpoints") /
                                            "trainable.safetensors"))
    ids = tokenizer(["<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    with torch.no_grad():
        assert (reloaded(**ids).logits - trained.eval()(**ids).logits).abs().max().item() < 1e-6


def test_train_features_through_tunesmith_train(sentiment_dir, tmp_path):
    from tunesmith.model.features import FeatureClassifier
    from tunesmith.train.run import train

    report = train(_classification_config(sentiment_dir, tmp_path / "run", "features"))
    assert report["test_accuracy"] >= 0.85
    assert FeatureClassifier.load(tmp_path / "run" / "final").labels == ["negative", "positive"]


@pytest.mark.slow  # four trainings
def test_compare_strategies_writes_one_table_and_a_plot(sentiment_dir, tmp_path):
    from tunesmith.compare import compare_command

    cfg = _classification_config(sentiment_dir, tmp_path / "unused", "head", max_steps=20)
    rows = compare_command(cfg, strategies=["features", "head", "reft:strategy.reft.rank=2,train.lr=1e-2", "lora"],
                           output=str(tmp_path / "cmp"), isolate=False)
    by_name = {r["strategy"]: r for r in rows}
    assert not [r for r in rows if "error" in r], [r.get("trace") for r in rows]
    assert by_name["head"]["trainable_parameters"] == 2 * HIDDEN
    assert by_name["features"]["trainable_parameters"] == HIDDEN + 1
    assert by_name["reft"]["trainable_parameters"] == LAYERS * (2 * 2 * HIDDEN + 2) + 2 * HIDDEN  # + the head
    assert by_name["reft"]["overrides"] == ["strategy.reft.rank=2", "train.lr=1e-2"]
    assert by_name["lora"]["trainable_parameters"] > by_name["reft"]["trainable_parameters"]
    for r in rows:
        assert r["metric_name"] == "test accuracy" and 0.0 <= r["metric"] <= 1.0
        assert r["peak_memory_mb"] >= 0 and r["train_seconds"] > 0
    assert by_name["features"]["metric"] >= 0.85 and by_name["head"]["metric"] >= 0.6
    assert all(r["seconds_per_step"] > 0 for r in rows if r["strategy"] != "features")
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert table.count("\n| ") == 1 + len(rows) and "test accuracy" in table
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["rows"][1]["strategy"] == "head"
    with pytest.raises(ConfigError, match="already holds runs"):
        compare_command(cfg, strategies=["head"], output=str(tmp_path / "cmp"), isolate=False)
    with pytest.raises(ConfigError, match="did you mean 'reft'"):
        compare_command(cfg, strategies=["reef"], output=str(tmp_path / "cmp2"), isolate=False)
