"""Typed configuration: one dataclass per component, loaded from YAML plus `key.sub=value` overrides.

Every key is checked before any work starts. An unknown key or a value of the wrong type raises
`ConfigError` naming the dotted key and, for unknown keys, the closest valid one.

    cfg = load_config("configs/sft_lora.yaml", ["train.lr=1e-4", "strategy.lora.r=16"])
"""

from tunesmith.config.checks import check, check_paths
from tunesmith.config.load import KEY_ALIASES, all_keys, build, config_from_dict, load_config, save_config, to_dict
from tunesmith.config.schema import (
    CleanConfig,
    Config,
    DataConfig,
    DataFormat,
    Dtype,
    EvalConfig,
    FreezeConfig,
    InstructConfig,
    LoraConfig,
    ModelConfig,
    ModelInitConfig,
    QualityConfig,
    QuantConfig,
    SourceConfig,
    Sources,
    SplitConfig,
    StrategyConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "KEY_ALIASES",
    "CleanConfig",
    "Config",
    "DataConfig",
    "DataFormat",
    "Dtype",
    "EvalConfig",
    "FreezeConfig",
    "InstructConfig",
    "LoraConfig",
    "ModelConfig",
    "ModelInitConfig",
    "QualityConfig",
    "QuantConfig",
    "SourceConfig",
    "Sources",
    "SplitConfig",
    "StrategyConfig",
    "TrackingConfig",
    "TrainConfig",
    "all_keys",
    "build",
    "check",
    "check_paths",
    "config_from_dict",
    "load_config",
    "save_config",
    "to_dict",
]
