"""Bad input, generated: whatever a config, a data file or a conversation holds, tunesmith either accepts it or
raises one of its own errors (a TunesmithError subclass) with a message; no other exception escapes.

Property-based (hypothesis, derandomized so every run tries the same inputs; bounded example counts keep the file
in seconds), plus a hand-written malformed-file corpus that gives every data format and file type at least one
malformed case with its exact message (the corpus of tests/test_formats.py and tests/test_pipeline.py,
extended), and the safe-loading refusals (pickle, remote code).

    .venv/bin/python -m pytest tests/test_properties.py -q --hypothesis-show-statistics
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CORPUS
from tunesmith.config import Config, all_keys, check_paths, config_from_dict, load_config
from tunesmith.data.formats import FORMATS, iter_rows, load_rows
from tunesmith.data.templates import TEMPLATES, end_of_turn_marker, install_template, render
from tunesmith.data.tokenize import encode_chat, tokenize_rows
from tunesmith.demo.tiny import train_tokenizer
from tunesmith.errors import DataError, ModelError, TunesmithError
from tunesmith.eval.generate import prompt_ids

# Examples per property; TUNESMITH_PROPERTY_EXAMPLES=2000 explores further (see docs/RELIABILITY.md).
EXAMPLES = int(os.environ.get("TUNESMITH_PROPERTY_EXAMPLES", "150"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(PROPERTY, max_examples=max(1, EXAMPLES * 2 // 5))  # the slower properties (Parquet, tokenising)

KEYS = all_keys(Config)
SECTIONS = sorted({k.split(".")[0] for k in KEYS})
CONTROL = ["<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>", "{{", "}}", "{%",
           "%}", "\x00", "\ufdd0", "\ufdd1", "\r\n", "\u2028", "\ud7ff", "'", '"', "\\"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["", "auto", "lora", "nan", "1e-4", "-1", "chatml",
                                                           "~", "null", "yes", "[1", "{a: b}"]))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=10), st.sampled_from(CONTROL)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


def assert_own_error(exc: BaseException) -> None:
    """The only failure allowed: a TunesmithError with a message."""
    assert isinstance(exc, TunesmithError), f"{type(exc).__name__} escaped: {exc!r}"
    assert str(exc).strip(), "an error without a message"


def accepts_or_refuses(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the property under test
        assert_own_error(exc)
        return None


# ------------------------------------------------------------------ the config loader


def _leaf_value(key: str):
    return scalars | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=6), scalars, max_size=2)


@st.composite
def config_dicts(draw):
    """Mappings shaped like a config: real sections and keys (so values reach the typed builder), typos, random
    keys and values of every type, sections replaced by scalars."""
    raw: dict = {}
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=8)):
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[leaf] = draw(_leaf_value(key))
    if draw(st.booleans()):
        raw[draw(st.sampled_from(SECTIONS + ["", "x", "train.lr"]))] = draw(json_values)
    if draw(st.booleans()):
        section = raw.setdefault(draw(st.sampled_from(SECTIONS)), {})
        if isinstance(section, dict):
            section[draw(st.text(max_size=10))] = draw(json_values)
    return raw


@PROPERTY
@given(config_dicts())
def test_config_from_any_mapping_is_a_config_or_a_config_error(raw):
    """...and what is accepted can be used: e.g. its seed is one NumPy and torch accept."""
    cfg = accepts_or_refuses(config_from_dict, raw)
    assert cfg is None or isinstance(cfg, Config)
    if cfg is not None:
        assert 0 <= cfg.train.seed < 2**32


@PROPERTY
@given(st.one_of(st.text(max_size=200), st.builds(yaml.safe_dump, config_dicts()),
                 st.builds(lambda v: yaml.safe_dump(v), json_values)),
       st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(max_size=12)),
                          st.builds(lambda k, v: f"{k}={v}", st.sampled_from(SECTIONS), st.text(max_size=8)),
                          st.text(max_size=20)), max_size=4))
def test_load_config_from_any_yaml_and_overrides(text, overrides):
    """Any file content (valid YAML of any shape, or not YAML at all) and any overrides: a Config or a
    ConfigError naming the problem."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text, encoding="utf-8")
        cfg = accepts_or_refuses(load_config, path, overrides)
        if cfg is not None:
            assert isinstance(cfg, Config)
            accepts_or_refuses(check_paths, cfg)


