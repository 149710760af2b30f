"""`tunesmith interpolate`: a LoRA update scaled towards the base (WiSE-FT), checked on logits against peft's own
scaling of the original adapter, and refused where a scaled B is not an interpolation."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer

from test_export import PROMPTS, _logits, make_adapter, reference_logits
from tunesmith.cli import main
from tunesmith.errors import ConfigError
from tunesmith.export.interpolate import interpolate_command


def scaled_reference(base_dir, adapter_dir, weight: float) -> torch.Tensor:
    """Base + the original adapter with peft's per-module scaling multiplied by `weight`."""
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.scaling = {k: v * weight for k, v in module.scaling.items()}
    return _logits(model, tokenizer, PROMPTS)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D weights stored (in, out)
def test_the_interpolated_adapter_is_the_update_times_the_weight(model_dirs, tokenizer, tmp_path, family):
    adapter = make_adapter(model_dirs[family], tokenizer, "lora", tmp_path / "adapter")
    record = interpolate_command(str(adapter), str(tmp_path / "half"), 0.4)
    got = reference_logits(model_dirs[family], tmp_path / "half" / "final")
    want = scaled_reference(model_dirs[family], adapter, 0.4)
    assert (got - want).abs().max().item() < 1e-5
    tuned, base = reference_logits(model_dirs[family], adapter), scaled_reference(model_dirs[family], adapter, 0.0)
    assert (got - tuned).abs().max().item() > 1e-3 and (got - base).abs().max().item() > 1e-3  # in between
    assert record["weight"] == 0.4 and record["scaled_tensors"] > 0 and record["kept"] == []
    assert json.loads((tmp_path / "half" / "interpolated.json").read_text()) == record


def test_weight_one_is_the_tuned_model_and_added_token_rows_are_kept(model_dirs, tokenizer, tmp_path):
    """Rows trained in full for added tokens have no base value: kept as trained, and listed."""
    from copy import deepcopy

    tok = deepcopy(tokenizer)
    tok.add_tokens(["<tool>"], special_tokens=True)
    adapter = make_adapter(model_dirs["llama"], tok, "lora", tmp_path / "adapter", new_tokens=["<tool>"])
    record = interpolate_command(str(adapter), str(tmp_path / "same"), 1.0)
    got = reference_logits(model_dirs["llama"], tmp_path / "same" / "final")
    assert (got - reference_logits(model_dirs["llama"], adapter)).abs().max().item() < 1e-6
    assert any(name.endswith("trainable_tokens_delta") for name in record["kept"])


def test_a_run_interpolated_from_the_command_line_keeps_its_config(model_dirs, tokenizer, tmp_path):
    run = tmp_path / "run"
    make_adapter(model_dirs["llama"], tokenizer, "lora", run / "final")
    (run / "config.yaml").write_text(f"model: {{name_or_path: {model_dirs['llama']}}}\ntrain: {{output_dir: {run}}}\n")
    assert main(["interpolate", str(run), "--weight", "0.5", "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.yaml").read_text() == (run / "config.yaml").read_text()
    assert (tmp_path / "out" / "final" / "adapter_config.json").is_file()


def test_refusals(model_dirs, tokenizer, tmp_path):
    dora = make_adapter(model_dirs["llama"], tokenizer, "dora", tmp_path / "dora")
    with pytest.raises(ConfigError, match="DoRA adapter"):
        interpolate_command(str(dora), str(tmp_path / "a"), 0.5)
    with pytest.raises(ConfigError, match="not a LoRA adapter"):
        interpolate_command(str(model_dirs["llama"]), str(tmp_path / "b"), 0.5)
    lora = make_adapter(model_dirs["llama"], tokenizer, "lora", tmp_path / "lora")
    for weight in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="must be a number above 0"):
            interpolate_command(str(lora), str(tmp_path / "c"), weight)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not an empty directory"):
        interpolate_command(str(lora), str(tmp_path / "full"), 0.5)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
