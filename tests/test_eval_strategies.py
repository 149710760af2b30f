"""`tunesmith eval` on the runs of the strategies that are not a plain causal LM: a feature-based run and a
classification head (their own predicted labels), a causal LM on the same classification set (the label of
highest log-likelihood), `--compare` across the two, and a ReFT run (its interventions loaded, on loss and
generate sets). Every expected number is computed here from the model loaded by other means.

Tiny runs: a few optimizer steps on the tiny Llamas of conftest / test_features.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from sklearn.metrics import f1_score

from conftest import chat_rows, write_jsonl
from test_features import sentiment_dir, sentiment_rows  # noqa: F401 (sentiment_dir is a fixture, used by name)
from tunesmith.cli import main
from tunesmith.config import config_from_dict
from tunesmith.errors import ConfigError
from tunesmith.eval.command import eval_command
from tunesmith.eval.metrics import LabelCounts

LABELS = ["negative", "positive"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(model_dir: Path, out: Path, data: dict, strategy: dict, **train) -> Path:
    from tunesmith.train.run import train as run_training

    run_training(config_from_dict({
        "model": {"name_or_path": str(model_dir)},
        "data": {"max_seq_len": 64, "cache_dir": str(out) + "-cache", **data},
        "strategy": strategy,
        "train": {"output_dir": str(out), "max_steps": 3, "micro_batch_size": 8, "lr": 1e-2, "log_every": 1,
                  **train},
        "tracking": {"progress_bar": False, "log_level": "warning"},
    }))
    return out


@pytest.fixture(scope="module")
def runs(sentiment_dir, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """A feature-based run, a head-only classify run and a LoRA run (plain text: each review, then its label)."""
    root = tmp_path_factory.mktemp("runs")
    classification = {"train": [str(sentiment_dir / "train.jsonl")], "format": "classification",
                      "split": {"validation": 8}}
    texts = write_jsonl(root / "texts.jsonl", [{"text": f"{r['text']}\n{r['label']}"} for r in sentiment_rows(32, 4)])
    model = sentiment_dir / "model"
    return {
        "features": _train(model, root / "features", classification, {"name": "features"}),
        "head": _train(model, root / "head", classification, {"name": "head"}, objective="classify", lr=5e-2),
        "lora": _train(model, root / "lora", {"train": [str(texts)]}, {"name": "lora", "lora": {"r": 2}},
                       objective="clm"),
    }


def _eval(model: Path, sets: list[dict], out: Path, max_seq_len: int = 64, **eval_options) -> dict:
    cfg = config_from_dict({"model": {"name_or_path": str(model)}, "data": {"max_seq_len": max_seq_len},
                            "eval": {"batch_size": 5, "output_dir": str(out), "sets": sets, **eval_options},
                            "tracking": {"log_level": "warning"}})
    return eval_command(cfg)


def _classify_set(sentiment_dir: Path) -> dict:  # noqa: F811
    return {"name": "reviews", "path": str(sentiment_dir / "test.jsonl"), "kind": "classify"}


def _scores(predicted: list[str], gold: list[str]) -> dict:
    """Accuracy and macro-F1 written out: the share of equal labels, and scikit-learn's macro-F1."""
    return {"accuracy": sum(p == g for p, g in zip(predicted, gold)) / len(gold),
            "macro_f1": f1_score(gold, predicted, average="macro"), "n": len(gold)}


def test_label_counts_by_hand():
    """gold a a b c, predicted a b b b: accuracy 2/4; F1(a) = 2*1/(2+0+1) = 2/3, F1(b) = 2*1/(2+2+0) = 1/2,
    F1(c) = 0/(0+0+1) = 0; macro-F1 = (2/3 + 1/2 + 0) / 3 = 7/18."""
    counts = LabelCounts()
    counts.update(["a", "b"], ["a", "a"])
    counts.update(["b", "b"], ["b", "c"])
    assert counts.value() == {"accuracy": 0.5, "macro_f1": pytest.approx(7 / 18)}
    assert counts.value()["macro_f1"] == pytest.approx(f1_score(list("aabc"), list("abbb"), average="macro"))


# ---------------------------------------------------------------------------------------------------
# Classifiers: their own predicted labels


