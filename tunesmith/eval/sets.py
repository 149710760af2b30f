"""What an eval set is, as plain values: `tunesmith.eval.command` builds them from the config (checked before any
model or torch is loaded), `tunesmith.eval.harness` runs them."""

from __future__ import annotations

from dataclasses import dataclass

COUNT_KEYS = ("n", "tokens", "dropped", "truncated", "no_answer")  # counts, not scores (no deltas)
DEFAULT_COT_INSTRUCTION = "Let's think step by step."


@dataclass(frozen=True)
class EvalSet:
    """One eval set as plain values (built from an EvalSetConfig by `tunesmith.eval.command`)."""

    name: str
    path: str
    kind: str = "generate"  # loss | choice | generate | classify
    format: str = "auto"
    fields: tuple[tuple[str, str], ...] = ()
    limit: int | None = None
    general: bool = False
    options: tuple[str, ...] = ()
    length_normalize: str = "none"
    metrics: tuple[str, ...] = ("exact_match",)
    scorer: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    prompt_format: str = "auto"
    shots: int = 0
    fewshot_path: str | None = None
    cot: bool = False
    cot_instruction: str = DEFAULT_COT_INSTRUCTION


@dataclass(frozen=True)
class Settings:
    """What every set shares, taken from the data options training used."""

    batch_size: int = 8
    max_seq_len: int = 1024
    truncation: str = "right"
    train_on_prompt: bool = False
    system_prompt: str | None = None
    seed: int = 0
    num_examples: int = 3  # generations kept for the report
