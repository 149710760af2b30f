"""Feature-based adaptation: a frozen model turns texts into vectors, a scikit-learn classifier learns on them.

    texts -> tokens -> frozen model (causal LM body or encoder, through `AutoModel`) -> hidden states of one layer
          -> pooled (mean over real tokens | last real token | first token, CLS) -> (N, d) features
          -> optional standardisation -> classifier (logistic regression by default)

Features are computed in length-sorted batches and cached on disk, keyed by the model's files, the pooling, the
layer, the length limit and the texts, so trying several classifiers costs one pass over the data.

A fitted classifier is saved next to its pooling config, without pickle: the linear classifiers
(logistic_regression, linear_svm, ridge) are a weight matrix, an intercept and the class order, stored in
safetensors with the standardisation's mean and scale, and predicted with the same arithmetic scikit-learn uses
(`decision = x W^T + b`; argmax, or `decision > 0` for two classes). The non-linear ones (knn, random_forest)
have no such form: saving and loading them needs pickle and an explicit opt-in (`allow_pickle`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunesmith.errors import ConfigError, ModelError
from tunesmith.model.sources import resolve_model_path

log = logging.getLogger(__name__)

FORMAT = "tunesmith-features/1"
CONFIG_FILE = "features_config.json"
LINEAR_FILE = "classifier.safetensors"
PICKLE_FILE = "classifier.pkl"
LINEAR = ("logistic_regression", "linear_svm", "ridge")
PICKLED = ("knn", "random_forest")
POOLINGS = ("mean", "last", "cls")


@dataclass(frozen=True)
class FeatureSpec:
    """How a text becomes a vector."""

    pooling: str = "mean"
    layer: int = -1  # index into the hidden states: 0 the embeddings, -1 the last layer
    max_length: int = 512
    batch_size: int = 32


# ---------------------------------------------------------------------------------------------------
# Features


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, d) hidden states -> (B, d): mean over real tokens, the last real token, or the first token.

    Works for left and right padding (the mask says which tokens are real).
    """
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    if pooling == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    real = attention_mask.bool()
    if pooling == "last":
        index = torch.where(real, positions, -1).max(-1).values  # (B,)
    elif pooling == "cls":
        index = torch.where(real, positions, hidden.shape[1]).min(-1).values
    else:
        raise ConfigError(f"strategy.features.pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


@torch.no_grad()
def extract_features(model, tokenizer, texts: Sequence[str], spec: FeatureSpec) -> torch.Tensor:
    """(N, d) float32 features of `texts`, in their order; batches of similar length, right-padded."""
    if spec.pooling not in POOLINGS:
        raise ConfigError(f"strategy.features.pooling: {spec.pooling!r} is not one of {', '.join(POOLINGS)}")
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=spec.max_length)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty((len(ids), model.config.get_text_config().hidden_size), dtype=torch.float32)
    for start in range(0, len(order), spec.batch_size):
        chunk = order[start : start + spec.batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        hidden = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                       output_hidden_states=True).hidden_states[spec.layer]  # (B, T, d)
        out[chunk] = pool(hidden, mask.to(device), spec.pooling).float().cpu()
    return out


def cached_features(model, tokenizer, texts: Sequence[str], spec: FeatureSpec, cache_dir: Path | None,
                    model_key: str) -> torch.Tensor:
    """`extract_features`, read from / written to `cache_dir` (None: no cache)."""
    if cache_dir is None:
        return extract_features(model, tokenizer, texts, spec)
    digest = hashlib.sha256(json.dumps([model_key, spec.pooling, spec.layer, spec.max_length,
                                        tokenizer.name_or_path, len(tokenizer)]).encode())
    for text in texts:
        digest.update(text.encode() + b"\0")
    path = Path(cache_dir) / f"{digest.hexdigest()[:24]}.safetensors"
    if path.is_file():
        log.info("features loaded from the cache (%s)", path)
        return load_file(path)["features"]
    features = extract_features(model, tokenizer, texts, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"features": features}, tmp)
    tmp.rename(path)
    return features


