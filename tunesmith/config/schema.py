"""The config schema: one typed dataclass per component, and the type aliases their fields use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

Dtype = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class ModelConfig:
    """Which checkpoint to start from and how to load it."""

    name_or_path: str = ""
    tokenizer: Optional[str] = None  # defaults to name_or_path
    revision: Optional[str] = None
    dtype: Dtype = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load .bin/.pt weights (arbitrary code on load); off by default


DataFormat = Literal["auto", "messages", "alpaca", "completion", "text", "classification", "preference", "unpaired"]


@dataclass
class SourceConfig:
    """One data source: a file, a folder or a glob, with its own format, weight and field names."""

    path: str = ""
    format: Optional[DataFormat] = None  # None: data.format
    weight: float = 1.0  # rows taken per row read: 0.5 samples half (seeded), 2 repeats every row twice
    fields: dict[str, str] = field(default_factory=dict)  # internal name -> name in the file; None: data.fields
    text_unit: Optional[Literal["file", "line"]] = None  # plain text: one document per file or per line
    task: Optional[str] = None  # labelled records of this task type (sentiment, nli, qa ...): see data.instruct


@dataclass
class QualityConfig:
    """Rows failing any of these are dropped (null: that check is off)."""

    min_chars: Optional[int] = 1
    max_chars: Optional[int] = None
    min_words: Optional[int] = None
    max_words: Optional[int] = None
    max_repeated_line_ratio: Optional[float] = 0.3  # share of lines that repeat an earlier line
    max_repeated_ngram_ratio: Optional[float] = 0.2  # share of characters in repeated word 5-grams
    max_non_text_ratio: Optional[float] = 0.5  # share of characters that are not letters, spaces, punctuation


@dataclass
class CleanConfig:
    """Cleaning steps, each off unless asked for and each counted in the data report."""

    normalize: bool = False  # Unicode (NFC/NFKC) and whitespace normalisation
    unicode_form: Literal["NFC", "NFKC"] = "NFC"
    pii: bool = False  # e-mail, phone, IP, credit card (Luhn), IBAN, API keys -> typed placeholders
    pii_kinds: list[str] = field(default_factory=lambda: ["API_KEY", "EMAIL", "IBAN", "CREDIT_CARD", "IP", "PHONE"])
    quality: bool = False  # drop rows that fail the `quality_limits`
    quality_limits: QualityConfig = field(default_factory=QualityConfig)
    exact_dedup: bool = False
    near_dedup: Literal["off", "group", "drop"] = "off"  # group: keep rows, keep each group in one split
    near_threshold: float = 0.8  # Jaccard similarity of word 5-gram shingles (MinHash LSH)
    num_perm: int = 128


@dataclass
class InstructConfig:
    """FLAN-style templates that turn the records of sources with a `task` into instruction data."""

    templates: list[str] = field(default_factory=list)  # YAML files with more task types or templates
    template_ids: Optional[list[str]] = None  # restrict to these templates (None: all)
    inverted: bool = True  # also use the inverted templates
    shots: int = 0  # k-shot exemplars, drawn from the training split only
    fewshot_format: Literal["chat", "inline"] = "chat"
    cot: bool = False  # chain-of-thought answers (tasks with worked reasoning, e.g. arithmetic)
    held_out_clusters: list[str] = field(default_factory=list)  # whole task clusters moved to the test split


@dataclass
class SplitConfig:
    """Held-out rows taken from the training sources when no separate files are given."""

    validation: float = 0.0  # below 1: a fraction of the rows; 1 or more: a count
    test: float = 0.0
    stratify_by: Optional[Literal["label", "task"]] = None


Sources = list[Union[str, SourceConfig]]


@dataclass
class DataConfig:
    """Where the examples come from and how they become token ids and loss masks."""

    train: Sources = field(default_factory=list)
    validation: Sources = field(default_factory=list)
    test: Sources = field(default_factory=list)
    format: DataFormat = "auto"
    fields: dict[str, str] = field(default_factory=dict)  # default field mapping for every source
    text_unit: Literal["file", "line"] = "file"
    on_error: Literal["error", "skip"] = "error"  # a bad row stops the run, or is dropped and counted
    template: Optional[Literal["chatml", "llama3", "alpaca"]] = None  # None: the tokenizer's own
    system_prompt: Optional[str] = None
    train_on_prompt: bool = False
    max_seq_len: int = 1024
    truncation: Literal["right", "left", "drop"] = "right"  # keep the start, keep the end, or drop
    pack: bool = False  # SFT: best-fit packing into max_seq_len; clm: fixed blocks of max_seq_len
    split: SplitConfig = field(default_factory=SplitConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    instruct: InstructConfig = field(default_factory=InstructConfig)
    num_proc: int = 1  # processes for tokenisation
    cache_dir: Optional[str] = None  # prepared data cached by fingerprint; None: ~/.cache/tunesmith/data


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Union[str, list[str]] = "auto"  # "auto": per-architecture default, or "all-linear"
    rslora: bool = False


@dataclass
class FreezeConfig:
    last_n_layers: int = 0  # train the last N transformer blocks
    modules: list[str] = field(default_factory=list)  # and these named modules, e.g. ["lm_head"]


@dataclass
class QuantConfig:
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Dtype = "auto"


@dataclass
class StrategyConfig:
    """Which parameters train."""

    name: Literal["full", "freeze", "lora", "dora", "qlora"] = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)


@dataclass
class TrainConfig:
    """The optimisation loop."""

    output_dir: str = "runs/default"
    objective: Literal["sft", "clm"] = "sft"
    epochs: int = 1
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    seed: int = 42
    log_every: int = 1
    save_every: Optional[int] = None
    keep_last: int = 2
    resume: bool = False


@dataclass
class EvalConfig:
    every: Optional[int] = None  # optimizer steps between validation passes; None: only at the end
    batch_size: int = 8


@dataclass
class TrackingConfig:
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    progress_bar: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
