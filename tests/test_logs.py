"""The terminal carries what the user can act on; the libraries' warnings and load reports go to train.log
(and to the terminal only with --verbose)."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest

from conftest import chat_rows, write_jsonl
from tunesmith.cli import warnings_to_log
from tunesmith.track.logs import VERBOSE_ENV, close_logging, setup_logging


def _emit_library_messages() -> None:
    logging.getLogger("transformers.modeling_utils").warning("a load report from transformers")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a kernel notice from bitsandbytes")
    with warnings_to_log():
        warnings.simplefilter("always")  # pytest's configuration ignores FutureWarning
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)
    logging.getLogger("tunesmith.train").warning("an actionable tunesmith warning")


@pytest.mark.parametrize("verbose", [False, True])
def test_library_messages_go_to_the_log_and_to_the_terminal_only_when_verbose(tmp_path, capfd, monkeypatch,
                                                                             verbose):
    monkeypatch.setenv(VERBOSE_ENV, "1" if verbose else "0")
    setup_logging(tmp_path, "info")
    try:
        _emit_library_messages()
    finally:
        close_logging()
    terminal = "".join(capfd.readouterr())
    log = (tmp_path / "train.log").read_text()
    library = ["a load report from transformers", "a kernel notice from bitsandbytes",
               "FutureWarning: `is_gradient_checkpointing` is deprecated"]
    assert all(line in log for line in library), log
    assert "an actionable tunesmith warning" in log and "an actionable tunesmith warning" in terminal
    assert all((line in terminal) == verbose for line in library), terminal


def test_a_training_run_prints_no_library_deprecation(tmp_path, model_dirs):
    """A LoRA run through the CLI: peft's `is_gradient_checkpointing` FutureWarning (transformers 5.25) is in
    train.log, and nothing on the terminal is a library's warning."""
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    run = tmp_path / "run"
    command = [sys.executable, "-m", "tunesmith", "train", "configs/sft_lora.yaml",
               f"model.name_or_path={model_dirs['llama']}", f"data.train={data}", f"train.output_dir={run}",
               "data.template=chatml", "data.max_seq_len=64", "data.split.validation=0", "train.epochs=1",
               "train.micro_batch_size=4", "train.grad_accum=1", f"data.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    terminal = done.stdout + done.stderr
    for word in ("Warning", "deprecated", "warn("):
        assert word not in terminal, terminal
    assert "done: final model in" in terminal
    assert "is_gradient_checkpointing" in (run / "train.log").read_text()


def test_a_library_imported_after_logging_is_set_up_is_quieted_on_import():
    """setup_logging imports neither transformers nor datasets (a light command never pays for them); each is
    quieted when first imported: no handler of its own, records on to the root logger, no progress bars."""
    code = (
        "import logging, sys\n"
        "from tunesmith.track.logs import setup_logging\n"
        "setup_logging(None)\n"
        "assert 'transformers' not in sys.modules and 'datasets' not in sys.modules\n"
        "import transformers, datasets\n"
        "for name in ('transformers', 'datasets'):\n"
        "    logger = logging.getLogger(name)\n"
        "    assert logger.propagate and not logger.handlers, (name, logger.handlers)\n"
        "assert not transformers.utils.logging.is_progress_bar_enabled()\n"
        "assert not datasets.is_progress_bar_enabled()\n"
        "print('quiet')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "quiet", done.stderr[-2000:]
