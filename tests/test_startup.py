"""Start-up cost of the light commands: what each one imports, seen from a fresh interpreter.

Importing torch costs ~1.5 s of CPU and the training stack (accelerate, peft, the objectives, the loop) ~5 s in
all, so a command imports only what it uses:

    --help, config errors, report, tokenizer   neither torch nor transformers
    prepare                                    neither (nor datasets), with a tokenizer `tokenizers` reads alone
                                               (the generic class: model/light_tokenizer.py); else transformers'
                                               AutoTokenizer (it imports torch); never the training stack
    estimate (without --measure)               neither, once this CPU's rate for the model's block is kept (the
                                               first estimate times a block with torch); never the training stack
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import chat_rows, write_jsonl

TORCH = ("torch", "transformers")
TRAINING = ("tunesmith.train.run", "tunesmith.train.loop", "tunesmith.train.checkpoint", "peft")
MARK = "IMPORTED "


def run_fresh(code: str, cwd: Path) -> tuple[int | None, set[str], str]:
    """Run `code` in a new interpreter; returns the value it leaves in `rc`, the modules it imported and its
    stderr."""
    probe = (f"rc = None\n{code}\nimport json, sys\n"
             f"print({MARK!r} + json.dumps({{'rc': rc, 'modules': sorted(sys.modules)}}))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    assert lines, f"no result (exit {done.returncode}): {done.stderr[-2000:]}"
    result = json.loads(lines[-1][len(MARK):])
    return result["rc"], set(result["modules"]), done.stderr


def run_cli(argv: list[str], cwd: Path) -> tuple[int, set[str], str]:
    return run_fresh(f"from tunesmith.cli import main\nrc = main({argv!r})", cwd)


def loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """The packages of `names` that were imported (a package counts when any of its modules was)."""
    return [n for n in names if any(m == n or m.startswith(n + ".") for m in modules)]


@pytest.mark.parametrize("module, forbidden", [
    ("tunesmith.cli", TORCH + TRAINING),
    ("tunesmith.config", TORCH + TRAINING),
    ("tunesmith.track.report", TORCH + TRAINING),
    ("tunesmith.model.tokenizer", ("torch",) + TRAINING),
    ("tunesmith.data.prepare", TORCH + TRAINING + ("datasketch",)),
    ("tunesmith.envinfo", TORCH + TRAINING),
    ("tunesmith.train.estimate", TRAINING),
])
def test_light_modules_import_light(module, forbidden, tmp_path):
    assert loaded(run_fresh(f"import {module}", tmp_path)[1], forbidden) == []


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["env", "--help"]])
def test_help_imports_no_torch(argv, tmp_path):
    rc, modules, _ = run_cli(argv, tmp_path)
    assert rc == 0 and loaded(modules, TORCH + TRAINING) == []


@pytest.mark.parametrize("command", ["train", "estimate", "prepare", "eval", "compare-strategies"])
def test_config_error_imports_no_torch(command, tmp_path):
    """A config error is reported before anything heavy is imported, whatever the command."""
    (tmp_path / "cfg.yaml").write_text("train:\n  mixed_precision: no\n")
    rc, modules, err = run_cli([command, "cfg.yaml", "train.mixed_precision=nope"], tmp_path)
    assert rc == 2 and "error: train.mixed_precision: 'nope' is not one of" in err
    assert loaded(modules, TORCH + TRAINING) == []


def test_report_imports_no_torch(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "metrics.jsonl", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    rc, modules, err = run_cli(["report", "run"], tmp_path)
    assert rc == 0, err
    assert loaded(modules, TORCH + TRAINING + ("datasets",)) == []


def test_tokenizer_command_imports_no_torch(tmp_path):
    write_jsonl(tmp_path / "corpus.jsonl", [{"text": f"number {i} squared is {i * i}."} for i in range(50)])
    rc, modules, err = run_cli(["tokenizer", "corpus.jsonl", "--output", "tok", "--vocab-size", "300"], tmp_path)
    assert rc == 0, err
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert loaded(modules, ("torch",) + TRAINING) == []


def test_prepare_imports_no_training_stack(tmp_path, tokenizer):
    """prepare reads the tokenizer through `tokenizers` (the light tokenizer: no torch, no transformers), writes
    its tables with pyarrow (no `datasets`: data/arrow.py) and plots without pyplot, and imports nothing of
    training; near-dedup's datasketch (and scipy) only when near-dedup is on."""
    tokenizer.save_pretrained(tmp_path / "tok")
    write_jsonl(tmp_path / "d.jsonl", chat_rows(6))
    (tmp_path / "cfg.yaml").write_text("model: {name_or_path: tok}\ndata: {train: [d.jsonl], template: chatml}\n"
                                       "train: {output_dir: run}\n")
    rc, modules, err = run_cli(["prepare", "cfg.yaml"], tmp_path)
    assert rc == 0, err
    assert (tmp_path / "run" / "data" / "data_report.json").is_file()
    assert loaded(modules, TORCH + ("tunesmith.train", "tunesmith.objectives", "peft", "accelerate",
                                    "datasketch", "datasets", "matplotlib.pyplot")) == []


@pytest.mark.parametrize("model", ["checkpoint", "init"])
def test_estimate_reads_files_only_once_the_cpu_rate_is_kept(tmp_path, model_dirs, model):
    """The first estimate on a machine times one of the model's blocks (torch, transformers) and keeps the rate;
    the next one, on data `prepare` wrote, reads files only: the tokenizer through `tokenizers`, config.json's
    fields (or model.init's), the Arrow tables, the kept rate."""
    write_jsonl(tmp_path / "d.jsonl", chat_rows(6))
    source = (f"{{name_or_path: {model_dirs['llama']}}}" if model == "checkpoint" else
              f"{{tokenizer: {model_dirs['llama']}, init: {{family: qwen2, hidden_size: 32, num_layers: 2}}}}\n"
              "strategy: {name: full}")
    (tmp_path / "cfg.yaml").write_text(f"model: {source}\ndata: {{train: [d.jsonl], template: chatml}}\n"
                                       "train: {output_dir: run}\n")
    cache = f"import os\nos.environ['TUNESMITH_CACHE'] = {str(tmp_path / 'cache')!r}\n"
    assert run_fresh(cache + "from tunesmith.cli import main\nrc = main(['prepare', 'cfg.yaml'])", tmp_path)[0] == 0
    first = run_fresh(cache + "from tunesmith.cli import main\nrc = main(['estimate', 'cfg.yaml'])", tmp_path)
    assert first[0] == 0, first[2]
    assert loaded(first[1], TRAINING) == [] and loaded(first[1], TORCH) == list(TORCH)
    rc, modules, err = run_fresh(cache + "from tunesmith.cli import main\nrc = main(['estimate', 'cfg.yaml'])", tmp_path)
    assert rc == 0, err
    assert loaded(modules, TORCH + TRAINING + ("datasets",)) == []
    report = json.loads((tmp_path / "run" / "estimate.json").read_text())
    assert report["plan"]["source"] == "prepared data"
    (kept,) = json.loads((tmp_path / "cache" / "cpu_rates.json").read_text()).values()
    assert report["device_flops"] == kept["flops"]
