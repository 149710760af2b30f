"""Models that map a text to a label, as `tunesmith eval` scores them on classification sets (`kind: classify`).

    TextClassifier      what the harness needs: `labels` and `predict(texts) -> labels`
    FeatureClassifier   a feature-based run (`tunesmith.model.features`) is one as it is
    HeadClassifier      a sequence-classification model (a head-only run's final/, or a `train.objective:
                        classify` run under LoRA or ReFT) predicting the arg-max of its head's logits

A causal LM is not a TextClassifier: on a classification set it chooses among the labels by their
log-likelihood (`tunesmith.eval.harness.label_choice_metrics`). Every other kind of eval set (loss, choice,
generate) needs a causal LM; `require_lm` says so before a set runs.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from tunesmith.errors import ConfigError


@runtime_checkable
class TextClassifier(Protocol):
    """Texts in, one of `labels` out per text."""

    @property
    def labels(self) -> list[str]: ...

    def predict(self, texts: Sequence[str]) -> list[str]: ...


class HeadClassifier:
    """A sequence-classification model (`AutoModelForSequenceClassification`, possibly inside a PEFT or ReFT
    wrapper) and its tokenizer as a TextClassifier.

    Texts are tokenised as training tokenised them (`add_special_tokens=True`, cut at `max_seq_len` on the
    right) and batched as training batched them (left padding, `tunesmith.objectives.classify`).

    Args:
        model: the classification model, in eval mode; its `config.id2label` names the classes.
        tokenizer: the run's tokenizer (its pad token pads the batches).
        max_seq_len: longest input, in tokens.
        batch_size: rows per forward pass.
    Raises:
        ConfigError for a regression head (it predicts numbers, not labels).
    """

    def __init__(self, model, tokenizer, max_seq_len: int = 1024, batch_size: int = 8) -> None:
        config = model.config
        if config.problem_type == "regression" or config.num_labels < 2:
            raise ConfigError("a regression head predicts a number, not a label; kind: classify sets need a "
                              "classification head")
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_len, self.batch_size = max_seq_len, batch_size
        self._labels = [config.id2label[i] for i in range(config.num_labels)]

    @property
    def labels(self) -> list[str]:
        return self._labels

    def predict(self, texts: Sequence[str]) -> list[str]:
        from tunesmith.data.labelled import LabelledText
        from tunesmith.objectives.classify import predict

        ids = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        examples = [LabelledText(row[: self.max_seq_len], 0) for row in ids]  # the target is not used
        predicted = predict(self.model, examples, self.tokenizer.pad_token_id, self.batch_size)  # (N,) class ids
        return [self._labels[i] for i in predicted.tolist()]


def describe(model) -> str:
    """What a loaded model is, in words, for messages."""
    if isinstance(model, HeadClassifier):
        return "a sequence-classification model"
    if isinstance(model, TextClassifier):
        return f"a text classifier ({type(model).__name__})"
    return "a causal LM"


def require_lm(model, set_name: str, kind: str) -> None:
    """Refuse to run a loss, choice or generate set on a TextClassifier (it scores no tokens and writes no
    text)."""
    if isinstance(model, TextClassifier):
        raise ConfigError(f"eval set {set_name!r} (kind: {kind}) needs a causal LM, but the model is "
                          f"{describe(model)} (text in, label out); score it on kind: classify sets")