def model_key(name_or_path: str, revision: str | None = None) -> str:
    """What identifies a model's weights for the cache: its local files (name, size, mtime) or hub id + revision."""
    path = Path(resolve_model_path(name_or_path))
    if not path.is_dir():
        return f"{name_or_path}@{revision}"
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()
                   if p.suffix in (".safetensors", ".bin", ".json"))
    return json.dumps([str(path.resolve()), files])


def load_feature_model(name_or_path: str, dtype: torch.dtype = torch.float32, revision: str | None = None,
                       trust_remote_code: bool = False, allow_pickle: bool = False):
    """The body of a checkpoint (`AutoModel`: a causal LM without its head, or an encoder), frozen, eval mode."""
    from transformers import AutoModel

    from tunesmith.model.load import _first_line, check_weight_files

    name_or_path = resolve_model_path(name_or_path)
    check_weight_files(name_or_path, allow_pickle)
    try:
        model = AutoModel.from_pretrained(name_or_path, dtype=dtype, revision=revision,
                                          trust_remote_code=trust_remote_code,
                                          use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(f"cannot load a model from {name_or_path!r}: {_first_line(exc)}") from None
    return model.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------------
# Classifiers


@dataclass(frozen=True)
class ClassifierSpec:
    name: str = "logistic_regression"
    c: float = 1.0
    max_iter: int = 1000
    standardize: bool = True
    seed: int = 0


def make_estimator(spec: ClassifierSpec):
    """An unfitted scikit-learn estimator for `spec.name`."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression, RidgeClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import LinearSVC

    makers = {
        "logistic_regression": lambda: LogisticRegression(C=spec.c, max_iter=spec.max_iter),
        "linear_svm": lambda: LinearSVC(C=spec.c, max_iter=spec.max_iter, random_state=spec.seed),
        "ridge": lambda: RidgeClassifier(alpha=1.0 / spec.c),
        "knn": lambda: KNeighborsClassifier(),
        "random_forest": lambda: RandomForestClassifier(random_state=spec.seed),
    }
    if spec.name not in makers:
        raise ConfigError(f"strategy.features.classifier: {spec.name!r} is not one of {', '.join(makers)}")
    return makers[spec.name]()


class FittedClassifier:
    """Standardisation + classifier over features; predicts class ids (into `labels`)."""

    def __init__(self, spec: ClassifierSpec, labels: Sequence[str], mean: np.ndarray | None = None,
                 scale: np.ndarray | None = None, coef: np.ndarray | None = None, intercept: np.ndarray | None = None,
                 classes: np.ndarray | None = None, estimator=None) -> None:
        self.spec, self.labels = spec, list(labels)
        self.mean, self.scale = mean, scale
        self.coef, self.intercept, self.classes = coef, intercept, classes  # linear: (K, d), (K,), (C,)
        self.estimator = estimator  # non-linear only

    @classmethod
    def fit(cls, features: torch.Tensor, targets: Sequence[int], labels: Sequence[str], spec: ClassifierSpec
            ) -> "FittedClassifier":
        x = features.double().numpy()
        mean = scale = None
        if spec.standardize:
            mean, scale = x.mean(0), x.std(0)
            scale[scale == 0] = 1.0  # as StandardScaler: a constant feature is left as it is
            x = (x - mean) / scale
        estimator = make_estimator(spec).fit(x, np.asarray(targets))
        if spec.name in LINEAR:
            return cls(spec, labels, mean, scale, np.atleast_2d(np.asarray(estimator.coef_, dtype=np.float64)),
                       np.atleast_1d(np.asarray(estimator.intercept_, dtype=np.float64)), estimator.classes_)
        return cls(spec, labels, mean, scale, estimator=estimator)

    @property
    def num_parameters(self) -> int:
        """Fitted numbers that make the prediction (coefficients and intercepts; 0 for knn / forests)."""
        return 0 if self.coef is None else self.coef.size + self.intercept.size

    def _standardized(self, features: torch.Tensor) -> np.ndarray:
        x = features.double().numpy()
        return x if self.mean is None else (x - self.mean) / self.scale

    def decision(self, features: torch.Tensor) -> np.ndarray:
        """Linear classifiers: (N, K) scores x W^T + b (K = 1 for two classes)."""
        return self._standardized(features) @ self.coef.T + self.intercept

    def predict(self, features: torch.Tensor) -> np.ndarray:
        """(N,) class ids."""
        if self.coef is None:
            return self.estimator.predict(self._standardized(features))
        scores = self.decision(features)
        picked = (scores[:, 0] > 0).astype(int) if scores.shape[1] == 1 else scores.argmax(1)
        return self.classes[picked]

    def save(self, path: Path, allow_pickle: bool = False) -> None:
        tensors = {}
        if self.mean is not None:
            tensors.update(mean=torch.from_numpy(self.mean), scale=torch.from_numpy(self.scale))
        if self.coef is not None:
            tensors.update(coef=torch.from_numpy(self.coef), intercept=torch.from_numpy(self.intercept),
                           classes=torch.from_numpy(np.asarray(self.classes, dtype=np.int64)))
        elif not allow_pickle:
            raise ConfigError(f"strategy.features.allow_pickle: a {self.spec.name} classifier can only be saved "
                              "with pickle (which runs code when loaded); set it to true, or use one of "
                              f"{', '.join(LINEAR)}")
        else:
            (path / PICKLE_FILE).write_bytes(pickle.dumps(self.estimator))
        save_file({k: v.contiguous() for k, v in tensors.items()}, path / LINEAR_FILE)

    @classmethod
    def load(cls, path: Path, spec: ClassifierSpec, labels: Sequence[str], allow_pickle: bool = False
             ) -> "FittedClassifier":
        tensors = {k: v.numpy() for k, v in load_file(path / LINEAR_FILE).items()}
        estimator = None
        if "coef" not in tensors:
            if not allow_pickle:
                raise ModelError(f"{path / PICKLE_FILE}: a pickled {spec.name} classifier runs code when loaded; "
                                 "pass allow_pickle=True if you trust it")
            estimator = pickle.loads((path / PICKLE_FILE).read_bytes())
        return cls(spec, labels, tensors.get("mean"), tensors.get("scale"), tensors.get("coef"),
                   tensors.get("intercept"), tensors.get("classes"), estimator)


# ---------------------------------------------------------------------------------------------------
# The saved pair: pooling config + fitted classifier


class FeatureClassifier:
    """A frozen feature model, its pooling, and a fitted classifier: texts in, labels out."""

    def __init__(self, model, tokenizer, feature: FeatureSpec, classifier: FittedClassifier,
                 base: str, revision: str | None = None) -> None:
        self.model, self.tokenizer, self.feature, self.classifier = model, tokenizer, feature, classifier
        self.base, self.revision = base, revision

    @property
    def labels(self) -> list[str]:
        return self.classifier.labels

    def predict_ids(self, texts: Sequence[str]) -> np.ndarray:
        return self.classifier.predict(extract_features(self.model, self.tokenizer, texts, self.feature))

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.labels[i] for i in self.predict_ids(texts)]

    def save(self, path: str | Path, allow_pickle: bool = False) -> None:
        """`features_config.json` + `classifier.safetensors` (+ `classifier.pkl` when allowed) + tokenizer."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.classifier.save(path, allow_pickle)
        self.tokenizer.save_pretrained(path)
        config = {"format": FORMAT, "base_model_name_or_path": self.base, "revision": self.revision,
                  "feature": asdict(self.feature), "classifier": asdict(self.classifier.spec),
                  "labels": self.labels, "num_parameters": self.classifier.num_parameters}
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, base: str | None = None, allow_pickle: bool = False,
             dtype: torch.dtype = torch.float32) -> "FeatureClassifier":
        """Load a saved classifier and its feature model (`base` overrides the recorded base model)."""
        from tunesmith.model.load import load_tokenizer, resize_embeddings
        from tunesmith.model.run_tokenizer import ensure_pad_token

        path = Path(path)
        config = json.loads((path / CONFIG_FILE).read_text())
        if config.get("format") != FORMAT:
            raise ModelError(f"{path / CONFIG_FILE}: not a tunesmith feature classifier")
        tokenizer = load_tokenizer(str(path))
        ensure_pad_token(tokenizer)
        model = load_feature_model(base or config["base_model_name_or_path"], dtype, config["revision"])
        resize_embeddings(model, tokenizer)
        spec = ClassifierSpec(**config["classifier"])
        fitted = FittedClassifier.load(path, spec, config["labels"], allow_pickle)
        return cls(model, tokenizer, FeatureSpec(**config["feature"]), fitted,
                   config["base_model_name_or_path"], config["revision"])


