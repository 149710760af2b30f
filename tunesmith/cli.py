"""Command line: `tunesmith <command> CONFIG [key.sub=value ...]`. Thin: parse, build, call."""

from __future__ import annotations

import argparse
import logging
import sys

from tunesmith.errors import TunesmithError


def _train(args: argparse.Namespace) -> int:
    from tunesmith.config import load_config
    from tunesmith.train.run import train

    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    train(load_config(args.config, overrides))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tunesmith.demo.run import run_demo

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

    demo = commands.add_parser("demo", help="the offline quickstart on the embedded synthetic world")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TunesmithError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("tunesmith").warning("interrupted")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
