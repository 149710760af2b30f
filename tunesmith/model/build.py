"""Config -> the `transformers` config of the run's model, and the model itself as training builds it (weights,
embeddings grown to the tokenizer, stop tokens, the strategy's wrapping); the tokenizer is model/run_tokenizer.py's.

`estimate` asks here rather than the training module, so it starts without importing the training stack
(accelerate, the objectives). Evaluating a checkpoint rebuilds its model here, as training did.
"""

from __future__ import annotations

import dataclasses
import logging

from tunesmith.config import Config
from tunesmith.config.objectives import OBJECTIVES
from tunesmith.errors import ConfigError
from tunesmith.model.heads import load_classification_model
from tunesmith.model.load import load_model, resize_embeddings, resolve_dtype
from tunesmith.model.prompt_tuning import PromptSpec
from tunesmith.model.reft import ReftSpec
from tunesmith.model.scratch import init_fields, init_model
from tunesmith.model.sources import resolve_model_path
from tunesmith.model.stops import set_stop_tokens
from tunesmith.model.strategies import ADAPTER_STRATEGIES, apply_strategy, parameter_counts, quantization_config

log = logging.getLogger(__name__)


def architecture(cfg: Config, tokenizer):
    """The `transformers` config of the run's model: built from model.init for `tokenizer`, else the checkpoint's.

    Raises:
        ConfigError when model.init.vocab_size is smaller than the tokenizer.
    """
    from transformers import AutoConfig

    m = cfg.model
    if m.init is None:
        return AutoConfig.from_pretrained(resolve_model_path(m.name_or_path), revision=m.revision,
                                          trust_remote_code=m.trust_remote_code)
    return AutoConfig.for_model(**init_fields(m.init, tokenizer))


def build_model(cfg: Config, tokenizer, added_tokens: list[str], labels: list[str] | None = None):
    """The model, its embeddings grown to the tokenizer, wrapped for the chosen strategy.

    Args:
        labels: class names for train.objective=classify (None: regression, or another objective).
    """
    from tunesmith.model.attention import VARLEN, supports_varlen  # transformers' attention stack: seconds to import

    m, strategy = cfg.model, cfg.strategy
    quant = None
    if strategy.name == "qlora":
        compute = resolve_dtype(strategy.quant.compute_dtype)
        quant = quantization_config(strategy.quant.quant_type, strategy.quant.double_quant, compute)
    spec = OBJECTIVES[cfg.train.objective]
    reward, classify = spec.head == "score", spec.head == "classification"
    if classify:
        model = load_classification_model(m.name_or_path, labels or [], strategy.head.regression,
                                          tokenizer.pad_token_id, resolve_dtype(m.dtype), m.attn_implementation,
                                          m.revision, m.trust_remote_code, m.allow_pickle, quant)
    elif m.init is not None:  # pretraining from scratch (checks refused reward, classify and adapters)
        seed = cfg.train.seed if m.init.seed is None else m.init.seed
        model = init_model(architecture(cfg, tokenizer), seed, resolve_dtype(m.dtype), m.attn_implementation)
        log.info("built a new %s model from model.init (seed %d)", m.init.family, seed)
    else:
        model = load_model(m.name_or_path, resolve_dtype(m.dtype), m.attn_implementation, m.revision,
                           m.trust_remote_code, m.allow_pickle, quant, head="score" if reward else "causal")
    if (cfg.data.pack or cfg.data.padding_free) and m.attn_implementation == "sdpa" \
            and supports_varlen(model.config):
        model.set_attn_implementation(VARLEN)  # several examples per row: attention per example, no L x L mask
    resize_embeddings(model, tokenizer)
    if reward:  # the score is read at each row's last non-pad token
        model.config.pad_token_id = tokenizer.pad_token_id
    elif spec.stops_at_end_of_turn and not cfg.data.train_on_prompt:
        set_stop_tokens(model, tokenizer)
    new_ids = tokenizer.convert_tokens_to_ids(added_tokens) if strategy.name in ADAPTER_STRATEGIES else []
    model = apply_strategy(
        model, strategy.name,
        lora_r=strategy.lora.r, lora_alpha=strategy.lora.alpha, lora_dropout=strategy.lora.dropout,
        target_modules=strategy.lora.target_modules, rslora=strategy.lora.rslora,
        freeze_last_n_layers=strategy.freeze.last_n_layers, freeze_modules=strategy.freeze.modules,
        new_token_ids=new_ids, task_type="SEQ_CLS" if reward or classify else "CAUSAL_LM",
        prompt=PromptSpec(**dataclasses.asdict(strategy.prompt)), reft=ReftSpec(**dataclasses.asdict(strategy.reft)),
    )
    trainable, total = parameter_counts(model)
    log.info("strategy %s: %s trainable of %s parameters (%.4f%%)", strategy.name, f"{trainable:,}",
             f"{total:,}", 100 * trainable / total)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input gradients, so it also works under frozen embeddings.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.train.compile:
        model.compile()  # in place: parameter names, saving and unwrapping stay as they are
    return model
