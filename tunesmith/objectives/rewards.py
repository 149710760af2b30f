"""Reward functions for RL objectives: (completion text, reference answer text) -> float.

    exact_answer   1 when the completion's final answer equals the reference (numbers compared as numbers,
                   text after normalisation), else 0
    numeric        1 when the completion contains a number equal to the reference's, read by `extract_number`
    format         1 when the completion is short and ends on its answer (no trailing rambling), else 0
    module:func    any importable function with the same signature

A reward model (a sequence-classification checkpoint, or a reward run's adapter) scores the whole
conversation instead; see `RewardModel`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from tunesmith.data.answers import exact_match, extract_answer, numeric_match
from tunesmith.errors import ConfigError
from tunesmith.model.load import resize_embeddings

RewardFn = Callable[[str, str], float]


def exact_answer(completion: str, reference: str) -> float:

    if numeric_match(completion, reference):
        return 1.0
    answer = extract_answer(completion)
    return float(exact_match(completion, reference) or (answer is not None and exact_match(answer, reference)))


def numeric(completion: str, reference: str) -> float:

    return float(numeric_match(completion, reference))


def answer_format(completion: str, reference: str, max_words: int = 32) -> float:
    """A completion of at most `max_words` words whose last word carries a digit or a letter."""
    words = completion.split()
    return float(0 < len(words) <= max_words and any(c.isalnum() for c in words[-1]))


REWARD_FUNCTIONS: dict[str, RewardFn] = {"exact_answer": exact_answer, "numeric": numeric, "format": answer_format}


def reward_functions(names: Sequence[str]) -> list[RewardFn]:
    """The named built-ins, or `module:function` imports; an unknown name is a ConfigError on align.rewards."""
    out = []
    for i, name in enumerate(names):
        if name in REWARD_FUNCTIONS:
            out.append(REWARD_FUNCTIONS[name])
            continue
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr) if attr else None
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"align.rewards[{i}]: cannot import {name!r}: {exc}") from None
        if not callable(fn):
            raise ConfigError(f"align.rewards[{i}]: {name!r} is neither a built-in reward "
                              f"({', '.join(REWARD_FUNCTIONS)}) nor an importable module:function")
        out.append(fn)
    return out


class RewardModel:
    """Scores prompt + completion ids with a sequence-classification model (one scalar at the last token)."""

    def __init__(self, path: str, tokenizer, device: torch.device) -> None:
        self.model = load_reward_model(path, tokenizer).to(device).eval()
        self.pad_token_id = tokenizer.pad_token_id
        self.device = device

    @torch.no_grad()
    def __call__(self, sequences: Sequence[list[int]]) -> torch.Tensor:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
        return out.logits.squeeze(-1).float().cpu()


def load_reward_model(path: str, tokenizer):
    """A reward model directory: a full sequence-classification model, or a reward run's PEFT adapter (its
    base is read from adapter_config.json)."""
    from transformers import AutoModelForSequenceClassification

    root = Path(path)
    root = root / "final" if (root / "final").is_dir() else root
    adapter = root / "adapter_config.json"
    base_path = json.loads(adapter.read_text())["base_model_name_or_path"] if adapter.is_file() else str(root)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"align.reward_model: cannot load {base_path!r}: {exc}") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    resize_embeddings(model, tokenizer)  # the rows the reward run added, initialised as it did
    if adapter.is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, root)
    return model
