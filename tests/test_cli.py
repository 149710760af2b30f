"""The `tunesmith` console script: a user's mistake is one `error:` line on stderr and exit code 2.

The subprocess tests run the real entry point (`python -m tunesmith`), so nothing in-process (pytest's
capture, already imported modules) can hide a traceback or a stray line on stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.cli import main, one_line

GOOD_ROW = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


def write_config(tmp_path: Path, model: str, train_file: str) -> Path:
    """A small valid config: the given model and data, a chat template, one step into tmp_path/run."""
    text = (
        f"model:\n  name_or_path: {model}\n"
        f"data:\n  train: [{train_file}]\n  template: chatml\n  max_seq_len: 64\n"
        f"train:\n  output_dir: {tmp_path / 'run'}\n  max_steps: 1\n  micro_batch_size: 1\n"
        "tracking:\n  progress_bar: false\n"
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def assert_one_error_line(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit code 2, exactly one non-empty stderr line `error: ...` containing `expected`, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr + proc.stdout
    for text in expected:
        assert text in lines[0]
    return lines[0]


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# Failures before any model is loaded (fast: the CLI checks the config and paths before importing torch)


def test_unknown_key(tmp_path, data_file):
    """An unknown override names the dotted key and the closest valid one."""
    cfg = write_config(tmp_path, "org/model", data_file)
    line = assert_one_error_line(run_cli("train", cfg, "train.lrr=1e-4", cwd=tmp_path))
    assert line == "error: unknown config key 'train.lrr' (did you mean 'train.lr'?)"


def test_wrong_type(tmp_path, data_file):
    """A value of the wrong type names the key and the value."""
    cfg = write_config(tmp_path, "org/model", data_file)
    assert_one_error_line(run_cli("train", cfg, "train.epochs=two", cwd=tmp_path), "train.epochs", "'two'")


def test_missing_config_file(tmp_path):
    """A config path that does not exist is named."""
    assert_one_error_line(run_cli("train", tmp_path / "nope.yaml", cwd=tmp_path), "nope.yaml: config file not found")


def test_missing_data_file(tmp_path, model_dirs):
    """A data file that does not exist names its key and path."""
    cfg = write_config(tmp_path, model_dirs["llama"], tmp_path / "absent.jsonl")
    assert_one_error_line(run_cli("train", cfg, cwd=tmp_path), "data.train[0]:", "absent.jsonl: data file not found")


def test_missing_model_dir(tmp_path, data_file):
    """A local model directory that does not exist names model.name_or_path."""
    cfg = write_config(tmp_path, tmp_path / "no-model", data_file)
    assert_one_error_line(run_cli("train", cfg, cwd=tmp_path), "model.name_or_path: model directory not found")


def test_config_errors_do_not_import_torch(tmp_path):
    """A config mistake is reported before the (slow) training stack is imported."""
    code = ("import sys; from tunesmith.cli import main; "
            "rc = main(['train', 'missing.yaml']); print(rc, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["2", "False"], proc.stderr


# ------------------------------------------------------------------------------------------------
# Data errors (the model loads first, so these take a few seconds each)


def test_empty_dataset(tmp_path, model_dirs):
    """An empty data file is named, with no traceback."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cfg = write_config(tmp_path, model_dirs["llama"], empty)
    assert_one_error_line(run_cli("train", cfg, cwd=tmp_path), f"{empty}: no examples")


def test_malformed_jsonl_line(tmp_path, model_dirs):
    """A malformed row is reported as file:line with its problem, even with library warnings around."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GOOD_ROW) + "\n\n" + '{"messages": [}\n')
    cfg = write_config(tmp_path, model_dirs["llama"], bad)
    assert_one_error_line(run_cli("train", cfg, cwd=tmp_path), f"{bad}:3: invalid JSON")


# ------------------------------------------------------------------------------------------------
# In-process


def test_main_returns_2_with_one_line(tmp_path, capsys):
    """main() returns 2 and prints one `error:` line for a ConfigError from overrides."""
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'missing.yaml'}: config file not found\n"


def test_main_usage_error_returns_2(capsys):
    """A command-line usage error returns 2 (argparse's usage on stderr) instead of raising SystemExit."""
    assert main(["no-such-command"]) == 2
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err
    assert main(["train"]) == 2  # CONFIG is required


def test_main_help_returns_0(capsys):
    """`--help` prints usage and returns 0."""
    assert main(["--help"]) == 0
    assert "usage: tunesmith" in capsys.readouterr().out


def test_resume_flag_is_an_override(tmp_path, capsys):
    """--resume is applied as the override train.resume=true (seen in the error it causes on a bad file)."""
    path = tmp_path / "cfg.yaml"
    path.write_text("train: 5\n")
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err == "error: train: expected a mapping of keys, got int 5\n"
    assert main(["train", str(path), "--resume"]) == 2
    assert capsys.readouterr().err == "error: override 'train.resume=true': train is a value, not a section\n"


def test_one_line_joins_lines():
    """A multi-line message becomes one line; an empty one still says something."""
    assert one_line("a: bad\n  details\n\n") == "a: bad; details"
    assert one_line("") == "unknown error"
