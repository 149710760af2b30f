"""Command line: `tunesmith <command> CONFIG [key.sub=value ...]`. Thin: parse, build, call."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from typing import Iterator

from tunesmith.errors import TunesmithError


def _train(args: argparse.Namespace) -> int:
    from tunesmith.config import check_paths, load_config

    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    check_paths(cfg)  # config and file errors come before the seconds spent importing torch
    from tunesmith.train.run import train

    with warnings_to_log():
        train(cfg)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from tunesmith.config import check_paths, load_config

    cfg = load_config(args.config, list(args.overrides))
    check_paths(cfg)
    from tunesmith.data.prepare import prepare_command

    with warnings_to_log():
        prepare_command(cfg)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from tunesmith.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    from tunesmith.eval.command import eval_command

    with warnings_to_log():
        eval_command(cfg, compare=args.compare)
    return 0


def _report(args: argparse.Namespace) -> int:
    from tunesmith.track.report import report_command

    report_command(args.run_dirs, args.output)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tunesmith.demo.run import run_demo

    with warnings_to_log():
        run_demo(args.output_dir, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune open causal language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-4")
    train.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    train.set_defaults(func=_train)

    prepare = commands.add_parser("prepare", help="read, clean, split, tokenise and pack the data of a config")
    prepare.add_argument("config", help="YAML config file")
    prepare.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    prepare.set_defaults(func=_prepare)

    evaluate = commands.add_parser("eval", help="evaluate a model, checkpoint or adapter on the eval sets of a config")
    evaluate.add_argument("config", help="YAML config file")
    evaluate.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    evaluate.add_argument("--compare", nargs=2, metavar=("A", "B"),
                          help="evaluate two models (paths or hub ids) on the same sets and report the deltas")
    evaluate.set_defaults(func=_eval)

    report = commands.add_parser("report", help="compare finished runs in one table and one plot")
    report.add_argument("run_dirs", nargs="+", help="run directories (each with metrics.jsonl)")
    report.add_argument("--output", default=None, help="where to write comparison.md/.png (default: first run)")
    report.set_defaults(func=_report)

    demo = commands.add_parser("demo", help="the offline quickstart on the embedded synthetic world")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (2 for a usage error or a TunesmithError)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage (or --help)
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except TunesmithError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("tunesmith").warning("interrupted")
        return 130


@contextlib.contextmanager
def warnings_to_log() -> Iterator[None]:
    """Python warnings (e.g. a library's FutureWarning) go to the run's log, so stderr carries only errors."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        logging.getLogger("tunesmith").warning("%s: %s (%s:%d)", category.__name__, message, filename, lineno)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def one_line(message: str) -> str:
    """The message on one line: line breaks become '; ' (the contract is one `error:` line on stderr)."""
    return "; ".join(part.strip() for part in message.splitlines() if part.strip()) or "unknown error"


if __name__ == "__main__":
    raise SystemExit(main())
