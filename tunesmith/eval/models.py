"""Load what `tunesmith eval` evaluates, and the model it started from.

    model       a directory of full weights (a base model, a merged model, a full fine-tune's final/), or a hub id
    adapter     a PEFT adapter (a LoRA run's final/): adapter_config.json names the base; base + adapter load
                with plain `peft.PeftModel.from_pretrained`
    reft        a ReFT run's final/: its interventions (reft_config.json) go back on the base with
                `tunesmith.model.reft.load_reft`; generation intervenes on the prompt only
    checkpoint  a training checkpoint (checkpoints/step-N/): its run's config.yaml rebuilds the model exactly
                as training built it (tokenizer, template, strategy), then the trainable weights are loaded
    features    a feature-based run's final/: the frozen model and its fitted classifier (`FeatureClassifier`)
    classifier  a `train.objective: classify` run's final/ (a head, or LoRA / ReFT with a head) or a
                sequence-classification model directory, as a `HeadClassifier`

A run directory (config.yaml + final/) stands for its final/. Features and classifiers are `TextClassifier`s:
they run `kind: classify` sets only (`check_sets` says so before anything loads).

The baseline is the model a fine-tune started from (the adapter's base, the run's `model.name_or_path`): the
general sets are evaluated on it too, so forgetting is measured without a second command. A classifier has
none: it is not a language model whose general abilities could be compared with its base's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from tunesmith.data.templates import install_template
from tunesmith.errors import ConfigError, ModelError
from tunesmith.eval.classifiers import HeadClassifier, TextClassifier
from tunesmith.eval.sets import EvalSet
from tunesmith.export.loading import context_length
from tunesmith.model.load import ensure_pad_token, load_model, load_tokenizer, resize_embeddings, resolve_dtype
from tunesmith.model.stops import set_stop_tokens

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINT_WEIGHTS = "trainable.safetensors"
RUN_CONFIG = "config.yaml"


@dataclass(frozen=True)
class LoadOptions:
    """How to load weights and tokenizer (from the config's `model` section and `data.template`)."""

    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    tokenizer: str | None = None  # None: the tokenizer saved with the model (or its base)
    template: str | None = None  # install this built-in chat template, as training does


@dataclass
class Loaded:
    model: torch.nn.Module | TextClassifier  # a causal LM, or a classifier (kind features or classifier)
    tokenizer: object
    kind: str  # model | adapter | reft | checkpoint | features | classifier
    baseline: str | None  # the model it was fine-tuned from, when known


def model_kind(path: str) -> str:
    """"adapter", "reft", "features", "checkpoint" or "model" (a hub id is a model) of a resolved path."""
    from tunesmith.model.features import is_feature_dir
    from tunesmith.model.reft import is_reft_dir

    p = Path(path)
    if (p / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (p / CHECKPOINT_WEIGHTS).is_file():
        return "checkpoint"
    if is_reft_dir(p):
        return "reft"
    if is_feature_dir(p):
        return "features"
    return "model"


def resolve_path(path: str) -> str:
    """A run directory (config.yaml + final/) -> its final/; anything else as it is."""
    p = Path(path)
    if (p / RUN_CONFIG).is_file() and (p / "final").is_dir():
        return str(p / "final")
    return path


def is_classifier(path: str) -> bool:
    """Whether `path` (resolved) holds a text classifier rather than a causal LM, read from its files alone: a
    feature-based run, a run with `train.objective: classify` (final/ or a checkpoint), a SEQ_CLS adapter or
    a sequence-classification model."""
    p = Path(path)
    kind = model_kind(path)
    if kind == "features":
        return True
    run_config = _run_config_path(p, kind)
    if run_config is not None:
        from tunesmith.config import load_config

        return load_config(run_config).train.objective == "classify"
    if kind == "adapter":
        return _read_json(p / ADAPTER_CONFIG).get("task_type") == "SEQ_CLS"
    if kind == "reft":
        from tunesmith.model.reft import CONFIG_FILE

        return bool(_read_json(p / CONFIG_FILE).get("trained_base_parameters"))
    return kind == "model" and _is_sequence_classification(p)


def check_sets(path: str, sets: Sequence[EvalSet]) -> None:
    """Refuse, before anything loads, a set that `path`'s model cannot run: a classifier runs classify sets
    only. Raises ConfigError naming the set and the model."""
    path = resolve_path(path)
    if not any(s.kind != "classify" for s in sets) or not is_classifier(path):
        return
    what = "a feature-based classifier" if model_kind(path) == "features" else "a classification model"
    for i, s in enumerate(sets):
        if s.kind != "classify":
            raise ConfigError(f"eval.sets[{i}] ({s.name!r}, kind: {s.kind}): {path} is {what} (text in, label "
                              "out), which scores no tokens and writes no text; it runs kind: classify sets "
                              "(text + label rows) only")


def load_for_eval(path: str, options: LoadOptions = LoadOptions()) -> Loaded:
    """The model at `path` in eval mode on the best device, its tokenizer (chat template, pad token), and its
    baseline. Generation stops at the chat template's end-of-turn token as well as at EOS."""
    path = resolve_path(path)
    kind = model_kind(path)
    if kind == "features":
        return _features(Path(path), options)
    if is_classifier(path):
        return _classifier(Path(path), kind, options)
    if kind == "checkpoint":
        model, tokenizer, baseline = _checkpoint(Path(path))
    elif kind == "reft":
        model, tokenizer, baseline = _reft(Path(path), options)
    elif kind == "adapter" and not options.tokenizer and not options.template:
        # The delivery loader: embeddings grown to the run's tokenizer, a QLoRA base dequantised from its 4-bit
        # weights (the model that was trained, not the full-precision original).
        from tunesmith.export.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(path, dtype=options.dtype, allow_pickle=options.allow_pickle)
        baseline = _adapter_base(Path(path))
    else:
        base = _adapter_base(Path(path)) if kind == "adapter" else path
        tokenizer = _tokenizer(options.tokenizer or (path if _has_tokenizer(path) else base), options)
        model = _weights(base, tokenizer, options)
        if kind == "adapter":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, path)
        baseline = base if kind == "adapter" else _run_base(Path(path))
    set_stop_tokens(model, tokenizer)
    log.info("loaded %s (%s)%s", path, kind, f", fine-tuned from {baseline}" if baseline else "")
    return Loaded(_to_device(model).eval(), tokenizer, kind, baseline)


def load_baseline(path: str, tokenizer, options: LoadOptions = LoadOptions()) -> torch.nn.Module:
    """The baseline's weights, with embeddings grown to `tokenizer` (the evaluated model's, so both models get
    the same prompts), as training grew them."""
    model = _weights(path, tokenizer, options)
    set_stop_tokens(model, tokenizer)
    return _to_device(model).eval()


def _tokenizer(name: str, options: LoadOptions):
    tokenizer = load_tokenizer(name, options.revision, options.trust_remote_code)
    if options.template:
        install_template(tokenizer, options.template)
    ensure_pad_token(tokenizer)
    return tokenizer


def _weights(name: str, tokenizer, options: LoadOptions):
    model = load_model(name, dtype=resolve_dtype(options.dtype), attn_implementation=options.attn_implementation,
                       revision=options.revision, trust_remote_code=options.trust_remote_code,
                       allow_pickle=options.allow_pickle)
    resize_embeddings(model, tokenizer)
    return model


def _checkpoint(path: Path):
    """Rebuild the run's model as training built it and load the checkpoint's trainable weights."""
    from safetensors.torch import load_file

    from tunesmith.config import load_config
    from tunesmith.train.checkpoint import load_trainable_state, verify
    from tunesmith.train.run import build_model, build_tokenizer

    run_config = path.parent.parent / RUN_CONFIG
    if not run_config.is_file():
        raise ConfigError(f"model.name_or_path: {path} is a training checkpoint, but its run's {run_config} is "
                          "missing (it says how to rebuild the model)")
    problem = verify(path)
    if problem is not None:
        raise ModelError(f"{path}: damaged checkpoint: {problem}")
    cfg = load_config(run_config)
    tokenizer, added = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer, added, _run_labels(cfg))
    load_trainable_state(model, load_file(path / CHECKPOINT_WEIGHTS))
    return model, tokenizer, cfg.model.name_or_path or None  # None: built from scratch (model.init), no baseline