def test_a_feature_run_is_scored_by_its_own_predictions(sentiment_dir, runs, tmp_path):  # noqa: F811
    from tunesmith.model.features import FeatureClassifier

    report = _eval(runs["features"], [_classify_set(sentiment_dir)], tmp_path / "out")  # the run directory
    classifier = FeatureClassifier.load(runs["features"] / "final")
    rows = sentiment_rows(48, seed=1)  # test.jsonl
    predicted = [classifier.predict([r["text"]])[0] for r in rows]  # one text at a time: no batching effects
    assert report["kind"] == "features" and "forgetting" not in report
    assert report["sets"]["reviews"]["metrics"] == pytest.approx(_scores(predicted, [r["label"] for r in rows]))


def test_a_head_run_is_scored_by_its_own_predictions(sentiment_dir, runs, tmp_path):  # noqa: F811
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    final = runs["head"] / "final"
    report = _eval(final, [_classify_set(sentiment_dir)], tmp_path / "out")
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    rows = sentiment_rows(48, seed=1)
    with torch.no_grad():
        predicted = [model.config.id2label[int(model(**tokenizer(r["text"], return_tensors="pt")).logits.argmax())]
                     for r in rows]
    assert report["kind"] == "classifier"
    assert report["sets"]["reviews"]["metrics"] == pytest.approx(_scores(predicted, [r["label"] for r in rows]))


# ---------------------------------------------------------------------------------------------------
# A causal LM on the same set: the label of highest log-likelihood after the text


