"""Python logging for a run: the terminal (through tqdm, so bars stay intact) and `train.log`.

Two kinds of message reach these handlers:
    tunesmith's own     (loggers under "tunesmith")  what the user can act on: the terminal and train.log
    the libraries'      (transformers, peft, bitsandbytes, ... and Python warnings)  deprecations and load reports
                        the user cannot act on: train.log only, and the terminal too with `--verbose`
                        (TUNESMITH_VERBOSE=1)
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LIBRARIES = "tunesmith.libraries"  # the logger library records are re-emitted through
VERBOSE_ENV = "TUNESMITH_VERBOSE"


def verbose() -> bool:
    """Whether library messages also go to the terminal (`tunesmith --verbose ...` sets the variable, so the
    processes a launcher starts inherit it)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _is_library(record: logging.LogRecord) -> bool:
    return getattr(record, "library", False)


class _LibraryHandler(logging.Handler):
    """On the root logger: a record from any library (not under "tunesmith") goes on through `LIBRARIES`,
    marked, so train.log keeps it and the terminal shows it only when verbose."""

    def emit(self, record: logging.LogRecord) -> None:
        if _is_library(record) or record.name == "tunesmith" or record.name.startswith("tunesmith."):
            return  # already on its way (before `setup_logging`, "tunesmith" propagates to the root logger)
        record.library = True
        logging.getLogger(LIBRARIES).handle(record)


class _TqdmHandler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never crash the run
            self.handleError(record)


def quiet_third_party() -> None:
    """Keep the terminal for tunesmith's own progress: no per-file progress bars from transformers or datasets,
    and the libraries' log records (deprecations, load reports, bitsandbytes' notice about an optional CPU kernel
    on a hub) sent through `LIBRARIES`: to train.log, and to the terminal only when verbose.

    A library not imported yet is quieted when it is first imported (`_QuietOnImport`), not imported here: a
    command that never needs transformers (`prepare` with a light tokenizer) does not pay its ~0.6 s."""
    for name in QUIETED:
        if name in sys.modules:
            _quiet(name)
        elif not any(isinstance(f, _QuietOnImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _QuietOnImport())
    root = logging.getLogger()
    if not any(isinstance(h, _LibraryHandler) for h in root.handlers):
        root.addHandler(_LibraryHandler())


QUIETED = ("transformers", "datasets")


def _quiet(name: str) -> None:
    """One library's progress bars off and its records routed to the root logger (its own handler removed)."""
    module = sys.modules[name]
    if name == "transformers":
        module.utils.logging.disable_progress_bar()
        module.utils.logging.set_verbosity_warning()
    else:
        module.disable_progress_bars()  # per-table saving bars; the pipeline reports its own progress
    _route_to_root(logging.getLogger(name))


class _QuietOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when a QUIETED library is about to be imported, it wraps the loader so that the
    library is quieted (`_quiet`) as soon as its package has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in QUIETED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _quiet(fullname)

        spec.loader.exec_module = exec_module
        return spec


def _route_to_root(logger: logging.Logger) -> None:
    """Drop a library's own terminal handlers and let its records propagate (to `_LibraryHandler`)."""
    for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
        logger.removeHandler(handler)
    logger.propagate = True


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
    if not verbose():
        console.addFilter(lambda record: not _is_library(record))
    root.addHandler(console)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(file_handler)
    root.propagate = False
