"""Parameter strategies train only what they should; saved results reload with plain peft / transformers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import chat_rows, write_jsonl
from test_train import run_config
from tunesmith.config import config_from_dict
from tunesmith.errors import ConfigError, ModelError
from tunesmith.model.load import load_model, resize_embeddings
from tunesmith.model.strategies import apply_strategy, parameter_counts, quantization_config
from tunesmith.model.trainable import load_trainable_state
from tunesmith.train.checkpoint import latest_checkpoint
from tunesmith.model.build import build_model
from tunesmith.model.run_tokenizer import build_tokenizer, ensure_pad_token
from tunesmith.train.run import train

NUM_LAYERS = 2  # the tiny models of conftest


def _load(model_dirs, family):
    return AutoModelForCausalLM.from_pretrained(model_dirs[family])


def _trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_full_trains_everything(model_dirs, family):
    model = apply_strategy(_load(model_dirs, family), "full")
    assert _trainable(model) == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("family,block", [("llama", "model.layers.1."), ("qwen2", "model.layers.1."),
                                          ("gpt2", "transformer.h.1.")])
def test_freeze_trains_only_the_last_block_and_named_modules(model_dirs, family, block):
    model = apply_strategy(_load(model_dirs, family), "freeze", freeze_last_n_layers=1, freeze_modules=["lm_head"])
    names = _trainable(model)
    assert names, "something must train"
    assert all(n.startswith(block) or n.startswith("lm_head") for n in names), names
    assert "lm_head.weight" in names
    block_params = [n for n, _ in model.named_parameters() if n.startswith(block)]
    assert set(block_params) <= set(names)
    trainable, total = parameter_counts(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in names) < total


def test_freeze_only_the_lm_head(model_dirs):
    model = apply_strategy(_load(model_dirs, "llama"), "freeze", freeze_modules=["lm_head"])
    assert _trainable(model) == ["lm_head.weight"]


def test_freeze_unknown_module_suggests_a_name(model_dirs):
    with pytest.raises(ConfigError, match="lm_heads.*did you mean 'lm_head'"):
        apply_strategy(_load(model_dirs, "llama"), "freeze", freeze_modules=["lm_heads"])


@pytest.mark.parametrize("family,targets", [
    ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("qwen2", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("gpt2", {"c_attn", "c_proj", "c_fc"}),
])
@pytest.mark.parametrize("name", ["lora", "dora"])
def test_adapters_train_only_adapter_weights(model_dirs, family, targets, name):
    model = apply_strategy(_load(model_dirs, family), name, lora_r=4)
    names = _trainable(model)
    allowed = ("lora_A", "lora_B") + (("lora_magnitude_vector",) if name == "dora" else ())
    assert names and all(any(a in n for a in allowed) for n in names), names
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in names if "lora_A" in n}
    assert adapted == targets
    base = _load(model_dirs, family)
    expected_modules = [n for n, _ in base.named_modules() if n.rsplit(".", 1)[-1] in targets]
    per_module = 2 if name == "lora" else 3
    assert len(names) == per_module * len(expected_modules)
    if name == "dora":
        assert any("lora_magnitude_vector" in n for n in names)


def test_qlora_quantises_the_base_to_4bit_and_trains_adapters(model_dirs):
    import bitsandbytes as bnb

    quant = quantization_config("nf4", True, torch.float32)
    model = load_model(str(model_dirs["llama"]), quantization_config=quant)
    model = apply_strategy(model, "qlora", lora_r=4)
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 7 * NUM_LAYERS
    assert linear4[0].weight.quant_state.nested, "double quantisation"
    assert linear4[0].weight.quant_type == "nf4"
    assert all("lora_" in n for n in _trainable(model))


def test_rslora_scales_by_alpha_over_sqrt_r(model_dirs):
    model = apply_strategy(_load(model_dirs, "llama"), "lora", lora_r=4, lora_alpha=8, rslora=True)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("strategy-data") / "chat.jsonl", chat_rows(12, seed=5))


def _trained_logits(cfg, batch):
    """Logits of the model as it was at the end of training: rebuilt and loaded from the last checkpoint."""
    tokenizer, added = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer, added)
    load_trainable_state(model, load_file(latest_checkpoint(
        __import__("pathlib").Path(cfg.train.output_dir) / "checkpoints") / "trainable.safetensors"))
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("strategy", ["lora", "dora", "full"])
def test_saved_result_reloads_with_plain_libraries_to_the_same_logits(model_dirs, data_file, tmp_path, family,
                                                                     strategy):
    """final/ loads with plain peft (adapters) or transformers (full): max logit difference < 1e-6 in fp32."""
    from peft import PeftModel

    cfg = config_from_dict(run_config(model_dirs[family], data_file, tmp_path / "run",
                                      strategy={"name": strategy}, train={"max_steps": 3, "lr": 1e-2}))
    train(cfg)
    final = tmp_path / "run" / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    batch = tokenizer(["What is 2 plus 3?", "It is 5."], return_tensors="pt", padding=True)
    if strategy == "full":
        reloaded = AutoModelForCausalLM.from_pretrained(final)
    else:
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dirs[family]), final)
    reloaded.eval()
    with torch.no_grad():
        got = reloaded(**batch).logits
    want = _trained_logits(cfg, batch)
    assert (got - want).abs().max().item() < 1e-6
    base = AutoModelForCausalLM.from_pretrained(model_dirs[family]).eval()
    with torch.no_grad():
        assert (base(**batch).logits - want).abs().max().item() > 1e-4, "training changed the model"


def test_qlora_adapter_reloads_on_a_4bit_base(model_dirs, data_file, tmp_path):
    from peft import PeftModel

    cfg = config_from_dict(run_config(model_dirs["llama"], data_file, tmp_path / "run",
                                      strategy={"name": "qlora", "quant": {"compute_dtype": "fp32"}},
                                      train={"max_steps": 2, "lr": 1e-2}))
    train(cfg)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    batch = tokenizer(["What is 2 plus 3?"], return_tensors="pt")
    base = load_model(str(model_dirs["llama"]), quantization_config=quantization_config("nf4", True, torch.float32))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "run" / "final").eval()
    with torch.no_grad():
        got = reloaded(**batch).logits
    diff = (got - _trained_logits(cfg, batch)).abs()  # (1, T, V)
    # The added tokens' output columns come from the base's new rows (the head is tied, and peft's trainable
    # tokens adapt the input side): training made them the mean row, plain transformers' resize draws them around
    # the mean with a 1e-5-scale covariance. Every column of the original vocabulary is exact.
    assert diff[..., : len(tokenizer)].max().item() < 1e-6 and diff.max().item() < 1e-4


def test_missing_pad_token_gets_a_dedicated_one(model_dirs):
    from tunesmith.demo.tiny import build_model as tiny_model, train_tokenizer
    from conftest import CORPUS

    tokenizer = train_tokenizer(CORPUS, vocab_size=300, pad=False)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    rows = model.get_input_embeddings().weight.shape[0]
    assert ensure_pad_token(tokenizer)
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id)
    resize_embeddings(model, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == rows + 1 == len(tokenizer)
    assert not ensure_pad_token(tokenizer), "idempotent"
    resize_embeddings(model, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == rows + 1, "no resize when the vocabulary fits"


def test_pickle_weights_are_refused_unless_allowed(model_dirs, tmp_path):
    model = _load(model_dirs, "llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pytorch_model.bin.*allow_pickle"):
        load_model(str(tmp_path))
    loaded = load_model(str(tmp_path), allow_pickle=True)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_added_template_tokens_train_with_adapters_and_reload(tmp_path, data_file):
    """A base tokenizer with neither pad nor chatml markers: the markers and a pad token are added, the
    embeddings grow, the new rows train through PEFT trainable tokens, and plain peft reloads the result
    onto the base resized to the saved tokenizer."""
    from peft import PeftModel

    from conftest import CORPUS
    from tunesmith.demo.tiny import build_model as tiny_model, save_tiny, train_tokenizer

    tokenizer = train_tokenizer(CORPUS, vocab_size=300, pad=False, extra_special_tokens=())
    base_dir = save_tiny(tmp_path / "base", tiny_model("llama", vocab_size=len(tokenizer)), tokenizer)
    cfg = config_from_dict(run_config(base_dir, data_file, tmp_path / "run", train={"max_steps": 3, "lr": 1e-2}))
    train(cfg)
    final = tmp_path / "run" / "final"
    saved = AutoTokenizer.from_pretrained(final)
    assert len(saved) == len(tokenizer) + 3  # <|im_start|>, <|im_end|>, <|pad|>
    new_ids = saved.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base.resize_token_embeddings(len(saved))
    reloaded = PeftModel.from_pretrained(base, final).eval()
    batch = saved(["<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"], return_tensors="pt")
    with torch.no_grad():
        got = reloaded(**batch).logits
        embedded = reloaded.get_input_embeddings()(torch.tensor(new_ids))
    diff = (got - _trained_logits(cfg, batch)).abs()  # (1, T, V)
    # The added tokens' output columns come from the base's new rows (the head is tied, and peft's trainable
    # tokens adapt the input side): training made them the mean row, plain transformers' resize draws them around
    # the mean with a 1e-5-scale covariance. Every column of the original vocabulary is exact.
    assert diff[..., : len(tokenizer)].max().item() < 1e-6 and diff.max().item() < 1e-4
    fresh = AutoModelForCausalLM.from_pretrained(base_dir)
    fresh.resize_token_embeddings(len(saved))
    assert not torch.allclose(embedded, fresh.get_input_embeddings()(torch.tensor(new_ids))), "new rows trained"
