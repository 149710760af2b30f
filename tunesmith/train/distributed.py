"""How the processes of a multi-process run share the model: DDP (accelerate's default), FSDP2 or DeepSpeed ZeRO.

FSDP2 is applied here with torch's `fully_shard`, not through accelerate's FSDP plugin: accelerate (1.15) turns
the plugin on only for accelerator devices; with `Accelerator(cpu=True)` it silently trains with DDP instead.
Sharding the model ourselves gives one code path on CPU (gloo) and GPU (NCCL), the one the tests run:

    every block named by `wrap` (default: the model's `_no_split_modules`, its decoder layer) is one FSDP unit,
    the root (embeddings, final norm, head; tied weights stay in one unit) is the last one.

The sharded model is never handed to `accelerator.prepare` (that would wrap it in DDP as well); only the optimizer
is. FSDP2 averages gradients over processes in its reduce-scatter, as DDP does, so the loop's loss scaling holds.

DeepSpeed goes through accelerate's `DeepSpeedPlugin`; its JSON config's "auto" values are filled from train.*
(`fill_deepspeed_auto`) the way the transformers Trainer fills them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from tunesmith.errors import ConfigError
from tunesmith.hardware import cpu_info

log = logging.getLogger(__name__)

DEEPSPEED_INSTALL = "pip install deepspeed (needs a CUDA GPU and its compiler toolchain)"


def build_accelerator(strategy: str, mixed_precision: str, ds_config: dict | None = None) -> Accelerator:
    """The run's Accelerator: on CPU with several processes it is told to use gloo (`cpu=True`); DeepSpeed gets
    its plugin (`ds_config`: the filled JSON config)."""
    plugin = deepspeed_plugin(ds_config) if strategy == "deepspeed" else None
    return Accelerator(cpu=_multi_cpu(), mixed_precision=cpu_mixed_precision(mixed_precision),
                       deepspeed_plugin=plugin)


def cpu_mixed_precision(mixed_precision: str) -> str:
    """`mixed_precision`, except bf16 on a CPU without bf16 instructions (AVX512-BF16, AMX-BF16): there torch
    emulates bf16 matrix multiplies, ~40x slower than fp32 ones on this project's 2-core AVX2 machines, so
    training falls back to fp32 and says so in one line. Unknown flags (not Linux) keep bf16."""
    if mixed_precision != "bf16" or torch.cuda.is_available() or cpu_info()["bf16"] is not False:
        return mixed_precision
    log.warning("train.mixed_precision=bf16: this CPU has neither AVX512-BF16 nor AMX-BF16 (emulated bf16 is "
                "slower than fp32); training in fp32")
    return "no"


def _multi_cpu() -> bool:
    """Several processes and no GPU: accelerate runs them on CPU over gloo only when told to."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` was sharded with FSDP2 (its parameters are DTensors split across processes)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def block_classes(model: nn.Module) -> list[str]:
    """The class names of the model's repeated blocks (`_no_split_modules` of the transformers model inside)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's base
    return list(getattr(inner, "_no_split_modules", None) or [])


def shard_model(model: nn.Module, wrap: list[str], reshard_after_forward: bool, mixed_precision: str,
                device: torch.device) -> nn.Module:
    """Shard `model` in place with FSDP2 over all processes of the default process group; returns it.

    Args:
        wrap: class names of the modules that become FSDP units ([]: the model's own blocks).
        reshard_after_forward: free a unit's gathered weights after its forward (ZeRO-3) or keep them until its
            backward (ZeRO-2-like: more memory, one all-gather fewer per unit).
        mixed_precision: "bf16" computes in bf16 and reduces gradients in fp32; "no" keeps fp32 throughout.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    names = set(wrap or block_classes(model))
    if not names:
        raise ConfigError("train.distributed.wrap: the model names no blocks to shard (no _no_split_modules); "
                          "list its decoder layer class, e.g. [LlamaDecoderLayer]")
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(f"train.distributed.wrap: no module of class {', '.join(sorted(names))} in the model "
                          f"({type(model).__name__})")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    model.to(device)
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the root unit: what no block holds
    log.info("fsdp: %d blocks (%s) and the root sharded over %d processes", len(blocks), ", ".join(sorted(names)),
             torch.distributed.get_world_size())
    return model


def prepare(accelerator: Accelerator, model: nn.Module, optimizer):
    """accelerate's `prepare` for the model and optimizer; a sharded model stays as it is (not wrapped in DDP)."""
    if is_sharded(model):
        return model, accelerator.prepare(optimizer)
    return accelerator.prepare(model, optimizer)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights gathered on the main process (on CPU; `{}` on the others). Every process must
    call it: the gathering is collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_weights(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on the main process where processes hold only parts of them (FSDP, ZeRO-3),
    else None (the model's own are whole). Every process must call it."""
    if is_sharded(model):
        return full_state_dict(model)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        return accelerator.get_state_dict(model)  # needs stage3_gather_16bit_weights_on_model_save
    return None


# ---------------------------------------------------------------------------------------------------
# DeepSpeed


def deepspeed_plugin(ds_config: dict):
    """accelerate's DeepSpeedPlugin for a filled DeepSpeed config.

    Raises:
        ConfigError when deepspeed is not installed (with the command that installs it).
    """
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError(f"train.distributed.strategy: deepspeed needs the deepspeed package, which is not "
                          f"installed; {DEEPSPEED_INSTALL}") from None
    from accelerate import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=ds_config)


def read_deepspeed_config(path: str) -> dict:
    """The JSON mapping at `path` (train.distributed.deepspeed_config), with errors that name the key."""
    key = "train.distributed.deepspeed_config"
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}: file not found: {path}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: {path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{key}: {path} must hold a JSON object, got {type(config).__name__}")
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ConfigError(f"{key}: remove the {section!r} section of {path}: tunesmith's own AdamW and schedule "
                              "(train.lr, train.betas, train.weight_decay, train.scheduler, train.warmup_*) drive "
                              "training, with DeepSpeed wrapping that optimizer (for ZeRO-Offload add "
                              '"zero_force_ds_cpu_optimizer": false)')
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{key}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return config


def fill_deepspeed_auto(config: dict, *, micro_batch_size: int, grad_accum: int, world_size: int,
                        max_grad_norm: float | None, mixed_precision: str) -> dict:
    """A copy of the DeepSpeed `config` with every "auto" replaced by the value tunesmith's config gives, and
    every explicit value that contradicts tunesmith's config refused (DeepSpeed would silently train with it).

    ZeRO's bucket sizes may stay "auto": accelerate sets them from the model's hidden size when it prepares it.

    Raises:
        ConfigError naming both keys on a contradiction, or the DeepSpeed key whose "auto" cannot be filled.
    """
    config = copy.deepcopy(config)
    clip = 0.0 if max_grad_norm is None else max_grad_norm  # DeepSpeed: 0 turns clipping off
    values = {
        ("train_micro_batch_size_per_gpu",): (micro_batch_size, "train.micro_batch_size"),
        ("gradient_accumulation_steps",): (grad_accum, "train.grad_accum"),
        ("train_batch_size",): (micro_batch_size * grad_accum * world_size,
                                "train.micro_batch_size x train.grad_accum x processes"),
        ("gradient_clipping",): (clip, "train.max_grad_norm"),
        ("bf16", "enabled"): (mixed_precision == "bf16", "train.mixed_precision"),
        ("fp16", "enabled"): (mixed_precision == "fp16", "train.mixed_precision"),
    }
    for path, (value, source) in values.items():
        _fill(config, path, value, source)
    left = [k for k in _auto_keys(config) if k not in HIDDEN_SIZE_KEYS]
    if left:
        raise ConfigError(f"train.distributed.deepspeed_config: tunesmith cannot fill \"auto\" for "
                          f"{', '.join(left)}; give explicit values")
    return config


HIDDEN_SIZE_KEYS = ("zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                    "zero_optimization.stage3_param_persistence_threshold")


def _fill(config: dict, path: tuple[str, ...], value: Any, source: str) -> None:
    """Set config[path] to `value` where it is "auto" (or, at the top level, absent); a different value is an error.
    Sections the config does not have stay absent (only `train_batch_size` and friends are always set)."""
    node = config
    for part in path[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    key, dotted = path[-1], ".".join(path)
    current = node.get(key, "auto" if len(path) == 1 else None)
    if current == "auto":
        node[key] = value
    elif current is not None and not _same(current, value):
        raise ConfigError(f"train.distributed.deepspeed_config: {dotted} is {current!r} but {source} gives "
                          f"{value!r}; set it to \"auto\" or make them agree")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1.0)
    return a == b


def _auto_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is still "auto"."""
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "auto" else []