def _lm_predictions(final: Path, rows: list[dict]) -> list[str]:
    """The LoRA run loaded with plain PEFT; per row log p(label | text + "\\n") from `continuation_logps`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.eval.loglik import continuation_logps

    tokenizer = AutoTokenizer.from_pretrained(final)
    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final).eval()
    label_ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in LABELS]
    predicted = []
    for r in rows:
        prompt = tokenizer(r["text"] + "\n")["input_ids"]  # a plain-text prompt (the tokenizer has no template)
        logps = continuation_logps(model, [(prompt, ids) for ids in label_ids], tokenizer.pad_token_id)
        predicted.append(LABELS[max(range(len(LABELS)), key=lambda i: logps[i])])
    return predicted


def test_a_causal_lm_is_scored_by_label_log_likelihood(sentiment_dir, runs, tmp_path):  # noqa: F811
    rows = sentiment_rows(48, seed=1)[:20]
    report = _eval(runs["lora"], [{**_classify_set(sentiment_dir), "limit": 20}], tmp_path / "out")
    metrics = report["sets"]["reviews"]["metrics"]
    assert report["kind"] == "adapter" and metrics["truncated"] == 0
    predicted = _lm_predictions(runs["lora"] / "final", rows)
    assert metrics == pytest.approx({**_scores(predicted, [r["label"] for r in rows]), "truncated": 0})


def test_compare_a_feature_run_with_a_lora_run(sentiment_dir, runs, tmp_path):  # noqa: F811
    reviews = {**_classify_set(sentiment_dir), "limit": 20}
    out = tmp_path / "cmp"
    cfg = tmp_path / "cmp.yaml"
    cfg.write_text(yaml.safe_dump({"eval": {"batch_size": 5, "output_dir": str(out), "sets": [reviews]},
                                   "data": {"max_seq_len": 64}, "tracking": {"log_level": "warning"}}))
    assert main(["eval", str(cfg), "--compare", str(runs["features"]), str(runs["lora"] / "final")]) == 0
    report = json.loads((out / "eval.json").read_text())
    a, b = report["a"], report["b"]
    assert (a["kind"], b["kind"]) == ("features", "adapter")
    rows = sentiment_rows(48, seed=1)[:20]
    gold = [r["label"] for r in rows]
    from tunesmith.model.features import FeatureClassifier

    features = _scores(FeatureClassifier.load(runs["features"] / "final").predict([r["text"] for r in rows]), gold)
    lm = _scores(_lm_predictions(runs["lora"] / "final", rows), gold)
    assert a["sets"]["reviews"]["metrics"] == pytest.approx(features)
    assert b["sets"]["reviews"]["metrics"] == pytest.approx({**lm, "truncated": 0})
    assert report["delta"]["reviews"] == pytest.approx({k: lm[k] - features[k] for k in ("accuracy", "macro_f1")})
    table = (out / "eval.md").read_text()
    assert str(runs["features"]) in table and str(runs["lora"] / "final") in table and "| | macro_f1 |" in table


# ---------------------------------------------------------------------------------------------------
# What a model cannot run is refused before it loads


@pytest.mark.parametrize("run,kind", [("features", "generate"), ("head", "loss")])
def test_a_kind_a_classifier_cannot_run_names_the_set_and_the_model(sentiment_dir, runs, tmp_path, monkeypatch,
                                                                     run, kind):  # noqa: F811
    from tunesmith.eval import models

    monkeypatch.setattr(models, "load_for_eval", lambda *a, **k: pytest.fail("loaded a model"))
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(2))
    sets = [_classify_set(sentiment_dir), {"name": "answers", "path": str(chat), "kind": kind}]
    what = "a feature-based classifier" if run == "features" else "a classification model"
    with pytest.raises(ConfigError, match=rf"eval.sets\[1\] \('answers', kind: {kind}\): .*{run}/final is {what}"):
        _eval(runs[run], sets, tmp_path / "out")


# ---------------------------------------------------------------------------------------------------
# ReFT: the run's interventions, on loss and generate sets


@pytest.fixture(scope="module")
def reft_run(model_dirs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reft")
    data = write_jsonl(root / "chat.jsonl", chat_rows(12, seed=5))
    return _train(model_dirs["llama"], root / "run", {"train": [str(data)], "template": "chatml"},
                  {"name": "reft", "reft": {"rank": 2, "first": 1, "last": 2}})


def test_a_reft_run_evaluates_as_its_interventions_loaded_directly(model_dirs, reft_run, tmp_path):
    """Loss: the SFT objective's loss with the interventions where training put them (`intervening_on_prompts`);
    generate: greedy answers of `load_reft`'s model, one prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.formats import load_rows
    from tunesmith.data.tokenize import tokenize_rows
    from tunesmith.eval.generate import prompt_ids
    from tunesmith.model.reft import intervening_on_prompts, load_reft
    from tunesmith.objectives import build_objective

    rows = chat_rows(5, seed=9)
    path = write_jsonl(tmp_path / "held_out.jsonl", rows)
    final = reft_run / "final"
    sets = [{"name": "loss", "path": str(path), "kind": "loss"},
            {"name": "answers", "path": str(path), "kind": "generate", "max_new_tokens": 6}]
    report = _eval(final, sets, tmp_path / "out", max_seq_len=256, examples=len(rows))
    assert report["kind"] == "reft" and report["sets"]["answers"]["metrics"]["truncated"] == 0

    tokenizer = AutoTokenizer.from_pretrained(final)
    reft = load_reft(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]), final)
    examples, _ = tokenize_rows(tokenizer, load_rows(path), 256)
    objective = build_objective("sft")
    batch = objective.collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        out = intervening_on_prompts(objective).loss(reft, batch)
        plain = objective.loss(reft.model, batch)  # the base alone
    loss = report["sets"]["loss"]["metrics"]
    assert loss["tokens"] == out.num_units
    assert loss["loss"] == pytest.approx(float(out.loss_sum) / out.num_units, rel=1e-5)
    assert abs(loss["loss"] - float(plain.loss_sum) / plain.num_units) > 1e-4, "the interventions act"

    stops = json.loads((final / "generation_config.json").read_text())["eos_token_id"]
    stops = [stops] if isinstance(stops, int) else stops
    answers = []
    for r in rows:
        ids = torch.tensor([prompt_ids(tokenizer, r["messages"][:-1])])
        new = reft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
        answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    examples = report["sets"]["answers"]["examples"]
    assert [e["prediction"] for e in examples] == answers
    assert [e["reference"] for e in examples] == [r["messages"][-1]["content"] for r in rows]

    # The last checkpoint is rebuilt from the run's config.yaml: the same interventions, the same loss.
    step = _eval(reft_run / "checkpoints" / "step-3", sets[:1], tmp_path / "step", max_seq_len=256)
    assert step["kind"] == "checkpoint"
    assert step["sets"]["loss"]["metrics"]["loss"] == pytest.approx(loss["loss"], rel=1e-6)