@pytest.mark.parametrize("as_override", [False, True])
@pytest.mark.parametrize("opener", ["[", "{a: "])
@pytest.mark.parametrize("depth", [20, 600])
def test_deeply_nested_yaml_is_refused_not_a_crash(depth, opener, as_override):
    """YAML nested hundreds deep (PyYAML recurses several frames per level: ~300 levels exhaust the stack), in
    a file or in an override: a ConfigError (or, for an override of a list key, the text kept as written)."""
    closer = "]" if opener == "[" else "}"
    text = opener * depth + "1" + closer * depth
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text("{}" if as_override else f"train: {text}")
        accepts_or_refuses(load_config, path, [f"train.betas={text}"] if as_override else [])


@FEW
@given(st.binary(max_size=200))
def test_load_config_from_any_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_bytes(data)
        accepts_or_refuses(load_config, path)


# ------------------------------------------------------------------ every data format parser

records = st.dictionaries(
    st.sampled_from(["messages", "conversations", "instruction", "input", "output", "history", "system", "prompt",
                     "completion", "text", "label", "chosen", "rejected", "role", "content"]) | st.text(max_size=6),
    json_values | st.lists(st.fixed_dictionaries({}, optional={
        "role": st.sampled_from(["user", "assistant", "system", "gpt", "human", "tool", ""]) | json_values,
        "content": json_values, "from": json_values, "value": json_values}), max_size=3),
    max_size=5,
)


def _read_all(path: Path, fmt: str):
    return accepts_or_refuses(lambda: list(iter_rows(path, fmt)))


@PROPERTY
@given(st.lists(st.one_of(records.map(json.dumps), st.builds(json.dumps, json_values), st.text(max_size=30)),
                max_size=6),
       st.sampled_from(("auto",) + FORMATS))
def test_jsonl_lines_of_anything(lines, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
        _read_all(path, fmt)


SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".txt", ".md", ".parquet")


@PROPERTY
@given(st.one_of(st.binary(max_size=300), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))),
       st.sampled_from(SUFFIXES), st.sampled_from(("auto",) + FORMATS))
def test_any_bytes_in_any_file_type(data, suffix, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(data)
        _read_all(path, fmt)


@PROPERTY
@given(st.one_of(st.lists(records, max_size=5), st.dictionaries(st.text(max_size=6), st.lists(json_values, max_size=4),
                                                                   max_size=3), json_values),
       st.sampled_from(("auto",) + FORMATS))
def test_json_documents_of_anything(document, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.json"
        path.write_text(json.dumps(document, indent=1), encoding="utf-8")
        _read_all(path, fmt)


cells = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12) | st.sampled_from(
    ['"', '""', ",", "\t", "\n", "\r\n", "a,b", '"unterminated'])


@PROPERTY
@given(st.lists(st.sampled_from(["messages", "instruction", "output", "prompt", "completion", "text", "label",
                                 "chosen", "rejected", ""]) | st.text(max_size=5), min_size=1, max_size=4),
       st.lists(st.lists(cells, max_size=5), max_size=5), st.sampled_from([",", "\t"]),
       st.sampled_from(("auto",) + FORMATS))
def test_csv_and_tsv_tables_of_anything(header, rows, delimiter, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("data.csv" if delimiter == "," else "data.tsv")
        path.write_text("\n".join(delimiter.join(r) for r in [header] + rows), encoding="utf-8")
        _read_all(path, fmt)


def _tables(label):  # one type per column, as Parquet stores it
    return st.lists(st.fixed_dictionaries({"text": st.one_of(st.none(), st.text(max_size=10)),
                                           "label": st.one_of(st.none(), label)}), min_size=1, max_size=5)


@FEW
@given(_tables(st.integers(-3, 3)) | _tables(st.text(max_size=4)) | _tables(st.floats()),
       st.sampled_from(("auto",) + FORMATS))
def test_parquet_tables_of_odd_values(rows, fmt):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        _read_all(path, fmt)


# ------------------------------------------------------------------ the template renderer


@pytest.fixture(scope="module")
def templated() -> dict:
    base = train_tokenizer(CORPUS, vocab_size=300)
    tokenizers = {}
    for name in TEMPLATES:
        tok = copy.deepcopy(base)
        install_template(tok, name)
        tokenizers[name] = tok
    return tokenizers


contents = st.one_of(st.text(max_size=40), st.lists(st.sampled_from(CONTROL) | st.text(max_size=5), max_size=8)
                     .map("".join))
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                           "content": contents}), min_size=1, max_size=5)


