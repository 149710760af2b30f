"""Load what `tunesmith eval` evaluates, and the model it started from.

What a path holds is `tunesmith.model.resolve.resolve_source`'s answer (model, hub id, adapter, ReFT run,
checkpoint, feature-based run; a run directory stands for its final/); this module turns each kind into a model:

    model, adapter  the delivery loader (`model.loading`), or base + adapter with a tokenizer / template override
    reft            its interventions back on the base (`model.reft.load_reft`); generation intervenes on the prompt
    checkpoint      its run's config.yaml rebuilds the model exactly as training built it (tokenizer, template,
                    strategy), then the trainable weights are loaded
    features        the frozen model and its fitted classifier (`FeatureClassifier`)
    classifier      a `train.objective: classify` run (a head, or LoRA / ReFT with a head) or a
                    sequence-classification model directory, as a `HeadClassifier`

Features and classifiers are `TextClassifier`s: they run `kind: classify` sets only (`check_sets` says so before
anything loads).

The baseline is the model a fine-tune started from (the adapter's base, the run's `model.name_or_path`): the
general sets are evaluated on it too, so forgetting is measured without a second command. A classifier has
none: it is not a language model whose general abilities could be compared with its base's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from tunesmith.config.objectives import OBJECTIVES
from tunesmith.data.templates import install_template
from tunesmith.errors import ConfigError, ModelError
from tunesmith.eval.classifiers import HeadClassifier, TextClassifier
from tunesmith.eval.sets import EvalSet
from tunesmith.model.load import load_model, load_tokenizer, resize_embeddings, resolve_dtype
from tunesmith.model.run_tokenizer import ensure_pad_token
from tunesmith.model.loading import context_length, load_model_and_tokenizer
from tunesmith.model.resolve import ADAPTER_CONFIG, ModelSource, read_json, resolve_source
from tunesmith.model.stops import set_stop_tokens

log = logging.getLogger(__name__)

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


def check_sets(path: str, sets: Sequence[EvalSet]) -> None:
    """Refuse, before anything loads, a set that `path`'s model cannot run: a classifier runs classify sets
    only. Raises ConfigError naming the set and the model."""
    if not any(s.kind != "classify" for s in sets):
        return
    src = resolve_source(path)
    if not src.classifier:
        return
    what = "a feature-based classifier" if src.kind == "features" else "a classification model"
    for i, s in enumerate(sets):
        if s.kind != "classify":
            raise ConfigError(f"eval.sets[{i}] ({s.name!r}, kind: {s.kind}): {src.target} is {what} (text in, "
                              "label out), which scores no tokens and writes no text; it runs kind: classify sets "
                              "(text + label rows) only")


def load_for_eval(path: str, options: LoadOptions = LoadOptions()) -> Loaded:
    """The model at `path` in eval mode on the best device, its tokenizer (chat template, pad token), and its
    baseline. Generation stops at the chat template's end-of-turn token as well as at EOS."""
    src = resolve_source(path)
    if src.kind == "features":
        return _features(src.target, options)
    if src.classifier:
        return _classifier(src, options)
    if src.kind == "checkpoint":
        model, tokenizer = _checkpoint(src)
    elif src.kind == "reft":
        model, tokenizer = _reft(src, options)
    elif src.kind == "adapter" and not options.tokenizer and not options.template:
        # The delivery loader: embeddings grown to the run's tokenizer, a QLoRA base dequantised from its 4-bit
        # weights (the model that was trained, not the full-precision original).
        model, tokenizer = load_model_and_tokenizer(src, dtype=options.dtype, allow_pickle=options.allow_pickle)
    else:
        tokenizer = _tokenizer(options.tokenizer or src.tokenizer, options)
        model = _weights(src.weights, tokenizer, options)
        if src.kind == "adapter":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(src.adapter))
    set_stop_tokens(model, tokenizer)
    kind = "model" if src.kind == "hub" else src.kind
    log.info("loaded %s (%s)%s", src.target or path, kind, f", fine-tuned from {src.base}" if src.base else "")
    return Loaded(_to_device(model).eval(), tokenizer, kind, src.base)


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