def _reft(path: Path, options: LoadOptions):
    """A ReFT run's interventions on its base (the run config's model, else the one reft_config.json names)."""
    from tunesmith.model.reft import CONFIG_FILE, load_reft

    run_config = path.parent / RUN_CONFIG
    base = _run_base(path) if run_config.is_file() else None
    base = base or _read_json(path / CONFIG_FILE).get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{path / CONFIG_FILE}: no base_model_name_or_path and no run config.yaml beside it, so "
                         "the base model is unknown")
    tokenizer = _tokenizer(options.tokenizer or (str(path) if _has_tokenizer(str(path)) else base), options)
    model = _weights(base, tokenizer, options)
    # The stop tokens training saved, set on the base: the ReFT wrapper hands `generate` to it.
    set_stop_tokens(model, tokenizer, path if (path / "generation_config.json").is_file() else None)
    return load_reft(model, path), tokenizer, base


def _features(path: Path, options: LoadOptions) -> Loaded:
    from tunesmith.model.features import FeatureClassifier

    classifier = FeatureClassifier.load(path, allow_pickle=options.allow_pickle, dtype=resolve_dtype(options.dtype))
    classifier.model = _to_device(classifier.model)
    log.info("loaded %s (feature-based classifier on %s, labels %s)", path, classifier.base, classifier.labels)
    return Loaded(classifier, classifier.tokenizer, "features", None)


