"""Checks of a built Config: cross-field checks (`check`) and the files and model a run needs (`check_paths`)."""

from __future__ import annotations

from pathlib import Path

from tunesmith.config.objectives import OBJECTIVES, objectives_where
from tunesmith.config.schema import Config, SourceConfig
from tunesmith.errors import ConfigError, DataError
from tunesmith.paths import resolve_paths

# ---------------------------------------------------------------------------------------------------
# Cross-field checks that need no I/O beyond existence of files.


def check(cfg: Config) -> None:
    """Checks that span several keys; raise ConfigError before any work starts."""
    t = cfg.train
    for key, value in (("train.micro_batch_size", t.micro_batch_size), ("train.grad_accum", t.grad_accum),
                       ("train.epochs", t.epochs), ("train.log_every", t.log_every),
                       ("data.max_seq_len", cfg.data.max_seq_len), ("eval.batch_size", cfg.eval.batch_size),
                       ("train.keep_last", t.keep_last)):
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    for key, value in (("train.max_steps", t.max_steps), ("train.save_every", t.save_every),
                       ("eval.every", cfg.eval.every)):
        if value is not None and value < 1:
            raise ConfigError(f"{key}: must be at least 1 or null, got {value}")
    for name in ("validation", "test"):
        size = getattr(cfg.data.split, name)
        if size < 0 or (size >= 1 and size != int(size)):
            raise ConfigError(f"data.split.{name}: a fraction below 1 or a whole count, got {size}")
    if cfg.data.num_proc < 1:
        raise ConfigError(f"data.num_proc: must be at least 1, got {cfg.data.num_proc}")
    for key in ("train", "validation", "test"):
        for i, source in enumerate(getattr(cfg.data, key)):
            if isinstance(source, SourceConfig) and (not source.path or source.weight <= 0):
                raise ConfigError(f"data.{key}[{i}]: a source needs a path and a positive weight")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    for key, value in (("train.warmup_steps", t.warmup_steps), ("train.weight_decay", t.weight_decay),
                       ("strategy.freeze.last_n_layers", cfg.strategy.freeze.last_n_layers)):
        if value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value}")
    if not 0 <= t.seed < 2**32:  # what NumPy (and so every run's seeding) accepts
        raise ConfigError(f"train.seed: must be in [0, 2**32), got {t.seed}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"train.betas: expected two numbers in [0, 1), got {t.betas}")
    for key, value in (("train.lr", t.lr), ("train.eps", t.eps), ("train.max_grad_norm", t.max_grad_norm)):
        if value is not None and value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if not 0.0 <= cfg.strategy.lora.dropout < 1.0:
        raise ConfigError(f"strategy.lora.dropout: must be in [0, 1), got {cfg.strategy.lora.dropout}")
    if cfg.strategy.name in ("lora", "dora", "qlora") and cfg.strategy.lora.r < 1:
        raise ConfigError(f"strategy.lora.r: must be at least 1, got {cfg.strategy.lora.r}")
    if cfg.strategy.name == "freeze" and not (cfg.strategy.freeze.last_n_layers or cfg.strategy.freeze.modules):
        raise ConfigError("strategy.freeze: set last_n_layers and/or modules, otherwise nothing trains")
    if cfg.model.init is not None:
        _check_init(cfg)
    _check_align(cfg)
    _check_eval(cfg)
    _check_distributed(cfg)


def _check_distributed(cfg: Config) -> None:
    """train.distributed: the keys each strategy needs, and what a sharded run cannot do."""
    d, t = cfg.train.distributed, cfg.train
    if d.strategy == "deepspeed" and not d.deepspeed_config:
        raise ConfigError("train.distributed.deepspeed_config: strategy deepspeed needs a DeepSpeed JSON config, e.g. "
                          "configs/deepspeed/zero2.json")
    if d.deepspeed_config and d.strategy != "deepspeed":
        raise ConfigError(f"train.distributed.deepspeed_config: set, but train.distributed.strategy is {d.strategy}; "
                          "set strategy deepspeed or remove it")
    if d.wrap and d.strategy != "fsdp":
        raise ConfigError(f"train.distributed.wrap: applies to strategy fsdp, not {d.strategy}")
    if d.strategy == "ddp":
        return
    if d.strategy == "fsdp" and t.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision: fp16 needs a sharded gradient scaler, which tunesmith does not use "
                          "with fsdp; use bf16")
    if d.strategy == "fsdp" and cfg.strategy.name == "qlora":
        raise ConfigError("strategy.name: qlora's 4-bit weights are not sharded by fsdp here; use lora, or "
                          "train.distributed.strategy ddp")
    if OBJECTIVES[t.objective].generates:
        raise ConfigError(f"train.distributed.strategy: {d.strategy} with objective {t.objective}: rollouts generate "
                          "a different number of tokens in each process, which sharded weights cannot follow; use ddp")
    if d.strategy == "deepspeed":
        for key, value in (("train.save_every", t.save_every), ("train.resume", t.resume),
                           ("eval.best_metric", cfg.eval.best_metric)):
            if value:
                raise ConfigError(f"{key}: checkpoints of deepspeed runs (partitioned optimizer state) are not "
                                  "implemented; leave it unset, or use strategy fsdp for sharded, resumable runs")
    if d.strategy == "deepspeed" and t.on_nonfinite == "skip":
        raise ConfigError("train.on_nonfinite: DeepSpeed applies the update inside its backward, so a step cannot be "
                          "skipped; use stop")


