"""Soft prompts through PEFT: prompt tuning and prefix tuning.

    prompt_tuning   n trained embedding vectors in front of the input (Lester et al. 2021, arXiv:2104.08691);
                    n x d parameters
    prefix_tuning   n trained key/value vectors in front of every layer's attention (Li & Liang 2021,
                    arXiv:2101.00190); n x 2 L d parameters (or an MLP that produces them, `prefix_projection`)

Both save and load in the PEFT format (`PeftModel.from_pretrained(base, path)`).

Prompt tuning lengthens the sequence the model sees, so a causal LM's logits come back (B, n + T, V). Every loss
and metric in tunesmith lines logits up with the input's labels, so `strip_virtual_tokens` cuts the n virtual
positions off the output of direct forward passes: logits are (B, T, V) as for any other strategy. PEFT's own
`generate` is untouched (it never goes through that forward).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

from tunesmith.errors import ConfigError

PROMPT_STRATEGIES = ("prompt_tuning", "prefix_tuning")


@dataclass(frozen=True)
class PromptSpec:
    """Soft-prompt sizes (plain values, from `strategy.prompt`)."""

    num_virtual_tokens: int = 20
    init_text: str | None = None  # prompt tuning: start from the embeddings of this text's tokens
    prefix_projection: bool = False
    projection_hidden_size: int = 512


def prompt_learning_model(model: nn.Module, name: str, spec: PromptSpec, task_type: str = "CAUSAL_LM",
                          tokenizer_path: str | None = None):
    """`model` frozen under a PEFT prompt-tuning or prefix-tuning adapter.

    Args:
        name: prompt_tuning or prefix_tuning.
        task_type: CAUSAL_LM, or SEQ_CLS (PEFT then trains the new classification head too).
        tokenizer_path: where the tokenizer for `spec.init_text` loads from (default: the model's path).
    """
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    if name == "prompt_tuning":
        init = {}
        if spec.init_text:
            init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": spec.init_text,
                    "tokenizer_name_or_path": tokenizer_path or model.name_or_path}
        config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=spec.num_virtual_tokens, **init)
    elif name == "prefix_tuning":
        if task_type == "SEQ_CLS":
            check_prefix_reaches(model)
        config = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=spec.num_virtual_tokens,
                                    prefix_projection=spec.prefix_projection,
                                    encoder_hidden_size=spec.projection_hidden_size)
    else:
        raise ValueError(f"not a soft-prompt strategy: {name!r}")
    peft_model = get_peft_model(model, config)
    if name == "prompt_tuning" and task_type == "CAUSAL_LM":
        strip_virtual_tokens(peft_model)
    return peft_model


def check_prefix_reaches(model: nn.Module) -> None:
    """Refuse prefix tuning of a classifier whose forward PEFT cannot hand the prefix to.

    PEFT gives a sequence classifier its prefix only when the model's (or its backbone's) `forward` declares a
    `past_key_values` argument; transformers 5.x renamed that argument `cache`, so PEFT stops at the first forward
    pass with "Model does not support past key values". Said here, before anything trains, with what to use.
    """
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    for module in (model, backbone):
        if module is not None and "past_key_values" in inspect.signature(module.forward).parameters:
            return
    import peft
    import transformers

    raise ConfigError(
        f"strategy.name: prefix_tuning cannot train a classification or reward head on {type(model).__name__}: "
        f"peft {peft.__version__} passes the prefix as `past_key_values`, which transformers "
        f"{transformers.__version__} names `cache`; use prompt_tuning, lora or head for this objective "
        "(prefix tuning of a causal LM works)")


def strip_virtual_tokens(peft_model) -> None:
    """Make a prompt-tuned causal LM's forward return logits for the input positions only: (B, T, V).

    Call it again on a model loaded with `PeftModel.from_pretrained` before computing losses with it.
    """
    num_virtual = peft_model.active_peft_config.num_virtual_tokens

    def cut(module, args, kwargs, output):
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs["inputs_embeds"]
        logits = getattr(output, "logits", None)
        if logits is not None and logits.dim() == 3 and logits.shape[1] == inputs.shape[1] + num_virtual:
            output.logits = logits[:, num_virtual:]
        return output

    peft_model.register_forward_hook(cut, with_kwargs=True)