def is_feature_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


# ---------------------------------------------------------------------------------------------------
# `tunesmith train` with strategy.name=features (config -> plain arguments at this edge)


def train_features(cfg) -> dict:
    """Fit and save a feature classifier for `cfg`'s text + label data; returns the report.

    Writes config.yaml, train.log, final/ (the classifier) and report.json / report.md in train.output_dir.
    """
    from tunesmith.track.logs import close_logging, setup_logging

    run_dir = Path(cfg.train.output_dir)
    if (run_dir / "final").exists():
        raise ConfigError(f"train.output_dir: {run_dir} already holds a run; choose another output_dir")
    setup_logging(run_dir, cfg.tracking.log_level)
    try:
        return _train_features(cfg, run_dir)
    finally:
        close_logging()


def _train_features(cfg, run_dir: Path) -> dict:
    from tunesmith.config import save_config, to_dict
    from tunesmith.data.build import cache_dir
    from tunesmith.model.heads import classification_rows, label_names
    from tunesmith.model.load import load_tokenizer, resize_embeddings, resolve_dtype
    from tunesmith.model.run_tokenizer import ensure_pad_token

    m, f = cfg.model, cfg.strategy.features
    started = time.perf_counter()
    rows, _ = classification_rows(cfg)
    labels = label_names(rows["train"], cfg.strategy.head.labels)
    tokenizer = load_tokenizer(m.tokenizer or m.name_or_path, m.revision, m.trust_remote_code)
    ensure_pad_token(tokenizer)
    model = load_feature_model(m.name_or_path, resolve_dtype(m.dtype), m.revision, m.trust_remote_code,
                               m.allow_pickle)
    resize_embeddings(model, tokenizer)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    feature = FeatureSpec(f.pooling, f.layer, min(f.max_length, cfg.data.max_seq_len), f.batch_size)
    key, cache = model_key(m.name_or_path, m.revision), (cache_dir(cfg) / "features" if f.cache else None)
    features = {name: cached_features(model, tokenizer, [r.text for r in split], feature, cache, key)
                for name, split in rows.items() if split}
    feature_seconds = time.perf_counter() - started
    index = {name: i for i, name in enumerate(labels)}
    spec = ClassifierSpec(f.classifier, f.c, f.max_iter, f.standardize, cfg.train.seed)
    fitted = FittedClassifier.fit(features["train"], [index[r.label] for r in rows["train"]], labels, spec)
    classifier = FeatureClassifier(model, tokenizer, feature, fitted, m.name_or_path, m.revision)
    save_config(cfg, run_dir / "config.yaml")
    tmp = run_dir / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    classifier.save(tmp, f.allow_pickle)
    os.rename(tmp, run_dir / "final")
    total = sum(p.numel() for p in model.parameters()) + fitted.num_parameters
    report = {"strategy": "features", "classifier": f.classifier, "trainable_parameters": fitted.num_parameters,
              "total_parameters": total, "feature_seconds": round(feature_seconds, 2),
              "seconds": round(time.perf_counter() - started, 2),
              **{f"{name}_accuracy": _accuracy(fitted, features[name], rows[name], index) for name in features},
              "config": to_dict(cfg)}
    _write_report(run_dir, report)
    log.info("feature classifier in %s: %s", run_dir / "final",
             ", ".join(f"{k} {v:.4f}" for k, v in report.items() if k.endswith("_accuracy")))
    return report


def _accuracy(fitted: FittedClassifier, features: torch.Tensor, rows, index: dict[str, int]) -> float:
    predicted = fitted.predict(features)
    return float(np.mean(predicted == np.array([index.get(r.label, -1) for r in rows])))


def _write_report(run_dir: Path, report: dict) -> None:
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    lines = ["# Training report (feature-based)", "", "| metric | value |", "|---|---|"]
    for key, value in report.items():
        if key != "config":
            lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