# Strategies that can train a model from random weights: the others adapt or read a pretrained one.
INIT_STRATEGIES = ("full", "freeze")


def _check_init(cfg: Config) -> None:
    """A model built from scratch (model.init): its own keys, and the keys that must agree with it."""
    m, i = cfg.model, cfg.model.init
    if m.name_or_path:
        raise ConfigError(f"model.init and model.name_or_path ({m.name_or_path!r}): a new model is built from "
                          "model.init, or a checkpoint is loaded; set one (model.init=null continues a checkpoint)")
    if not m.tokenizer:
        raise ConfigError("model.tokenizer: model.init builds a new model for a tokenizer; name its directory "
                          "(train one with `tunesmith tokenizer CORPUS --output DIR`)")
    if cfg.strategy.name not in INIT_STRATEGIES:
        raise ConfigError(f"strategy.name: {cfg.strategy.name!r} adapts a pretrained model; a model built from "
                          f"model.init has random weights, so train it with {' or '.join(INIT_STRATEGIES)}")
    if OBJECTIVES[cfg.train.objective].head != "causal":
        raise ConfigError(f"train.objective: {cfg.train.objective} puts a new head on a pretrained model; pretrain "
                          "one from model.init with objective clm first, then start from its final/")
    for key in ("num_layers", "hidden_size", "num_heads", "max_position_embeddings"):
        if getattr(i, key) < 1:
            raise ConfigError(f"model.init.{key}: must be at least 1, got {getattr(i, key)}")
    for key in ("num_kv_heads", "intermediate_size", "vocab_size"):
        if getattr(i, key) is not None and getattr(i, key) < 1:
            raise ConfigError(f"model.init.{key}: must be at least 1 or null, got {getattr(i, key)}")
    if i.hidden_size % i.num_heads:
        raise ConfigError(f"model.init.hidden_size: {i.hidden_size} must be a multiple of model.init.num_heads "
                          f"({i.num_heads})")
    if i.num_kv_heads is not None and i.num_heads % i.num_kv_heads:
        raise ConfigError(f"model.init.num_kv_heads: {i.num_kv_heads} must divide model.init.num_heads "
                          f"({i.num_heads})")
    if i.family == "gpt2" and i.num_kv_heads not in (None, i.num_heads):
        raise ConfigError("model.init.num_kv_heads: gpt2 has no grouped-query attention; leave it null")
    if i.max_position_embeddings < cfg.data.max_seq_len:
        raise ConfigError(f"model.init.max_position_embeddings: {i.max_position_embeddings} is less than "
                          f"data.max_seq_len ({cfg.data.max_seq_len})")
    if i.seed is not None and not 0 <= i.seed < 2**32:
        raise ConfigError(f"model.init.seed: must be in [0, 2**32) or null, got {i.seed}")


def _check_eval(cfg: Config) -> None:
    e = cfg.eval
    if e.generate_samples < 0:
        raise ConfigError(f"eval.generate_samples: must not be negative, got {e.generate_samples}")
    if e.max_new_tokens < 1:
        raise ConfigError(f"eval.max_new_tokens: must be at least 1, got {e.max_new_tokens}")
    if e.early_stopping_patience is not None:
        if e.early_stopping_patience < 1:
            raise ConfigError(f"eval.early_stopping_patience: must be at least 1 or null, got {e.early_stopping_patience}")
        if not e.best_metric:
            raise ConfigError("eval.early_stopping_patience: needs eval.best_metric (what must improve)")
    if (e.best_metric or e.load_best_at_end) and not (cfg.data.validation or cfg.data.split.validation):
        raise ConfigError("eval.best_metric: needs validation data (data.validation or data.split.validation)")
    if e.load_best_at_end and not e.best_metric:
        raise ConfigError("eval.load_best_at_end: needs eval.best_metric")


