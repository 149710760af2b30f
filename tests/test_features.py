"""Feature-based adaptation: pooling, batched and cached features, safe classifier files, accuracy."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from conftest import write_jsonl
from tunesmith.config import config_from_dict
from tunesmith.demo.tiny import build_model, save_tiny, train_tokenizer
from tunesmith.errors import ConfigError, ModelError
from tunesmith.model.features import (CONFIG_FILE, LINEAR_FILE, PICKLE_FILE, ClassifierSpec, FeatureClassifier,
                                      FeatureSpec, FittedClassifier, cached_features, extract_features,
                                      load_feature_model, pool, train_features)

POSITIVE = ("wonderful", "great", "lovely", "excellent", "delightful", "superb", "friendly", "charming")
NEGATIVE = ("terrible", "awful", "dreadful", "poor", "horrible", "rude", "boring", "disappointing")
NOUNS = ("hotel", "market", "museum", "train", "cafe", "harbour", "theatre", "garden")
TEMPLATES = ("The {noun} was {adj} and the staff were {adj2}.", "A {adj} {noun}, {adj2} from start to end.",
             "We found the {noun} {adj}; the food was {adj2} too.", "Our visit to the {noun} felt {adj} and {adj2}.")


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """Short reviews, half positive, half negative (deterministic); the sentiment is in the adjectives."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ("negative", "positive")[i % 2]
        words = POSITIVE if label == "positive" else NEGATIVE
        text = rng.choice(TEMPLATES).format(noun=rng.choice(NOUNS), adj=rng.choice(words), adj2=rng.choice(words))
        rows.append({"text": text, "label": label})
    return rows


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sentiment_dir(tmp_path_factory):
    """A tiny Llama with a tokenizer trained on the reviews, and train/test files of them."""
    root = tmp_path_factory.mktemp("sentiment")
    train, test = sentiment_rows(96, seed=0), sentiment_rows(48, seed=1)
    tokenizer = train_tokenizer([r["text"] for r in train] * 3, vocab_size=300)
    save_tiny(root / "model", build_model("llama", vocab_size=len(tokenizer)), tokenizer)
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "test.jsonl", test)
    return root


def test_pooling_by_hand_with_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)  # (B=2, T=4, d=2)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    # row 0: [0,1] [2,3] [4,5] [6,7]; row 1: [8,9] [10,11] [12,13] [14,15]
    torch.testing.assert_close(pool(hidden, right, "mean"), torch.tensor([[2.0, 3.0], [9.0, 10.0]]))
    torch.testing.assert_close(pool(hidden, right, "last"), torch.tensor([[4.0, 5.0], [10.0, 11.0]]))
    torch.testing.assert_close(pool(hidden, right, "cls"), torch.tensor([[0.0, 1.0], [8.0, 9.0]]))
    torch.testing.assert_close(pool(hidden, left, "mean"), torch.tensor([[4.0, 5.0], [13.0, 14.0]]))
    torch.testing.assert_close(pool(hidden, left, "last"), torch.tensor([[6.0, 7.0], [14.0, 15.0]]))
    torch.testing.assert_close(pool(hidden, left, "cls"), torch.tensor([[2.0, 3.0], [12.0, 13.0]]))
    with pytest.raises(ConfigError, match="pooling"):
        pool(hidden, right, "max")


@pytest.mark.parametrize("pooling,layer", [("mean", -1), ("last", 1)])
def test_batched_features_equal_one_text_at_a_time(sentiment_dir, pooling, layer):
    from transformers import AutoTokenizer

    model = load_feature_model(str(sentiment_dir / "model"))
    tokenizer = AutoTokenizer.from_pretrained(sentiment_dir / "model")
    texts = [r["text"] for r in sentiment_rows(7, seed=3)]
    batched = extract_features(model, tokenizer, texts, FeatureSpec(pooling, layer, batch_size=3))
    for i, text in enumerate(texts):
        one = extract_features(model, tokenizer, [text], FeatureSpec(pooling, layer, batch_size=1))
        torch.testing.assert_close(batched[i], one[0], atol=1e-5, rtol=1e-5)
    ids = tokenizer(texts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0]  # (T, d)
    torch.testing.assert_close(batched[0], hidden.mean(0) if pooling == "mean" else hidden[-1], atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())


def test_features_are_cached_by_model_pooling_layer_and_texts(sentiment_dir, tmp_path):
    from transformers import AutoTokenizer

    model = load_feature_model(str(sentiment_dir / "model"))
    tokenizer = AutoTokenizer.from_pretrained(sentiment_dir / "model")
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    texts = [r["text"] for r in sentiment_rows(5)]
    spec = FeatureSpec("mean", -1, batch_size=2)
    first = cached_features(model, tokenizer, texts, spec, tmp_path, "model-a")
    assert len(calls) == 3 and len(list(tmp_path.glob("*.safetensors"))) == 1
    again = cached_features(model, tokenizer, texts, spec, tmp_path, "model-a")
    assert len(calls) == 3, "read from the cache"
    assert torch.equal(again, first)
    cached_features(model, tokenizer, texts, FeatureSpec("last", -1, batch_size=2), tmp_path, "model-a")
    cached_features(model, tokenizer, texts, spec, tmp_path, "model-b")
    cached_features(model, tokenizer, texts[:4], spec, tmp_path, "model-a")
    assert len(calls) == 3 + 3 + 3 + 2 and len(list(tmp_path.glob("*.safetensors"))) == 4


