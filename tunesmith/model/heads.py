"""Task heads: a new classification / regression head on a body, and training only an output layer.

    strategy head + objective classify   a sequence-classification model (`AutoModelForSequenceClassification`:
                                         decoders read the last real token, encoders their CLS/pooler); only
                                         the new head trains
    strategy head + any LM objective     only the LM head trains (untied from the input embeddings first,
                                         so the frozen body really stays as it was)

The classification data (text + label rows) are read and split here too, and tokenised by
`tunesmith.objectives.classify`, whose objective trains the head in the standard loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from typing import Sequence

import torch
from torch import nn

from tunesmith.errors import ConfigError, DataError
from tunesmith.model.sources import resolve_model_path

log = logging.getLogger(__name__)


def head_module_names(model: nn.Module) -> list[str]:
    """The top-level modules of a task model that are not its body (e.g. ["score"], ["classifier"])."""
    body = getattr(model, "base_model_prefix", "")
    names = [n for n, _ in model.named_children() if n != body]
    if not body or not hasattr(model, body) or not names:
        raise ConfigError(f"{type(model).__name__}: cannot tell its task head from its body")
    return names


def train_only_head(model: nn.Module, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Freeze everything but the head: the classification head (SEQ_CLS) or the LM head (CAUSAL_LM)."""
    model.requires_grad_(False)
    if task_type == "SEQ_CLS":
        for name in head_module_names(model):
            model.get_submodule(name).requires_grad_(True)
        return model
    untie_output_embeddings(model)
    model.get_output_embeddings().requires_grad_(True)
    return model


def untie_output_embeddings(model: nn.Module) -> None:
    """Give the LM head its own copy of a tied embedding matrix, so training it leaves the input embeddings."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None:
        raise ConfigError("strategy head: the model has no LM head; for a classification head set "
                          "train.objective=classify")
    if head.weight is not embeddings.weight:
        return
    head.weight = nn.Parameter(embeddings.weight.detach().clone())
    model.config.get_text_config().tie_word_embeddings = False
    model.config.tie_word_embeddings = False
    log.info("strategy head: untied the LM head from the input embeddings (it trains, they stay frozen)")


def load_classification_model(
    name_or_path: str,
    labels: Sequence[str],
    regression: bool = False,
    pad_token_id: int | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    quantization_config=None,
):
    """A sequence-classification model from a checkpoint (a new head unless it is one already).

    Args:
        labels: class names in id order (stored as the config's id2label); ignored for `regression`.
        pad_token_id: decoders find each row's last real token by it.
    """
    from transformers import AutoModelForSequenceClassification

    from tunesmith.model.load import _first_line, _quantized_device_map, check_weight_files

    name_or_path = resolve_model_path(name_or_path)
    check_weight_files(name_or_path, allow_pickle)
    if regression:
        kwargs = {"num_labels": 1, "problem_type": "regression"}
    else:
        kwargs = {"num_labels": len(labels), "problem_type": "single_label_classification",
                  "id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map=_quantized_device_map())
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, dtype=dtype, attn_implementation=attn_implementation, revision=revision,
            trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        from tunesmith.errors import ModelError

        raise ModelError(f"cannot load a classification model from {name_or_path!r}: {_first_line(exc)}") from None
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


# ---------------------------------------------------------------------------------------------------
# Classification data (config -> rows -> examples)


def classification_rows(cfg) -> tuple[dict[str, list], dict]:
    """Text + label rows of each split (validation/test split off train when not given) and a read report.

    Raises:
        DataError when a row is not a text + label row.
    """
    from tunesmith.data.build import options_from_config, sources_from_config
    from tunesmith.data.pipeline import read_sources
    from tunesmith.data.split import split_indices

    options = options_from_config(cfg)
    rows, report = {}, {}
    for name, sources in sources_from_config(cfg).items():
        rows[name], report[name] = read_sources(sources, options) if sources else ([], {})
        for row in rows[name]:
            if row.kind != "classification":
                raise DataError(f"{row.source}: train.objective=classify needs text + label rows, got a "
                                f"{row.kind} row (set data.format=classification and data.fields)")
    if not rows["train"]:
        raise ConfigError("data.train: no training rows")
    wanted = {k: v for k, v in (("validation", options.validation), ("test", options.test)) if not rows[k] and v}
    if wanted:
        train = rows["train"]
        parts = split_indices(len(train), wanted.get("validation", 0), wanted.get("test", 0), options.seed,
                              strata=[r.label for r in train])
        rows = {**rows, **{k: [train[i] for i in parts[k]] for k in ["train", *wanted]}}
    return rows, report


def label_names(rows: Sequence, given: Sequence[str] = ()) -> list[str]:
    """The class names in id order: `given`, or the sorted labels of the training rows."""
    found = sorted({r.label for r in rows})
    if not given:
        return found
    unknown = sorted(set(found) - set(given))
    if unknown:
        raise DataError(f"strategy.head.labels: the data has labels {unknown} that are not listed")
    return list(given)


def prepare_classification(cfg, tokenizer):
    """The classification splits as a `Prepared` (the shape `prepare_from_config` returns), ready for the loop
    with the `classify` objective."""
    from tunesmith.data.pipeline import Prepared
    from tunesmith.data.labelled import encode_labelled

    rows, sources_report = classification_rows(cfg)
    head = cfg.strategy.head
    labels = None if head.regression else label_names(rows["train"], head.labels)
    splits, split_reports = {}, {}
    for name, split_rows in rows.items():
        splits[name], split_reports[name] = encode_labelled(tokenizer, split_rows, labels, cfg.data.max_seq_len)
    key = _fingerprint(tokenizer, rows, labels, cfg.data.max_seq_len)
    report = {"fingerprint": key, "sources": sources_report, "splits": split_reports,
              "labels": labels, "label_counts": dict(Counter(r.label for r in rows["train"]))}
    return Prepared(splits, report, key)


def _fingerprint(tokenizer, rows: dict[str, list], labels, max_len: int) -> str:
    digest = hashlib.sha256(json.dumps([labels, max_len, tokenizer.name_or_path, len(tokenizer)]).encode())
    for name in sorted(rows):
        for row in rows[name]:
            digest.update(json.dumps([name, row.text, row.label]).encode())
    return digest.hexdigest()[:16]
