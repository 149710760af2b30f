"""The light tokenizer of `prepare` (tunesmith/model/light_tokenizer.py) against transformers' tokenizer read from
the same files: the same ids, rendered templates, special tokens and vocabulary, the same prepared data and
cache fingerprint (so `train` finds what `prepare` wrote), on the tiny tokenizer and SmolLM2's; and where it
must not be used, it is not."""

from __future__ import annotations

import copy
import json

import pytest
from transformers import AutoTokenizer

from conftest import chat_rows, write_jsonl
from tunesmith.config import config_from_dict
from tunesmith.data.build import prepare_from_config
from tunesmith.data.cache import _tokenizer_digest
from tunesmith.data.templates import TEMPLATES, install_template
from tunesmith.model.light_tokenizer import LightTokenizer, load_light_tokenizer
from tunesmith.model.run_tokenizer import build_tokenizer, ensure_pad_token

TEXTS = [
    "Hello world, this is a small test.",
    "  leading spaces, trailing tabs\t\t and\nnew\n\nlines  ",
    "Ünïcödé: naïve café, 東京, emoji 🙂, Ελληνικά",
    "numbers 0 1 22 333 4444 3.14159 -7",
    "<|im_start|>user\ncontrol text inside<|im_end|> and <|pad|> too",
    "",
]
# A template of the tokenizer's own, using what transformers' sandbox offers: namespace, loop controls,
# tojson, raise_exception, the special tokens as variables.
OWN_TEMPLATE = (
    "{%- set ns = namespace(turns=0) -%}"
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] not in ['system', 'user', 'assistant'] -%}{{ raise_exception('bad role') }}{%- endif -%}"
    "{%- if m['role'] == 'system' and not loop.first -%}{%- continue -%}{%- endif -%}"
    "{%- set ns.turns = ns.turns + 1 -%}"
    "<|im_start|>{{ m['role'] }} {{ {'n': ns.turns} | tojson }}\n{{ m['content'] }}<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there"},
     {"role": "assistant", "content": "Hello! 🙂"}, {"role": "user", "content": "Bye"},
     {"role": "assistant", "content": "Bye.", "tool_calls": None}],
]


def _both(folder):
    return load_light_tokenizer(folder), AutoTokenizer.from_pretrained(folder)


def assert_same(light: LightTokenizer, full) -> None:
    """Everything the data pipeline reads from a tokenizer, equal."""
    for add in (True, False):
        assert light(TEXTS, add_special_tokens=add)["input_ids"] == full(TEXTS, add_special_tokens=add)["input_ids"]
        for text in TEXTS:
            assert light(text, add_special_tokens=add)["input_ids"] == full(text, add_special_tokens=add)["input_ids"]
            assert light(text, add_special_tokens=add, split_special_tokens=True)["input_ids"] == \
                full(text, add_special_tokens=add, split_special_tokens=True)["input_ids"]
    for conversation in CONVERSATIONS:
        for prompt in (False, True):
            assert light.apply_chat_template(conversation, add_generation_prompt=prompt) == \
                full.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
    assert light.all_special_tokens == full.all_special_tokens
    assert light.special_tokens_map == full.special_tokens_map
    for name in ("bos", "eos", "unk", "pad"):
        assert getattr(light, f"{name}_token") == getattr(full, f"{name}_token")
        assert getattr(light, f"{name}_token_id") == getattr(full, f"{name}_token_id")
    assert len(light) == len(full) and light.get_vocab() == full.get_vocab()
    assert light.added_tokens_decoder == full.added_tokens_decoder
    assert light.convert_tokens_to_ids(["<|im_end|>", "no-such-token"]) == \
        full.convert_tokens_to_ids(["<|im_end|>", "no-such-token"])
    assert light.backend_tokenizer.to_str() == full.backend_tokenizer.to_str()
    assert _tokenizer_digest(light) == _tokenizer_digest(full)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_tiny_tokenizer_with_each_built_in_template(tokenizer, tmp_path, template):
    tokenizer.save_pretrained(tmp_path)
    light, full = _both(tmp_path)
    assert isinstance(light, LightTokenizer)
    for tok in (light, full):
        install_template(tok, template)
        ensure_pad_token(tok)
    assert_same(light, full)