@PROPERTY
@given(messages, st.sampled_from(sorted(TEMPLATES)), st.booleans())
def test_any_conversation_renders_and_tokenises_or_is_refused(templated, conversation, template, prompt):
    """Any roles in any order, any content (control tokens, Jinja syntax, surrogates, NULs): rendering,
    tokenising with masks and building an inference prompt give a result or a DataError."""
    tok = templated[template]
    text = accepts_or_refuses(render, tok, conversation, prompt)
    assert text is None or isinstance(text, str)
    accepts_or_refuses(encode_chat, tok, conversation)
    accepts_or_refuses(prompt_ids, tok, conversation)


jinja_pieces = st.sampled_from([
    "{{ messages }}", "{{ messages[0]['content'] }}", "{% for m in messages %}", "{% endfor %}", "{% if x %}",
    "{% endif %}", "{{ m['content'] }}", "{{ eos_token }}", "{{ 1 / 0 }}", "{{ messages + 1 }}", "{{ x.y.z }}",
    "{{ raise_exception('no') }}", "{{ messages[99] }}", "{{ 'a' * 3 }}", "{% set x = 1 %}", "{{", "}}", "{%",
    "%}", "{#", "#}", "<|im_end|>", "\n", "text", "{{ m.role | upper }}", "{{ add_generation_prompt }}",
    "{{ messages | tojson }}", "{% macro f() %}{% endmacro %}", "{{ range(10**9) | list }}", "{{ m['content'][1:] }}",
])


@PROPERTY
@given(st.lists(jinja_pieces, min_size=1, max_size=8).map("".join), messages)
def test_any_user_chat_template_renders_or_is_refused(templated, jinja, conversation):
    """A tokenizer's own template is code we did not write: broken syntax, exceptions, type errors and runaway
    loops in it become a DataError (or a ConfigError) naming the template, never a traceback."""
    tok = copy.deepcopy(templated["chatml"])
    tok.chat_template = jinja
    accepts_or_refuses(install_template, tok, None)
    accepts_or_refuses(end_of_turn_marker, tok)
    accepts_or_refuses(render, tok, conversation)
    accepts_or_refuses(encode_chat, tok, conversation)