def _classifier(path: Path, kind: str, options: LoadOptions) -> Loaded:
    """A classify run's final/ or checkpoint, rebuilt as training built it, or a sequence-classification model
    directory, as a HeadClassifier. Texts are cut at the run's data.max_seq_len, as in training."""
    from tunesmith.config import load_config

    if kind == "checkpoint":
        model, tokenizer, _ = _checkpoint(path)
        max_seq_len = load_config(path.parent.parent / RUN_CONFIG).data.max_seq_len
    elif _run_config_path(path, kind) is not None:
        cfg = load_config(path.parent / RUN_CONFIG)
        tokenizer = load_tokenizer(str(path))
        model, max_seq_len = load_trained(cfg, path, tokenizer), cfg.data.max_seq_len
    elif kind == "model":
        tokenizer = _tokenizer(options.tokenizer or path, options)
        model = _sequence_classifier(path, tokenizer, options)
        max_seq_len = context_length(model)
    else:
        raise ConfigError(f"model.name_or_path: {path} is a classification {kind} directory; its labels and head "
                          f"are rebuilt from its run's {RUN_CONFIG}, which is not beside it (pass the run's final/)")
    log.info("loaded %s (classifier, %s)", path, kind)
    return Loaded(HeadClassifier(_to_device(model).eval(), tokenizer, max_seq_len), tokenizer, "classifier", None)


def _sequence_classifier(path: Path, tokenizer, options: LoadOptions):
    from tunesmith.model.heads import load_classification_model

    config = _read_json(path / "config.json")
    labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    return load_classification_model(str(path), labels, config.get("problem_type") == "regression",
                                     tokenizer.pad_token_id, resolve_dtype(options.dtype),
                                     options.attn_implementation, options.revision, options.trust_remote_code,
                                     options.allow_pickle)


def load_trained(cfg, final: Path, tokenizer):
    """A run's final/ on its base, as `tunesmith train` built it: full weights, a PEFT adapter or ReFT
    interventions; with a classification head for `classify`. Eval mode, on the best device.

    Args:
        cfg: the run's config (its config.yaml).
        final: the run's final/ directory.
        tokenizer: the tokenizer saved in final/.
    """
    from tunesmith.model.load import load_model
    from tunesmith.model.reft import is_reft_dir, load_reft
    from tunesmith.model.strategies import quantization_config

    m, s = cfg.model, cfg.strategy
    adapter = (final / ADAPTER_CONFIG).is_file()
    source = m.name_or_path if adapter or is_reft_dir(final) else str(final)
    quant = None
    if s.name == "qlora":
        quant = quantization_config(s.quant.quant_type, s.quant.double_quant, resolve_dtype(s.quant.compute_dtype))
    dtype = resolve_dtype(m.dtype)
    if cfg.train.objective == "classify":
        from tunesmith.model.heads import load_classification_model

        model = load_classification_model(source, _run_labels(cfg) or [], s.head.regression,
                                          tokenizer.pad_token_id, dtype, m.attn_implementation,
                                          allow_pickle=m.allow_pickle, quantization_config=quant)
    else:
        model = load_model(source, dtype, m.attn_implementation, allow_pickle=m.allow_pickle,
                           quantization_config=quant)
        if final != Path(source):
            resize_embeddings(model, tokenizer)
        if tokenizer.pad_token_id is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        if cfg.train.objective != "clm" and not cfg.data.train_on_prompt:
            set_stop_tokens(model, tokenizer)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, final)
        if s.name == "prompt_tuning" and cfg.train.objective != "classify":
            from tunesmith.model.prompt_tuning import strip_virtual_tokens

            strip_virtual_tokens(model)
    elif is_reft_dir(final):
        model = load_reft(model, final)
    if quant is None:
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    return model.eval()


def _run_labels(cfg) -> list[str] | None:
    """The class names of a classify run, in id order, as training derived them; None for other runs and for
    regression."""
    if cfg.train.objective != "classify" or cfg.strategy.head.regression:
        return None
    from tunesmith.model.heads import classification_rows, label_names

    return label_names(classification_rows(cfg)[0]["train"], cfg.strategy.head.labels)


def _run_config_path(path: Path, kind: str) -> Path | None:
    """The config.yaml of the run that `path` (a checkpoint, or a final/) belongs to, if it is there."""
    if kind == "checkpoint":
        run_config = path.parent.parent / RUN_CONFIG
    elif path.name == "final":
        run_config = path.parent / RUN_CONFIG
    else:
        return None
    return run_config if run_config.is_file() else None


def _is_sequence_classification(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    architectures = _read_json(path / "config.json").get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelError(f"{path}: invalid JSON ({exc})") from None


def _adapter_base(path: Path) -> str:
    base = _read_json(path / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{path / ADAPTER_CONFIG}: no base_model_name_or_path, so the base model is unknown")
    return base


def _run_base(path: Path) -> str | None:
    """A run's final/ (full fine-tune) started from the run config's model."""
    run_config = path.parent / RUN_CONFIG
    if path.name != "final" or not run_config.is_file():
        return None
    from tunesmith.config import load_config

    return load_config(run_config).model.name_or_path or None


def _has_tokenizer(path: str) -> bool:
    return (Path(path) / "tokenizer_config.json").is_file()


def _to_device(model):
    if torch.cuda.is_available() and not hasattr(model, "hf_device_map"):  # quantised models are placed already
        return model.to("cuda")
    return model