def _checkpoint(src: ModelSource):
    """Rebuild the run's model as training built it and load the checkpoint's trainable weights."""
    from safetensors.torch import load_file

    from tunesmith.model.build import build_model
    from tunesmith.model.run_tokenizer import build_tokenizer
    from tunesmith.model.trainable import WEIGHTS, load_trainable_state, verify

    problem = verify(src.target)
    if problem is not None:
        raise ModelError(f"{src.target}: damaged checkpoint: {problem}")
    cfg = src.run_config()
    tokenizer, added = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer, added, _run_labels(cfg))
    load_trainable_state(model, load_file(src.target / WEIGHTS))
    return model, tokenizer


def _reft(src: ModelSource, options: LoadOptions):
    """A ReFT run's interventions on its base (the run config's model, else the one reft_config.json names)."""
    from tunesmith.model.reft import load_reft

    tokenizer = _tokenizer(options.tokenizer or src.tokenizer, options)
    model = _weights(src.weights, tokenizer, options)
    # The stop tokens training saved, set on the base: the ReFT wrapper hands `generate` to it.
    set_stop_tokens(model, tokenizer, src.generation)
    return load_reft(model, src.target), tokenizer


def _features(path: Path, options: LoadOptions) -> Loaded:
    from tunesmith.model.features import FeatureClassifier

    classifier = FeatureClassifier.load(path, allow_pickle=options.allow_pickle, dtype=resolve_dtype(options.dtype))
    classifier.model = _to_device(classifier.model)
    log.info("loaded %s (feature-based classifier on %s, labels %s)", path, classifier.base, classifier.labels)
    return Loaded(classifier, classifier.tokenizer, "features", None)


def _classifier(src: ModelSource, options: LoadOptions) -> Loaded:
    """A classify run's final/ or checkpoint, rebuilt as training built it, or a sequence-classification model
    directory, as a HeadClassifier. Texts are cut at the run's data.max_seq_len, as in training."""
    if src.kind == "checkpoint":
        model, tokenizer = _checkpoint(src)
        max_seq_len = src.run_config().data.max_seq_len
    elif src.run is not None:
        cfg = src.run_config()
        tokenizer = load_tokenizer(str(src.target))
        model, max_seq_len = load_trained(cfg, src.target, tokenizer), cfg.data.max_seq_len
    elif src.kind == "model":
        tokenizer = _tokenizer(options.tokenizer or str(src.target), options)
        model = _sequence_classifier(src.target, tokenizer, options)
        max_seq_len = context_length(model)
    else:
        raise ConfigError(f"model.name_or_path: {src.target} is a classification {src.kind} directory; its labels "
                          "and head are rebuilt from its run's config.yaml, which is not beside it (pass the run's "
                          "final/)")
    log.info("loaded %s (classifier, %s)", src.target, src.kind)
    return Loaded(HeadClassifier(_to_device(model).eval(), tokenizer, max_seq_len), tokenizer, "classifier", None)


def _sequence_classifier(path: Path, tokenizer, options: LoadOptions):
    from tunesmith.model.heads import load_classification_model

    config = read_json(path / "config.json")
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
    spec = OBJECTIVES[cfg.train.objective]
    if spec.head == "classification":
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
        if spec.stops_at_end_of_turn and not cfg.data.train_on_prompt:
            set_stop_tokens(model, tokenizer)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, final)
        if s.name == "prompt_tuning" and spec.head != "classification":
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
    if OBJECTIVES[cfg.train.objective].head != "classification" or cfg.strategy.head.regression:
        return None
    from tunesmith.model.heads import classification_rows, label_names

    return label_names(classification_rows(cfg)[0]["train"], cfg.strategy.head.labels)


def _to_device(model):
    if torch.cuda.is_available() and not hasattr(model, "hf_device_map"):  # quantised models are placed already
        return model.to("cuda")
    return model