@FEW
@given(st.lists(records.map(json.dumps), min_size=1, max_size=5), st.sampled_from(sorted(TEMPLATES)))
def test_rows_of_anything_through_tokenize_rows(templated, lines, template):
    """From file to examples: any records that parse as rows either tokenise or are refused with a DataError."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_text("\n".join(lines), encoding="utf-8")
        rows = accepts_or_refuses(load_rows, path)
        if rows:
            accepts_or_refuses(tokenize_rows, templated[template], rows, 64)


# ------------------------------------------------------------------ the malformed-file corpus, extended

# Cases the corpora of tests/test_formats.py (JSON Lines) and tests/test_pipeline.py (other readers) lack, so
# that every file type and every format has malformed cases: (file name, content, format, expected message
# after "<tmp>/").
MALFORMED = {
    "tsv_wrong_field_count": ("x.tsv", b"text\tlabel\nok\tpos\ta\tb\n", "auto",
                              "x.tsv:2: expected 2 fields (text, label), got 4"),
    "csv_header_only": ("x.csv", b"text,label\n", "auto", "x.csv: no examples (the file is empty)"),
    "ndjson_syntax": ("x.ndjson", b'{"text": "a"}\n{"text": \n', "auto",
                      "x.ndjson:2: invalid JSON: Expecting value (column 1)"),
    "jsonl_bom_inside": ("x.jsonl", b'\xef\xbb\xbf{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\n', "auto",
                         "x.jsonl:2: invalid JSON: Unexpected UTF-8 BOM"),
    "jsonl_nan_text": ("x.jsonl", b'{"text": NaN}\n', "auto", "x.jsonl:1: text: expected a string, got float"),
    "json_columns_not_lists": ("x.json", b'{"text": "abc"}', "auto",
                               "x.json: a JSON object must map column names to lists of values"),
    "json_columns_bad_cell": ("x.json", b'{"text": ["a", " "]}', "auto", "x.json:row 1: text: empty"),
    "json_unclosed_array": ("x.json", b'[{"text": "a"}', "auto",
                            "x.json:1: invalid JSON: expected ',' or ']' after item 0"),
    "json_two_arrays": ("x.json", b'[{"text": "a"}]\n[{"text": "b"}]', "auto",
                        "x.json:2: invalid JSON: extra data after the array"),
    "parquet_not_parquet": ("x.parquet", b"PAR1 not really", "auto", "x.parquet: not a readable Parquet file"),
    "md_bad_utf8": ("x.md", b"ok \xff", "auto", "x.md: invalid UTF-8 at byte 3"),
    "txt_empty": ("x.txt", b"", "auto", "x.txt: no examples (the file is empty)"),
    "classification_no_label": ("x.jsonl", b'{"text": "a"}\n', "classification", "x.jsonl:1: label: missing field"),
    "classification_bool_label": ("x.jsonl", b'{"text": "a", "label": true}\n', "auto",
                                  "x.jsonl:1: label: expected a string or an integer, got bool"),
    "completion_no_prompt": ("x.jsonl", b'{"completion": "a"}\n', "completion", "x.jsonl:1: prompt: missing field"),
    "completion_prompt_type": ("x.jsonl", b'{"prompt": 3, "completion": "a"}\n', "completion",
                               "x.jsonl:1: prompt: expected a string, got int"),
    "preference_empty_prompt": ("x.jsonl", b'{"prompt": [], "chosen": "a", "rejected": "b"}\n', "preference",
                                "x.jsonl:1: prompt: expected turns ending with the user's"),
    "preference_chosen_type": ("x.jsonl", b'{"prompt": "q", "chosen": 3, "rejected": "b"}\n', "preference",
                               "x.jsonl:1: chosen: expected a string, got int"),
    "unpaired_no_completion": ("x.jsonl", b'{"prompt": "q", "label": true}\n', "unpaired",
                               "x.jsonl:1: completion: missing field"),
    "unpaired_fractional_label": ("x.jsonl", b'{"prompt": "q", "completion": "a", "label": 0.5}\n', "unpaired",
                                  "x.jsonl:1: label: expected desirable yes/no (true/false, 1/0), got 0.5"),
    "alpaca_system_type": ("x.jsonl", b'{"instruction": "q", "output": "a", "system": 3}\n', "auto",
                           "x.jsonl:1: system: expected a string, got int"),
    "alpaca_history_not_list": ("x.jsonl", b'{"instruction": "q", "output": "a", "history": "x"}\n', "auto",
                                "x.jsonl:1: history: expected a list of [instruction, response] pairs"),
    "sharegpt_missing_value": ("x.jsonl", b'{"conversations": [{"from": "human"}]}\n', "auto",
                               "x.jsonl:1: conversations[0].content: missing field"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_file_corpus(tmp_path, name):
    filename, content, fmt, expected = MALFORMED[name]
    (tmp_path / filename).write_bytes(content)
    with pytest.raises(DataError) as info:
        load_rows(tmp_path / filename, fmt)
    assert str(info.value).startswith(f"{tmp_path}/{expected}"), str(info.value)


def test_malformed_parquet_column_and_saved_dataset(tmp_path):
    """Columnar sources name the row: a Parquet column of the wrong type, a saved DatasetDict without 'train',
    a folder without data files."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=f"^{tmp_path}/x.parquet:row 0: text: expected a string, got int$"):
        load_rows(tmp_path / "x.parquet")
    datasets.DatasetDict({"valid": datasets.Dataset.from_list([{"text": "a"}])}).save_to_disk(tmp_path / "saved")
    with pytest.raises(DataError, match=r"saved: a saved DatasetDict without a 'train' split \(has valid\)"):
        load_rows(tmp_path / "saved")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.xml").write_text("<a/>")
    with pytest.raises(DataError, match="folder: the folder holds no data files"):
        load_rows(tmp_path / "folder")