def _check_align(cfg: Config) -> None:
    a, objective = cfg.align, cfg.train.objective
    if OBJECTIVES[objective].next_token_loss:
        return
    if cfg.data.pack:
        raise ConfigError(f"data.pack: applies to sft and clm; {objective} compares whole answers, set it false")
    if cfg.data.padding_free and not OBJECTIVES[objective].padding_free:
        names = ", ".join(objectives_where(padding_free=True))
        raise ConfigError(f"data.padding_free: applies to {names}, not {objective}; set it false")
    if cfg.data.padding_free and cfg.strategy.name in ("prompt_tuning", "prefix_tuning", "reft"):
        raise ConfigError(f"data.padding_free: strategy {cfg.strategy.name} adds to each conversation's own "
                          f"positions, which a padding-free pair batch shares between them; set it false")
    if a.beta <= 0:
        raise ConfigError(f"align.beta: must be positive, got {a.beta}")
    if not 0.0 <= a.label_smoothing < 0.5:
        raise ConfigError(f"align.label_smoothing: must be in [0, 0.5), got {a.label_smoothing}")
    if a.label_smoothing and objective == "dpo" and a.loss_type not in ("sigmoid", "robust"):
        raise ConfigError(f"align.label_smoothing: applies to loss_type sigmoid or robust, not {a.loss_type}")
    for key in ("simpo_gamma", "orpo_lambda", "kto_desirable_weight", "kto_undesirable_weight", "reward_margin",
                "kl_beta", "kl_coef", "vf_coef", "ent_coef", "clip_eps", "value_clip"):
        if getattr(a, key) < 0:
            raise ConfigError(f"align.{key}: must not be negative, got {getattr(a, key)}")
    if objective == "grpo" and a.group_size < 2:
        raise ConfigError(f"align.group_size: grpo compares samples of a prompt, so at least 2, got {a.group_size}")
    for key in ("group_size", "max_new_tokens", "ppo_epochs", "samples_per_step"):
        if getattr(a, key) < (0 if key == "samples_per_step" else 1):
            raise ConfigError(f"align.{key}: must be at least 1, got {getattr(a, key)}")
    if a.kl_target is not None and a.kl_target <= 0:
        raise ConfigError(f"align.kl_target: must be positive or null, got {a.kl_target}")
    if not 0 < a.top_p <= 1 or a.temperature < 0:
        raise ConfigError(f"align.top_p / align.temperature: need 0 < top_p <= 1 and temperature >= 0, got "
                          f"{a.top_p} / {a.temperature}")
    if OBJECTIVES[objective].head == "score" and cfg.strategy.name == "freeze" \
            and "score" not in cfg.strategy.freeze.modules:
        raise ConfigError("strategy.freeze.modules: a reward model's new score head must train; add 'score'")


def check_paths(cfg: Config) -> None:
    """Checks that the files and the model a run needs exist (called by commands before any work)."""
    if cfg.model.init is None:
        if not cfg.model.name_or_path:
            raise ConfigError("model.name_or_path: required (a local model directory or a hub id), or model.init "
                              "to build a new model")
        _check_model_path("model.name_or_path", cfg.model.name_or_path)
    if cfg.model.tokenizer:
        _check_model_path("model.tokenizer", cfg.model.tokenizer)
    if not cfg.data.train:
        raise ConfigError("data.train: required (one or more data files)")
    for key in ("train", "validation", "test"):
        for i, source in enumerate(getattr(cfg.data, key)):
            path = source.path if isinstance(source, SourceConfig) else source
            try:
                resolve_paths(path)
            except DataError as exc:
                raise ConfigError(f"data.{key}[{i}]: {exc}") from None


def _check_model_path(key: str, value: str) -> None:
    """A value that looks like a filesystem path must exist: a model directory, or a .gguf file (converted when
    loaded, model/sources.py); 'org/name' may be a hub id and a bare name a packaged model."""
    if value.lower().endswith(".gguf"):
        if not Path(value).expanduser().is_file():
            raise ConfigError(f"{key}: GGUF file not found: {value}")
        return
    looks_local = value.startswith((".", "/", "~")) or value.count("/") > 1 or "\\" in value
    if looks_local and not Path(value).expanduser().is_dir():
        raise ConfigError(f"{key}: model directory not found: {value}")
