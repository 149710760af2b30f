"""The tokenizer as GGUF metadata (export/gguf_vocab.py): the pre-tokenizer is named as llama.cpp spells it (it
refuses a file with any other name), read from what the tokenizer.json pre-tokenizer does; the real SmolLM2's
export carries the tokenizer metadata that its original GGUF file (written by llama.cpp's converter) carries."""

from __future__ import annotations

import json
import logging

import pytest
from tokenizers import Regex, Tokenizer, models
from tokenizers import pre_tokenizers as pt

from conftest import CORPUS
from tunesmith.demo.tiny import train_tokenizer
from tunesmith.export.gguf_vocab import (GPT2_PATTERN, LLAMA3_PATTERN, LLAMA_CPP_PRE_TOKENIZERS, QWEN2_PATTERN,
                                         pre_tokenizer_name, tokenizer_vocab)


def spec(pre_tokenizer) -> dict:
    """tokenizer.json of a BPE tokenizer with this pre-tokenizer, as the tokenizers library writes it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    return json.loads(tok.to_str())


def split_then_bytes(pattern: str):
    """How Llama 3 and Qwen2 tokenizer.json files spell their pre-tokenizer: a Split, then ByteLevel without regex."""
    return pt.Sequence([pt.Split(Regex(pattern), behavior="isolated"),
                        pt.ByteLevel(add_prefix_space=False, use_regex=False)])


CASES = {
    "byte_level (GPT-2)": (pt.ByteLevel(add_prefix_space=False), False, "gpt-2"),
    "split GPT-2 regex": (split_then_bytes(GPT2_PATTERN), False, "gpt-2"),
    "digits + byte_level (SmolLM)": (pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(False)]), False,
                                     "smollm"),
    "digits + byte_level, clean spaces (StarCoder)": (
        pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(False)]), True, "starcoder"),
    "split Llama 3 regex": (split_then_bytes(LLAMA3_PATTERN), False, "llama-bpe"),
    "split Qwen2 regex": (split_then_bytes(QWEN2_PATTERN), False, "qwen2"),
}


@pytest.mark.parametrize("case", CASES)
def test_each_byte_level_pre_tokenizer_gets_llama_cpps_name(case, caplog):
    pre_tokenizer, clean_spaces, expected = CASES[case]
    with caplog.at_level(logging.WARNING, logger="tunesmith.export.gguf_vocab"):
        name = pre_tokenizer_name(spec(pre_tokenizer), "gpt2", clean_spaces)
    assert name == expected and name in LLAMA_CPP_PRE_TOKENIZERS
    assert not caplog.records, "an exact match: nothing to warn about"


def test_the_split_patterns_are_the_ones_transformers_writes():
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert QWEN2_PATTERN == PRETOKENIZE_REGEX
    assert GPT2_PATTERN not in (LLAMA3_PATTERN, QWEN2_PATTERN) and r"\p{N}{1,3}" in LLAMA3_PATTERN


@pytest.mark.parametrize("pre_tokenizer", [pt.Metaspace(), pt.WhitespaceSplit(),
                                           pt.Sequence([pt.Digits(individual_digits=True),
                                                        split_then_bytes(LLAMA3_PATTERN)])])
def test_a_pre_tokenizer_llama_cpp_lacks_says_default_and_warns(pre_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="tunesmith.export.gguf_vocab"):
        assert pre_tokenizer_name(spec(pre_tokenizer), "gpt2") == "default"
    assert "may tokenize differently" in caplog.text


def test_an_extra_split_keeps_its_family_with_a_warning(caplog):
    """The demo's tokenizer splits the space before a capital or digit off first; its vocabulary has no merge
    across that split, so llama.cpp's GPT-2 regex gives the same tokens."""
    tokenizer = train_tokenizer(CORPUS, vocab_size=400, bare_names=True)
    with caplog.at_level(logging.WARNING, logger="tunesmith.export.gguf_vocab"):
        assert tokenizer_vocab(tokenizer, len(tokenizer)).pre == "gpt-2"
    assert "more coarsely" in caplog.text


def test_sentencepiece_style_says_default_as_llama_cpps_converter_does(tokenizer):
    assert pre_tokenizer_name(spec(pt.Metaspace()), "llama") == "default"
    vocab = tokenizer_vocab(tokenizer, len(tokenizer) + 3)
    assert (vocab.model, vocab.pre) == ("gpt2", "gpt-2") and vocab.pre in LLAMA_CPP_PRE_TOKENIZERS


def _fields(path, keys) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {k: reader.fields[k].contents() for k in keys if k in reader.fields}


@pytest.mark.slow
def test_smollm2_exports_the_tokenizer_metadata_of_its_original_file(smollm2_dir, tmp_path):
    """The original is what llama.cpp's converter wrote for SmolLM2: tokenizer.ggml.pre "smollm", the same tokens,
    merges, special ids and chat template."""
    from tunesmith.export.command import export_command
    from tunesmith.model.sources import packaged_files

    out = export_command(str(smollm2_dir), str(tmp_path / "smollm2.gguf"), fmt="gguf", quant="q8_0")
    keys = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
            "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
            "tokenizer.chat_template"]
    ours, original = _fields(out, keys), _fields(packaged_files("smollm2-135m-instruct")[0], keys)
    assert ours["tokenizer.ggml.pre"] == original["tokenizer.ggml.pre"] == "smollm"
    for key in keys:
        assert ours[key] == original[key], key