def _blobs(n: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 6)) * 3
    y = [i % classes for i in range(n)]
    return torch.tensor(centres[y] + rng.normal(size=(n, 6)), dtype=torch.float32), y


@pytest.mark.parametrize("name", ["logistic_regression", "linear_svm", "ridge"])
@pytest.mark.parametrize("classes", [2, 3])
def test_linear_classifiers_predict_like_scikit_learn_and_reload_without_pickle(tmp_path, name, classes):
    from sklearn.preprocessing import StandardScaler

    from tunesmith.model.features import make_estimator

    x, y = _blobs(60, classes)
    spec = ClassifierSpec(name, c=0.5, standardize=True)
    labels = [f"class{i}" for i in range(classes)]
    fitted = FittedClassifier.fit(x, y, labels, spec)
    scaler = StandardScaler().fit(x.double().numpy())
    reference = make_estimator(spec).fit(scaler.transform(x.double().numpy()), y)
    probe, _ = _blobs(40, classes, seed=1)
    assert np.array_equal(fitted.predict(probe), reference.predict(scaler.transform(probe.double().numpy())))
    scores = fitted.decision(probe)  # (N, K); scikit-learn gives (N,) for two classes
    np.testing.assert_allclose(scores[:, 0] if classes == 2 else scores,
                               reference.decision_function(scaler.transform(probe.double().numpy())), atol=1e-9)
    assert fitted.num_parameters == (1 if classes == 2 else classes) * 7
    fitted.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LINEAR_FILE]
    reloaded = FittedClassifier.load(tmp_path, spec, labels)
    assert np.array_equal(reloaded.predict(probe), fitted.predict(probe))


def test_nonlinear_classifiers_need_pickle_opted_in_to_save_and_to_load(tmp_path):
    x, y = _blobs(30, 2)
    spec = ClassifierSpec("knn")
    fitted = FittedClassifier.fit(x, y, ["a", "b"], spec)
    with pytest.raises(ConfigError, match="allow_pickle"):
        fitted.save(tmp_path)
    fitted.save(tmp_path, allow_pickle=True)
    assert (tmp_path / PICKLE_FILE).is_file()
    with pytest.raises(ModelError, match="allow_pickle"):
        FittedClassifier.load(tmp_path, spec, ["a", "b"])
    assert np.array_equal(FittedClassifier.load(tmp_path, spec, ["a", "b"], allow_pickle=True).predict(x),
                          fitted.predict(x))


def _features_config(sentiment_dir, out, **features):
    return config_from_dict({
        "model": {"name_or_path": str(sentiment_dir / "model")},
        "data": {"train": [str(sentiment_dir / "train.jsonl")], "test": [str(sentiment_dir / "test.jsonl")],
                 "format": "classification", "cache_dir": str(out / "cache")},
        "strategy": {"name": "features", "features": {"pooling": "mean", **features}},
        "train": {"output_dir": str(out / "run")},
        "tracking": {"progress_bar": False},
    })


def test_feature_classifier_is_well_above_chance_on_sentiment_and_reloads(sentiment_dir, tmp_path):
    """A random tiny Llama's mean-pooled last layer + logistic regression separates the reviews (chance: 0.5)."""
    cfg = _features_config(sentiment_dir, tmp_path)
    report = train_features(cfg)
    assert report["test_accuracy"] >= 0.85, report
    assert report["trainable_parameters"] == 64 + 1  # binary: one weight row and one intercept
    final = tmp_path / "run" / "final"
    assert {p.name for p in final.iterdir()} >= {CONFIG_FILE, LINEAR_FILE, "tokenizer.json"}
    assert not list(final.glob("*.pkl"))
    saved = json.loads((final / CONFIG_FILE).read_text())
    assert saved["feature"]["pooling"] == "mean" and saved["labels"] == ["negative", "positive"]
    loaded = FeatureClassifier.load(final)
    test = sentiment_rows(48, seed=1)
    predicted = loaded.predict([r["text"] for r in test])
    assert np.mean([p == r["label"] for p, r in zip(predicted, test)]) == pytest.approx(report["test_accuracy"])
    assert (tmp_path / "run" / "report.json").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    assert list((tmp_path / "cache" / "features").glob("*.safetensors")), "features cached"


def test_train_features_refuses_a_nonlinear_classifier_without_pickle(sentiment_dir, tmp_path):
    with pytest.raises(ConfigError, match="allow_pickle"):
        train_features(_features_config(sentiment_dir, tmp_path, classifier="random_forest", cache=False))
