"""The config schema: one typed dataclass per component, and the type aliases their fields use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from tunesmith.config.objectives import OBJECTIVES

Dtype = Literal["auto", "fp32", "bf16", "fp16"]


ModelFamily = Literal["llama", "qwen2", "mistral", "gpt2"]


@dataclass
class ModelInitConfig:
    """A new, randomly initialised model (pretraining from scratch) instead of a checkpoint."""

    family: ModelFamily = "llama"
    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: Optional[int] = None  # grouped-query attention (not gpt2); None: num_heads
    intermediate_size: Optional[int] = None  # None: 4 * hidden (gpt2), else LLaMA's 8/3 * hidden rounded up to 256
    max_position_embeddings: int = 1024  # at least data.max_seq_len
    vocab_size: Optional[int] = None  # None: the tokenizer's length; larger leaves spare rows
    tie_embeddings: bool = False  # the output head shares the input embedding matrix
    seed: Optional[int] = None  # None: train.seed


@dataclass
class ModelConfig:
    """Which checkpoint to start from and how to load it, or (`init`) which new model to build."""

    name_or_path: str = ""
    tokenizer: Optional[str] = None  # defaults to name_or_path; required with init
    init: Optional[ModelInitConfig] = None  # set: a new model from scratch (name_or_path stays empty)
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
    template: Optional[Literal["chatml", "llama3", "alpaca", "gemma"]] = None  # None: the tokenizer's own
    system_prompt: Optional[str] = None
    train_on_prompt: bool = False
    max_seq_len: int = 1024
    truncation: Literal["right", "left", "drop"] = "right"  # keep the start, keep the end, or drop
    pack: bool = False  # SFT: best-fit packing into max_seq_len; clm: fixed blocks of max_seq_len
    # SFT/clm: each micro-batch's examples laid end to end in one row, position ids restarting at each, no
    # padding. The same batches and loss as padding; attention runs per example (model/attention.py).
    padding_free: bool = False
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
class HeadConfig:
    """strategy head: only a task head trains on the frozen body. With train.objective=classify it is a new
    classification (or regression) head; otherwise the LM head alone trains."""

    labels: list[str] = field(default_factory=list)  # classify: class names in id order; []: sorted data labels
    regression: bool = False  # classify: one real-valued output trained with squared error


@dataclass
class FeaturesConfig:
    """strategy features: the frozen model turns texts into vectors, a scikit-learn classifier learns on them."""

    pooling: Literal["mean", "last", "cls"] = "mean"
    layer: int = -1  # index into the hidden states: 0 the embeddings, -1 the last layer
    classifier: Literal["logistic_regression", "linear_svm", "ridge", "knn", "random_forest"] = "logistic_regression"
    c: float = 1.0  # inverse regularisation strength (logistic_regression, linear_svm)
    max_iter: int = 1000
    standardize: bool = True  # scale each feature to zero mean, unit variance before the classifier
    batch_size: int = 32
    max_length: int = 512  # tokens per text (longer texts are cut at the right)
    cache: bool = True  # features cached under <data cache>/features, keyed by model, pooling, layer and texts
    allow_pickle: bool = False  # knn / random_forest can only be saved as pickle (runs code when loaded)


@dataclass
class PromptConfig:
    """strategy prompt_tuning / prefix_tuning: trained virtual tokens (PEFT)."""

    num_virtual_tokens: int = 20
    init_text: Optional[str] = None  # prompt tuning: start from this text's token embeddings (None: random)
    prefix_projection: bool = False  # prefix tuning: produce the prefix through a 2-layer MLP (Li & Liang 2021)
    projection_hidden_size: int = 512  # that MLP's width


@dataclass
class ReftConfig:
    """strategy reft: LoReFT interventions h + R^T (W h + b - R h) on the residual stream (Wu et al. 2024)."""

    layers: Union[str, list[int]] = "all"  # "all", or block indices (negative counts from the end)
    rank: int = 4
    first: int = 3  # intervene on the first `first` prompt tokens
    last: int = 3  # and on the last `last` prompt tokens
    dropout: float = 0.0  # on the edit W h + b - R h, while training


StrategyName = Literal["full", "freeze", "lora", "dora", "qlora", "head", "features", "prompt_tuning",
                       "prefix_tuning", "reft"]


@dataclass
class StrategyConfig:
    """Which parameters train."""

    name: StrategyName = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    reft: ReftConfig = field(default_factory=ReftConfig)


Objective = Literal[tuple(OBJECTIVES)]  # the names of config/objectives.py, the one table of what each needs


@dataclass
class AlignConfig:
    """Preference objectives (reward, dpo, simpo, orpo, kto): their coefficients and the reference model."""

    beta: float = 0.1  # dpo/kto: strength of the pull towards the reference; simpo: reward scale
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"  # dpo variant
    label_smoothing: float = 0.0  # dpo sigmoid (conservative) / robust: assumed share of flipped labels
    simpo_gamma: float = 0.5  # simpo target margin (in units of beta-scaled average log-prob)
    orpo_lambda: float = 0.1  # weight of orpo's odds-ratio term next to the chosen answers' NLL
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    reward_margin: float = 0.0  # reward: required score gap between chosen and rejected
    precompute_ref: bool = False  # dpo/kto: reference log-probs computed once before training, no second model
    # grpo and ppo: rollouts, rewards and the clipped policy loss
    group_size: int = 4  # completions sampled per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    rewards: list[str] = field(default_factory=lambda: ["exact_answer"])  # built-ins or module:function
    reward_model: Optional[str] = None  # a reward run (or model dir) whose score is added to the rewards
    scale_by_std: bool = True  # advantages divided by the group's reward std (false: Dr. GRPO)
    kl_beta: float = 0.0  # weight of the per-token KL to the reference (0: no reference needed)
    clip_eps: float = 0.2
    normalisation: Literal["sequence", "token"] = "sequence"  # token mean per sequence, or per token (DAPO)
    samples_per_step: int = 4  # sample generations written to samples.jsonl per step
    # ppo: a value head on the policy, per-token KL penalty in the rewards, GAE
    ppo_epochs: int = 2  # optimizer steps on each rollout
    kl_coef: float = 0.05  # initial (adaptive) or fixed KL penalty coefficient
    kl_target: Optional[float] = None  # set: adapt kl_coef towards this KL per sequence (Ziegler et al.)
    kl_horizon: float = 10000.0
    vf_coef: float = 0.1
    value_clip: float = 0.2
    ent_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95


@dataclass
class DistributedConfig:
    """How the processes of a multi-process run (`--nproc`, torchrun) share the model (see the README)."""

    # ddp: a full copy per process, gradients averaged; fsdp: FSDP2 full shard (weights, gradients and optimizer
    # state split across processes); deepspeed: ZeRO through accelerate, configured by deepspeed_config
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    # fsdp: free each block's gathered weights after its forward (false keeps them until the backward: more
    # memory, less communication, like ZeRO-2)
    reshard_after_forward: bool = True
    wrap: list[str] = field(default_factory=list)  # fsdp: block class names sharded as units; []: the model's own
    deepspeed_config: Optional[str] = None  # deepspeed: a DeepSpeed JSON file; its "auto" values come from train.*


@dataclass
class TrainConfig:
    """The optimisation loop."""

    output_dir: str = "runs/default"
    objective: Objective = "sft"
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
    # A NaN/inf loss or gradient norm: "skip" drops that update (counted in metrics.jsonl and the report; the
    # learning-rate schedule still advances), "stop" ends the run with an error, keeping the checkpoints so far.
    on_nonfinite: Literal["skip", "stop"] = "stop"
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # several processes
    # Speed and memory
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast with fp32 master weights (bf16 also on CPU)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% slower
    compile: bool = False  # torch.compile the model (first steps are slow while it compiles)
    # SFT/clm: the LM head and the loss fused, on loss-bearing positions only, a chunk at a time: no (B, T, V)
    # logits (objectives/head.py). Models whose head is not a plain linear layer use the full logits anyway.
    fused_loss: bool = True
    probe_memory: bool = True  # run the longest micro-batch once before training, so an out-of-memory shows at once


EvalMetric = Literal["exact_match", "rouge_l", "bleu", "chrf", "numeric"]


@dataclass
class EvalSetConfig:
    """One evaluation set: a data file, what is measured on it, and how the model is prompted."""

    name: str = ""  # "": the file's stem
    path: str = ""  # read by the training data readers (jsonl/json/csv/parquet/txt ...)
    kind: Literal["loss", "choice", "generate", "classify"] = "generate"  # classify: text + label rows
    format: Optional[DataFormat] = None  # loss/generate: None detects it from the first record
    fields: dict[str, str] = field(default_factory=dict)  # internal name -> name in the file
    limit: Optional[int] = None  # only the first N rows
    general: bool = False  # measures general ability: reported as forgetting (also: eval.general)
    # choice: the options are each row's `options`, else this fixed list; the winner has the highest log-likelihood.
    # classify: a causal LM chooses among these labels (default: the labels in the file); a classifier predicts
    options: list[str] = field(default_factory=list)
    length_normalize: Literal["none", "token", "char"] = "none"  # divide by option tokens or characters
    # generate
    metrics: list[EvalMetric] = field(default_factory=lambda: ["exact_match"])
    scorer: Optional[str] = None  # "module:function" or "file.py:function": (prediction, reference) -> float | dict
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    # prompting (choice and generate)
    prompt_format: Literal["auto", "chat", "plain"] = "auto"  # auto: chat template when the tokenizer has one
    shots: int = 0  # k exemplars per item, drawn from fewshot_path, never the item itself
    fewshot_path: Optional[str] = None
    cot: bool = False  # exemplars with worked reasoning; the answer is read after the reasoning
    cot_instruction: str = "Let's think step by step."


@dataclass
class EvalConfig:
    every: Optional[int] = None  # optimizer steps between validation passes; None: only at the end
    batch_size: int = 8
    sets: list[EvalSetConfig] = field(default_factory=list)  # what `tunesmith eval` runs
    general: list[str] = field(default_factory=list)  # names of sets that measure forgetting
    output_dir: Optional[str] = None  # eval.json and eval.md; None: <train.output_dir>/eval
    examples: int = 3  # generations shown per set in eval.json/eval.md
    # During training, at every validation pass:
    generate_samples: int = 0  # greedy answers to this many validation examples, scored by generate_metrics
    generate_metrics: list[Literal["exact_match", "rouge_l", "bleu", "chrf", "numeric"]] = field(
        default_factory=lambda: ["exact_match"])
    max_new_tokens: int = 64
    best_metric: Optional[str] = None  # e.g. eval_loss, eval_exact_match: its best checkpoint is kept
    best_mode: Literal["auto", "min", "max"] = "auto"  # auto: min for losses and perplexity, else max
    early_stopping_patience: Optional[int] = None  # stop after this many validation passes without improvement
    load_best_at_end: bool = False  # final/ holds the best checkpoint's weights instead of the last ones
    # Forgetting, during training: the general sets (`general`) are scored before step 1 and at every validation
    # pass; a drop of more than this many points (percentage points of a 0-1 score, BLEU/chrF points, percent
    # more perplexity) warns, or with on_forgetting=stop ends the run keeping the last pass within the limit.
    forgetting_max_drop: float = 10.0
    on_forgetting: Literal["warn", "stop"] = "warn"


@dataclass
class WandbConfig:
    """A Weights & Biases run (used when "wandb" is in tracking.sinks)."""

    project: str = "tunesmith"
    entity: Optional[str] = None
    name: Optional[str] = None  # None: the run directory's name
    mode: Literal["offline", "online"] = "offline"  # offline: a local run to upload later with `wandb sync`
    dir: Optional[str] = None  # None: the run directory (W&B writes its own wandb/ folder inside)


@dataclass
class MlflowConfig:
    """An MLflow run (used when "mlflow" is in tracking.sinks)."""

    tracking_uri: Optional[str] = None  # None: a local file store, file:<run dir>/mlruns
    experiment: str = "tunesmith"
    run_name: Optional[str] = None  # None: the run directory's name


Sink = Literal["tensorboard", "wandb", "mlflow"]


@dataclass
class TrackingConfig:
    """Where a run's metrics go: metrics.jsonl always, plus each of `sinks`."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    progress_bar: bool = True
    sinks: list[Sink] = field(default_factory=list)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