# ------------------------------------------------------------------ safe loading: nothing runs code unasked


CUSTOM_CODE = """
from pathlib import Path
Path(__file__).with_name("CODE_RAN").write_text("remote code ran")
from transformers import PretrainedConfig
class CustomConfig(PretrainedConfig):
    model_type = "tunesmith-custom"
"""


def _remote_code_dir(root: Path, model_dir: Path) -> Path:
    """A copy of a tiny model whose config asks for a custom class from a file in the directory."""
    import shutil

    target = root / "custom-model"
    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config.update(model_type="tunesmith-custom", auto_map={"AutoConfig": "custom.CustomConfig",
                                                           "AutoModelForCausalLM": "custom.CustomModel"})
    (target / "config.json").write_text(json.dumps(config))
    (target / "custom.py").write_text(CUSTOM_CODE)
    return target


def test_remote_code_is_refused_unless_trusted(model_dirs, tmp_path):
    """A model directory that ships its own Python: refused with a ModelError (no code runs) unless
    trust_remote_code is set, which the config leaves off by default."""
    from tunesmith.model.load import load_model

    target = _remote_code_dir(tmp_path, model_dirs["llama"])
    assert Config().model.trust_remote_code is False
    with pytest.raises(ModelError, match=f"cannot load a model from '{target}'.*contains custom code"):
        load_model(str(target))
    assert not (target / "CODE_RAN").exists(), "the directory's code never ran"


def test_train_refuses_remote_code_with_one_error_line(model_dirs, tmp_path, capsys):
    """The command: one `error:` line, exit 2, the model's code never imported."""
    from conftest import chat_rows, write_jsonl
    from test_train import run_config
    from tunesmith.cli import main

    target = _remote_code_dir(tmp_path, model_dirs["llama"])
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(run_config(target, data, tmp_path / "run")))
    assert main(["train", str(tmp_path / "config.yaml")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot load a model" in errors[0]
    assert not (target / "CODE_RAN").exists()


def test_a_checkpoint_with_a_pickled_payload_is_refused(tmp_path):
    """Checkpoint state is loaded with weights_only=True: an optimizer.pt that would run code when unpickled
    (even with a matching manifest, as an attacker would write it) is refused with a CheckpointError, and the
    code does not run."""
    import torch

    from tunesmith.model.trainable import verify
    from tunesmith.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {}, keep_last=1)
    torch.save({"state": {}, "param_groups": [], "payload": _Payload(tmp_path / "PICKLE_RAN")}, path / "optimizer.pt")
    manifest = json.loads((path / "manifest.json").read_text())
    from tunesmith.model.trainable import sha256

    manifest["files"]["optimizer.pt"] = sha256(path / "optimizer.pt")
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert verify(path) is None
    with pytest.raises(CheckpointError, match="optimizer.pt.*weights_only"):
        load_checkpoint(path, model, optimizer, scheduler)
    assert not (tmp_path / "PICKLE_RAN").exists()


class _Payload:
    """Unpickling this calls Path.write_text: what a malicious pickle does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "pickle ran"))
