"""Parameter strategies: which weights train.

    full    every parameter
    freeze  only the last N transformer blocks and/or named modules (e.g. only the LM head)
    lora    low-rank adapters through PEFT (rsLoRA option)
    dora    weight-decomposed LoRA through PEFT
    qlora   LoRA on a base quantised to 4 bit by bitsandbytes (NF4, double quantisation)
    head    only the task head: a new classification/regression head (SEQ_CLS), or the LM head (`heads`)
    prompt_tuning, prefix_tuning   trained virtual tokens through PEFT (`prompt_tuning`)
    reft    LoReFT interventions on hidden states at prompt positions (`reft`)

(`features`, a scikit-learn classifier on frozen features, trains no weights: `tunesmith.model.features`.)
"""

from __future__ import annotations

import difflib
import logging

import torch
from torch import nn

from transformers.pytorch_utils import Conv1D

from tunesmith.errors import ConfigError
from tunesmith.model.heads import head_module_names, train_only_head
from tunesmith.model.lora_fused import fuse_lora_forward
from tunesmith.model.prompt_tuning import PROMPT_STRATEGIES, PromptSpec, prompt_learning_model
from tunesmith.model.blocks import transformer_blocks
from tunesmith.model.reft import ReftSpec, apply_reft
from tunesmith.model.targets import ADAPTER_STRATEGIES, DEFAULT_TARGET_MODULES  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


def quantization_config(quant_type: str, double_quant: bool, compute_dtype: torch.dtype):
    """The bitsandbytes 4-bit config QLoRA loads the base with."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def apply_strategy(
    model: nn.Module,
    name: str,
    *,
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    target_modules: str | list[str] = "auto",
    rslora: bool = False,
    freeze_last_n_layers: int = 0,
    freeze_modules: tuple[str, ...] | list[str] = (),
    new_token_ids: tuple[int, ...] | list[int] = (),
    task_type: str = "CAUSAL_LM",
    prompt: PromptSpec = PromptSpec(),
    reft: ReftSpec = ReftSpec(),
) -> nn.Module:
    """Set `requires_grad` (or wrap with PEFT adapters) according to the strategy; returns the model to train.

    Args:
        name: full, freeze, lora, dora or qlora (for qlora the model was loaded in 4 bit).
        freeze_last_n_layers, freeze_modules: what trains under `freeze`; everything else is frozen.
        new_token_ids: ids of tokens added to the vocabulary for this run; with adapters their embedding
            rows are made trainable (PEFT trainable tokens), since a frozen random row cannot be learnt.
        task_type: "CAUSAL_LM", or "SEQ_CLS" for a model with a new task head (reward or classification): that
            head trains under every strategy (PEFT trains and saves it as a module to save).
        prompt: soft-prompt sizes for prompt_tuning / prefix_tuning.
        reft: interventions for reft.
    """
    if name == "full":
        model.requires_grad_(True)
        return model
    if name == "freeze":
        return _freeze(model, freeze_last_n_layers, list(freeze_modules) + _new_head(model, task_type))
    if name == "head":
        return train_only_head(model, task_type)
    if name in PROMPT_STRATEGIES:
        return prompt_learning_model(model, name, prompt, task_type)
    if name == "reft":
        return apply_reft(model, reft, train_modules=_new_head(model, task_type))
    if name == "features":
        raise ConfigError("strategy.name: features trains no weights in the loop; it runs through "
                          "tunesmith.model.features.train_features")
    if name not in ADAPTER_STRATEGIES:
        raise ConfigError(f"strategy.name: unknown strategy {name!r}")
    return _lora_model(model, name, lora_r, lora_alpha, lora_dropout, target_modules, rslora, new_token_ids,
                       task_type)


def _lora_model(model: nn.Module, name: str, lora_r: int, lora_alpha: float, lora_dropout: float,
                target_modules: str | list[str], rslora: bool, new_token_ids, task_type: str) -> nn.Module:
    """LoRA, DoRA or QLoRA adapters on `model` (see apply_strategy)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if name == "qlora":
        # Casts norms and embeddings to fp32 and lets gradients flow into the inputs of frozen layers.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=default_target_modules(model) if target_modules == "auto" else target_modules,
        use_rslora=rslora,
        use_dora=name == "dora",
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),  # GPT-2 stores weights transposed
        trainable_token_indices=list(new_token_ids) or None,
        task_type=task_type,
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(f"strategy.lora.target_modules: {exc}") from None
    fuse_lora_forward(model)  # the plain LoRA linears: the update added inside one matmul
    return model


def _new_head(model: nn.Module, task_type: str) -> list[str]:
    """The task head's module names for a SEQ_CLS model (a new head cannot stay at its random start)."""
    return head_module_names(model) if task_type == "SEQ_CLS" else []


def _freeze(model: nn.Module, last_n_layers: int, names: list[str]) -> nn.Module:
    model.requires_grad_(False)
    if last_n_layers:
        blocks = transformer_blocks(model)
        if last_n_layers > len(blocks):
            raise ConfigError(f"strategy.freeze.last_n_layers: {last_n_layers} but the model has {len(blocks)} blocks")
        for block in blocks[len(blocks) - last_n_layers :]:
            block.requires_grad_(True)
    modules = dict(model.named_modules())
    for wanted in names:
        matches = [m for n, m in modules.items() if n == wanted or n.endswith("." + wanted)]
        if not matches:
            close = difflib.get_close_matches(wanted, list(modules), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"strategy.freeze.modules: no module named {wanted!r}{hint}")
        for m in matches:
            m.requires_grad_(True)
    return model


def default_target_modules(model: nn.Module) -> str | list[str]:
    model_type = getattr(model.config, "model_type", "")
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type]
    log.info("no default LoRA targets for model type %r: using all linear layers", model_type)
    return "all-linear"


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as their unpacked size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
