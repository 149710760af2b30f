"""Python logging for a run: the terminal (through tqdm, so bars stay intact) and `train.log`."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm.auto import tqdm

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _TqdmHandler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never crash the run
            self.handleError(record)


def quiet_third_party() -> None:
    """Keep the terminal for tunesmith's own progress: no per-file progress bars from transformers, and no
    notice from bitsandbytes about an optional CPU kernel that would have to be downloaded from a hub."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()  # per-table saving bars; the pipeline reports its own progress
    transformers.utils.logging.set_verbosity_warning()
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def close_logging() -> None:
    """Detach the run's `train.log` (a library caller's later output must not land in it)."""
    root = logging.getLogger("tunesmith")
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()


def setup_logging(run_dir: Path | None, level: str = "info") -> None:
    """Send the `tunesmith` loggers to the terminal and, when `run_dir` is given, to `run_dir/train.log`."""
    quiet_third_party()
    root = logging.getLogger("tunesmith")
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(file_handler)
    root.propagate = False
