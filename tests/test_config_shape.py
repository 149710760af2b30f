"""The shape read from config.json alone (config_shape.shape_from_dict) against the meta-device count
(shape.model_shape), field by field, for every family it reads: class defaults, grouped-query attention, tied and
untied embeddings, biases, explicit head_dim, dtypes, a tokenizer larger than the embeddings; the packaged SmolLM2
and Gemma 3 270M configs; and the configs it leaves to the meta-device path."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

from tunesmith.train.estimate import config_shape
from tunesmith.train.estimate.config_shape import FAMILIES, shape_from_dict
from tunesmith.train.estimate.shape import model_shape

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "vocab_size": 128}
GPT2_SMALL = {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128, "n_positions": 32}
# Phi-3's default pad_token_id (32000) must lie inside the embeddings
FAMILY_SMALL = {f: SMALL for f in FAMILIES} | {"phi3": SMALL | {"pad_token_id": None}, "gpt2": GPT2_SMALL}

VARIANTS = {  # name -> changes to the small config, per family ("*": every family but GPT-2)
    "defaults": {},
    "gqa": {"num_key_value_heads": 2},
    "mha": {"num_key_value_heads": 4},
    "tied": {"tie_word_embeddings": True},
    "untied": {"tie_word_embeddings": False},
    "head_dim": {"head_dim": 32, "num_key_value_heads": 2},
    "bf16": {"dtype": "bfloat16"},
    "fp32": {"dtype": "float32"},
}
BIASES = {
    "llama": [{"attention_bias": True}, {"mlp_bias": True}, {"attention_bias": True, "mlp_bias": True}],
    "qwen3": [{"attention_bias": True}],
    "gemma": [{"attention_bias": True}],
    "gemma2": [{"attention_bias": True}],
    "gemma3_text": [{"attention_bias": True}],
}
GPT2_VARIANTS = [{}, {"n_inner": 96}, {"tie_word_embeddings": False}, {"dtype": "float16"},
                 {"n_positions": 48, "n_inner": 200, "dtype": "bfloat16"}]


def cases() -> list:
    out = []
    for family in FAMILIES:
        for name, changes in VARIANTS.items():
            if family == "phi3" and "head_dim" in changes:
                continue  # Phi3Config checks its rope against hidden_size // heads: head_dim is not its own field
            out.append(pytest.param(family, changes, id=f"{family}-{name}"))
        for i, changes in enumerate(BIASES.get(family, [])):
            out.append(pytest.param(family, changes, id=f"{family}-bias{i}"))
    return out + [pytest.param("gpt2", c, id=f"gpt2-{i}") for i, c in enumerate(GPT2_VARIANTS)]


def written(tmp_path: Path, config) -> dict:
    """The config.json `save_pretrained` writes for `config`, as a dict."""
    config.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize(("family", "changes"), cases())
def test_a_saved_config_reads_as_the_meta_device_model_counts(tmp_path, family, changes):
    """Written by save_pretrained, read back from disk; the tokenizer as large as the embeddings, or larger."""
    d = written(tmp_path, AutoConfig.for_model(family, **(FAMILY_SMALL[family] | changes)))
    config = AutoConfig.from_pretrained(tmp_path)
    for vocab in (None, 1000):
        assert shape_from_dict(d, vocab) == model_shape(config, vocab)


@pytest.mark.parametrize(("family", "changes"), cases())
def test_a_config_of_only_the_changed_values_takes_the_class_defaults(family, changes):
    """config.json may hold only what differs from the class's defaults: every other field is the class's."""
    d = {"model_type": family, **(FAMILY_SMALL[family] | changes)}
    assert shape_from_dict(d, 100) == model_shape(AutoConfig.for_model(**d), 100)


def test_gpt2_keeps_the_mlps_c_proj_in_place_of_the_attentions():
    """Both are named c_proj: the MLP's (inter -> hidden) wins, at the attention's place in the order."""
    shape = shape_from_dict({"model_type": "gpt2", **GPT2_SMALL})
    assert list(shape.block_linears.items()) == [("c_attn", (64, 192)), ("c_proj", (256, 64)), ("c_fc", (64, 256))]
    assert shape.other_params == 32 * 64 + 2 * 64


def test_gpt2_read_under_the_attribute_map_names():
    """hidden_size, num_hidden_layers, ... are GPT2Config's aliases of n_embd, n_layer, ..."""
    d = {"model_type": "gpt2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "max_position_embeddings": 32, "vocab_size": 128}
    assert shape_from_dict(d) == model_shape(AutoConfig.for_model(**d))


def test_an_older_torch_dtype_and_explicit_nulls():
    """torch_dtype (transformers 4's name for dtype); null head_dim and num_key_value_heads: derived as the class
    derives them."""
    d = {"model_type": "llama", **SMALL, "torch_dtype": "float16", "head_dim": None, "num_key_value_heads": None}
    shape = shape_from_dict(d)
    assert shape == model_shape(AutoConfig.for_model(**d))
    assert (shape.stored_bytes, shape.head_dim, shape.kv_heads) == (2, 16, 4)


def assert_reads_as_counted(folder: Path) -> None:
    """A real model's config.json: read here as the meta-device model counts it, with and without a larger
    tokenizer."""
    d = json.loads((folder / "config.json").read_text())
    config = AutoConfig.from_pretrained(folder)
    for vocab in (None, d["vocab_size"] + 7):
        shape = shape_from_dict(d, vocab)
        assert shape is not None and shape == model_shape(config, vocab)


@pytest.mark.slow
def test_smollm2s_config(smollm2_dir):
    """Llama, tied embeddings, 9 query heads over 3 key/value heads (the fixture converts it once, ~30 s)."""
    assert_reads_as_counted(smollm2_dir)


@pytest.mark.slow
def test_gemma3_270ms_config():
    """gemma3_text: q/k norms, four norms a block, head_dim 256 apart from hidden / heads. Converting its GGUF file
    takes ~90 s on 2 cores; the converted directory is removed after."""
    from tunesmith.errors import ModelError
    from tunesmith.model.sources import resolve_model_path

    try:
        folder = Path(resolve_model_path("gemma3-270m"))
    except ModelError as e:
        pytest.skip(f"gemma3-270m is not installed: {e}")
    try:
        assert_reads_as_counted(folder)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)  # the cache entry: source.json + the directory


@pytest.mark.parametrize("d", [
    pytest.param({"model_type": "bert", "hidden_size": 64}, id="unknown-type"),
    pytest.param({"hidden_size": 64}, id="no-type"),
    pytest.param({"model_type": "llama", **SMALL, "auto_map": {"AutoModelForCausalLM": "m.M"}}, id="auto_map"),
    pytest.param({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", **SMALL}}, id="multimodal"),
    pytest.param({"model_type": "gpt2", **GPT2_SMALL, "add_cross_attention": True}, id="gpt2-cross-attention"),
])
def test_configs_left_to_the_meta_device_path(d):
    assert shape_from_dict(d) is None


def test_the_module_imports_neither_torch_nor_transformers():
    """Its own imports: the standard library and ModelShape (torch and transformers take seconds to import)."""
    tree = ast.parse(Path(config_shape.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "dataclasses", "tunesmith.train.estimate.shape"}


def test_importing_it_loads_neither_torch_nor_transformers():
    """In a fresh interpreter, with the packages above it (tunesmith.train.estimate) imported on the way."""
    code = ("import sys, tunesmith.train.estimate.config_shape; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