def test_padding_and_truncation_saved_with_the_tokenizer_are_not_applied(tokenizer, tmp_path):
    """A tokenizer saved after a padded, truncating call keeps both in tokenizer.json; transformers applies them
    only to calls that ask, and so does the light tokenizer; the cache key ignores them."""
    used = copy.deepcopy(tokenizer)
    used(["a", "a much longer text"], padding=True, truncation=True, max_length=4)
    used.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert saved["padding"] is not None and saved["truncation"] is not None
    light, full = _both(tmp_path)
    fresh = AutoTokenizer.from_pretrained(tmp_path)  # not called yet: its backend still pads and truncates
    assert fresh.backend_tokenizer.padding is not None
    for tok in (light, full):
        install_template(tok, "chatml")
    fresh.chat_template = full.chat_template
    assert_same(light, full)
    assert len(light("a much longer text")["input_ids"]) > 4  # not truncated
    assert _tokenizer_digest(fresh) == _tokenizer_digest(full) == _tokenizer_digest(light)


def test_tiny_tokenizer_with_its_own_template_and_a_token_added_later(tokenizer, tmp_path):
    """A template saved with the tokenizer (chat_template.jinja) rendered in the same sandbox, its
    `raise_exception` raising the same error; tokens added after loading land on the same ids."""
    import jinja2

    own = copy.deepcopy(tokenizer)
    own.chat_template = OWN_TEMPLATE
    own.save_pretrained(tmp_path)
    light, full = _both(tmp_path)
    assert light.chat_template == full.chat_template == OWN_TEMPLATE
    assert_same(light, full)
    for tok in (light, full):
        with pytest.raises(jinja2.exceptions.TemplateError, match="bad role"):
            tok.apply_chat_template([{"role": "tool", "content": "x"}])
        tok.add_tokens(["<|new|>"], special_tokens=True)
        tok.add_special_tokens({"pad_token": "<|other pad|>"})
    assert_same(light, full)


def test_smollm2_tokenizer_and_its_template(smollm2_dir):
    """SmolLM2-135M-Instruct: its own template (the default system prompt) and chatml."""
    light, full = _both(smollm2_dir)
    assert isinstance(light, LightTokenizer)
    assert_same(light, full)
    for tok in (light, full):
        install_template(tok, "chatml")
    assert_same(light, full)


def test_prepared_data_and_fingerprint_are_the_same_with_either_tokenizer(tokenizer, tmp_path):
    """`prepare` (light, its tokenizer sent to 2 worker processes) and `train` (transformers) build the same
    examples under the same cache key."""
    tokenizer.save_pretrained(tmp_path / "tok")
    for i in range(2):  # a file per worker
        write_jsonl(tmp_path / f"d{i}.jsonl", chat_rows(12, seed=i))
    cfg = config_from_dict({"model": {"name_or_path": str(tmp_path / "tok")},
                            "data": {"train": [str(tmp_path / "d*.jsonl")], "template": "chatml", "num_proc": 2,
                                     "cache_dir": str(tmp_path / "cache"), "split": {"validation": 0.25}},
                            "train": {"output_dir": str(tmp_path / "run")}})
    light, _ = build_tokenizer(cfg, light=True)
    full, _ = build_tokenizer(cfg)
    assert isinstance(light, LightTokenizer) and not isinstance(full, LightTokenizer)
    first = prepare_from_config(cfg, light)
    second = prepare_from_config(cfg, full)
    assert first.fingerprint == second.fingerprint
    assert (tmp_path / "cache" / first.fingerprint / "report.json").is_file()  # what the second run loaded
    for name in ("train", "validation"):
        a, b = first.splits[name], second.splits[name]
        assert len(a) == len(b) > 0
        assert [(e.input_ids, e.labels) for e in a] == [(e.input_ids, e.labels) for e in b]


@pytest.mark.parametrize("change", ["class", "add_bos_token", "no tokenizer.json", "named templates"])
def test_anything_transformers_would_read_differently_falls_back(tokenizer, tmp_path, change):
    tokenizer.save_pretrained(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if change == "class":
        config["tokenizer_class"] = "GemmaTokenizer"  # rebuilds its pipeline in code
    elif change == "add_bos_token":
        config["add_bos_token"] = True  # transformers rebuilds the post-processor
    elif change == "named templates":
        config["chat_template"] = [{"name": "default", "template": "{{ messages }}"}]
    else:
        (tmp_path / "tokenizer.json").unlink()
    config_file.write_text(json.dumps(config))
    assert load_light_tokenizer(tmp_path) is None
