"""train.distributed: config keys and checks, DeepSpeed JSON handling ("auto" filling, contradictions, the
missing package), FSDP block discovery. Nothing here starts processes (see test_fsdp.py for that)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.train.distributed import block_classes, deepspeed_plugin, fill_deepspeed_auto, read_deepspeed_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED_DS = sorted((REPO / "configs" / "deepspeed").glob("*.json"))
SIZES = dict(micro_batch_size=4, grad_accum=8, world_size=2, max_grad_norm=1.0, mixed_precision="bf16")


def test_distributed_defaults_to_ddp_and_takes_fsdp_keys():
    assert load_config(None).train.distributed.strategy == "ddp"
    d = load_config(None, ["train.distributed.strategy=fsdp", "train.distributed.wrap=[LlamaDecoderLayer]",
                           "train.distributed.reshard_after_forward=false"]).train.distributed
    assert (d.strategy, d.wrap, d.reshard_after_forward) == ("fsdp", ["LlamaDecoderLayer"], False)


@pytest.mark.parametrize("overrides, message", [
    (["train.distributed.strategy=zero"], "train.distributed.strategy"),
    (["train.distributed.stratgy=fsdp"], "did you mean 'train.distributed.strategy'"),
    (["train.distributed.strategy=deepspeed"], "train.distributed.deepspeed_config: strategy deepspeed needs"),
    (["train.distributed.deepspeed_config=ds.json"], "train.distributed.deepspeed_config: set, but"),
    (["train.distributed.wrap=[Block]"], "train.distributed.wrap: applies to strategy fsdp"),
    (["train.distributed.strategy=fsdp", "train.mixed_precision=fp16"], "train.mixed_precision: fp16"),
    (["train.distributed.strategy=fsdp", "strategy.name=qlora"], "strategy.name: qlora"),
    (["train.distributed.strategy=fsdp", "train.objective=grpo"], "train.distributed.strategy: fsdp with objective"),
    (["train.distributed.strategy=deepspeed", "train.distributed.deepspeed_config=ds.json", "train.save_every=5"],
     "train.save_every: checkpoints of deepspeed runs"),
    (["train.distributed.strategy=deepspeed", "train.distributed.deepspeed_config=ds.json", "train.resume=true"],
     "train.resume: checkpoints of deepspeed runs"),
    (["train.distributed.strategy=deepspeed", "train.distributed.deepspeed_config=ds.json",
      "train.on_nonfinite=skip"], "train.on_nonfinite"),
])
def test_distributed_checks_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", ".")):
        load_config(None, overrides)


@pytest.mark.parametrize("path", SHIPPED_DS, ids=lambda p: p.name)
def test_shipped_deepspeed_configs_fill_completely(path):
    """Every "auto" of the shipped ZeRO configs is filled from train.* (bucket sizes are left to accelerate,
    which sets them from the model's hidden size)."""
    raw = read_deepspeed_config(str(path))
    filled = fill_deepspeed_auto(raw, **SIZES)
    assert filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["gradient_accumulation_steps"] == 8
    assert filled["train_batch_size"] == 4 * 8 * 2
    assert filled["gradient_clipping"] == 1.0
    assert filled["bf16"] == {"enabled": True} and filled["fp16"] == {"enabled": False}
    assert filled["zero_optimization"]["stage"] == {"zero2.json": 2, "zero3.json": 3}[path.name]
    left = [k for k, v in filled["zero_optimization"].items() if v == "auto"]
    assert set(left) <= {"reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"}
    assert raw["train_batch_size"] == "auto"  # the file's mapping is not changed


def test_deepspeed_missing_keys_are_set_and_clipping_off_is_zero():
    filled = fill_deepspeed_auto({"zero_optimization": {"stage": 2}}, **{**SIZES, "max_grad_norm": None,
                                                                         "mixed_precision": "no"})
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"],
            filled["train_batch_size"], filled["gradient_clipping"]) == (4, 8, 64, 0.0)
    assert "bf16" not in filled  # sections the file does not have stay absent


@pytest.mark.parametrize("config, message", [
    ({"train_micro_batch_size_per_gpu": 2}, r"train_micro_batch_size_per_gpu is 2 but train.micro_batch_size gives 4"),
    ({"gradient_accumulation_steps": 1}, r"gradient_accumulation_steps is 1 but train.grad_accum gives 8"),
    ({"gradient_clipping": 0.5}, r"gradient_clipping is 0.5 but train.max_grad_norm gives 1.0"),
    ({"fp16": {"enabled": True}}, r"fp16.enabled is True but train.mixed_precision gives False"),
    ({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}, r"tunesmith cannot fill \"auto\" for "
                                                                    r"zero_optimization.sub_group_size"),
])
def test_deepspeed_contradictions_name_both_keys(config, message):
    with pytest.raises(ConfigError, match=r"train.distributed.deepspeed_config: " + message):
        fill_deepspeed_auto(config, **SIZES)


def test_deepspeed_explicit_values_that_agree_are_kept():
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8, "gradient_clipping": 1,
              "bf16": {"enabled": True}}
    assert fill_deepspeed_auto(config, **SIZES)["gradient_clipping"] == 1


@pytest.mark.parametrize("text, message", [
    (None, "file not found"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"zero_optimization": {"stage": 4}}', "zero_optimization.stage must be 0, 1, 2 or 3"),
    ('{"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}', "remove the 'optimizer' section"),
    ('{"scheduler": {"type": "WarmupLR"}}', "remove the 'scheduler' section"),
])
def test_deepspeed_config_file_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "ds.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=f"train.distributed.deepspeed_config: .*{message}"):
        read_deepspeed_config(str(path))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_missing_deepspeed_is_one_clear_error():
    with pytest.raises(ConfigError) as info:
        deepspeed_plugin(fill_deepspeed_auto(json.loads((REPO / "configs/deepspeed/zero2.json").read_text()), **SIZES))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("train.distributed.strategy: deepspeed needs the deepspeed package")
    assert "pip install deepspeed" in message


def test_block_classes_of_plain_and_peft_models(model_dirs):
    """FSDP's default units are the model's decoder layers, also under a PEFT wrapper."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    assert block_classes(model) == ["LlamaDecoderLayer"]
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert block_classes(peft_model) == ["LlamaDecoderLayer"]
