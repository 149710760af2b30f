"""Command line: `tunesmith <command> CONFIG [key.sub=value ...]`. Thin: parse, build, call."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator

from tunesmith.errors import TunesmithError


def _train(args: argparse.Namespace) -> int:
    from tunesmith.config import check_paths, load_config

    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    check_paths(cfg)  # config and file errors come before the seconds spent importing torch
    if args.nproc > 1:
        return launch(args.nproc, ["train", args.config, *overrides])
    from tunesmith.train.run import train

    with warnings_to_log():
        train(cfg)
    return 0


def _estimate(args: argparse.Namespace) -> int:
    from tunesmith.config import check_paths, load_config

    cfg = load_config(args.config, list(args.overrides))
    check_paths(cfg)
    from tunesmith.train.estimate import estimate_command

    with warnings_to_log():
        estimate_command(cfg, measure=args.measure)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from tunesmith.config import check_paths, load_config

    cfg = load_config(args.config, list(args.overrides))
    check_paths(cfg)
    from tunesmith.data.prepare import prepare_command
    from tunesmith.model.run_tokenizer import build_tokenizer
    from tunesmith.track.logs import setup_logging

    setup_logging(None, cfg.tracking.log_level)
    with warnings_to_log():
        prepare_command(cfg, build_tokenizer(cfg, light=True)[0])
    return 0


def _tokenizer(args: argparse.Namespace) -> int:
    from tunesmith.model.tokenizer import tokenizer_command

    with warnings_to_log():
        tokenizer_command(args.inputs, args.output, vocab_size=args.vocab_size, chat_template=args.chat_template,
                          field=args.field, text_unit=args.text_unit)
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


def _merge(args: argparse.Namespace) -> int:
    from tunesmith.export.merge import merge_command
    from tunesmith.track.logs import setup_logging

    setup_logging(None, "warning")

    with warnings_to_log():
        merge_command(args.source, args.output, dtype=args.dtype, allow_pickle=args.allow_pickle, base=args.base,
                      max_shard_size=args.max_shard_size)
    return 0


def _interpolate(args: argparse.Namespace) -> int:
    from tunesmith.export.interpolate import interpolate_command
    from tunesmith.track.logs import setup_logging

    setup_logging(None)
    interpolate_command(args.source, args.output, args.weight)
    return 0


def _export(args: argparse.Namespace) -> int:
    from tunesmith.export.command import export_command
    from tunesmith.track.logs import setup_logging

    setup_logging(None, "warning")

    with warnings_to_log():
        export_command(args.model, args.output, fmt=args.format, quant=args.quant, max_shard_size=args.max_shard_size,
                       allow_pickle=args.allow_pickle, base=args.base)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from tunesmith.serve.chat import chat_command
    from tunesmith.track.logs import setup_logging

    setup_logging(None, "error")  # the terminal belongs to the conversation

    with warnings_to_log():
        return chat_command(args.model, system=args.system, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed, base=args.base)


def _serve(args: argparse.Namespace) -> int:
    from tunesmith.serve.server import serve_command
    from tunesmith.track.logs import setup_logging

    setup_logging(None, "warning")

    with warnings_to_log():
        return serve_command(args.model, host=args.host, port=args.port, api_key=args.api_key,
                             adapters=args.adapter, max_prompt_tokens=args.max_prompt_tokens,
                             max_tokens_limit=args.max_tokens_limit, max_batch_size=args.max_batch_size,
                             max_request_bytes=args.max_request_bytes, base=args.base,
                             adapter_dir=args.adapter_dir, max_queue=args.max_queue,
                             request_timeout=args.request_timeout, shutdown_grace=args.shutdown_grace,
                             threads=args.threads)


def _ui(args: argparse.Namespace) -> int:
    from tunesmith.ui.command import ui_command

    return ui_command(args.runs, host=args.host, port=args.port, allow_launch=args.allow_launch, token=args.token,
                      configs=args.configs)


def _compare_strategies(args: argparse.Namespace) -> int:
    from tunesmith.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    from tunesmith.compare import compare_command

    with warnings_to_log():
        compare_command(cfg, strategies=args.strategies, output=args.output)
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.real:
        from tunesmith.demo.real import DEFAULT_OUTPUT, run_real_demo

        with warnings_to_log():
            run_real_demo(args.output_dir or DEFAULT_OUTPUT, seed=args.seed, threads=args.threads)
        return 0
    from tunesmith.demo.run import run_demo

    with warnings_to_log():
        run_demo(args.output_dir or "runs/demo", seed=args.seed)
    return 0


def _env(args: argparse.Namespace) -> int:
    from tunesmith.envinfo import env_command

    env_command(as_json=args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune open causal language models.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show the libraries' warnings and load reports on the terminal (always in train.log)")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_training, _add_evaluation, _add_delivery, _add_studio):
        add(commands)
    return parser


def _add_training(commands) -> None:
    """train, estimate and prepare (the commands that read a training config), and tokenizer."""
    train = commands.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-4")
    train.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    train.add_argument("--nproc", type=int, default=1,
                       help="processes on this machine (one per GPU; on CPU, gloo): launched with torchrun")
    train.set_defaults(func=_train)

    estimate = commands.add_parser("estimate", help="predict peak memory and speed of a training config")
    estimate.add_argument("config", help="YAML config file")
    estimate.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    estimate.add_argument("--measure", action="store_true", help="also run a few steps and compare")
    estimate.set_defaults(func=_estimate)

    prepare = commands.add_parser("prepare", help="read, clean, split, tokenise and pack the data of a config")
    prepare.add_argument("config", help="YAML config file")
    prepare.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    prepare.set_defaults(func=_prepare)

    tokenizer = commands.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a corpus (for model.init)")
    tokenizer.add_argument("inputs", nargs="+", help="text files, JSONL (a text field), folders or globs")
    tokenizer.add_argument("--output", required=True, help="directory for the tokenizer (save_pretrained)")
    tokenizer.add_argument("--vocab-size", type=int, default=8000, help="tokens in all, specials included")
    tokenizer.add_argument("--chat-template", default=None, choices=["chatml", "llama3", "alpaca", "gemma"],
                           help="install this chat template and add its special tokens")
    tokenizer.add_argument("--field", default="text", help="the record field holding the text (default: text)")
    tokenizer.add_argument("--text-unit", default="file", choices=["file", "line"],
                           help="plain text files: one document per file or per line")
    tokenizer.set_defaults(func=_tokenizer)


def _add_evaluation(commands) -> None:
    """eval and report: measuring models and comparing runs."""
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


def _add_delivery(commands) -> None:
    """merge, export, chat, serve: using a tuned model."""
    merge = commands.add_parser("merge", help="merge a run's LoRA/DoRA/QLoRA adapter into its base model")
    merge.add_argument("source", help="a run directory (its final/) or an adapter directory")
    merge.add_argument("--output", required=True, help="directory for the merged model")
    merge.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    merge.add_argument("--allow-pickle", action="store_true", help="allow loading a base with pickle weights")
    merge.add_argument("--base", default=None, help="the adapter's base model, if it has moved since training")
    merge.add_argument("--max-shard-size", default="5GB", help="shard the safetensors above this size")
    merge.set_defaults(func=_merge)

    interpolate = commands.add_parser(
        "interpolate", help="move a run's LoRA update part of the way back to its base (WiSE-FT): less forgetting")
    interpolate.add_argument("source", help="a run directory (its final/) or a LoRA adapter directory")
    interpolate.add_argument("--weight", type=float, required=True,
                             help="share of the update kept: 1 is the tuned model, towards 0 the base")
    interpolate.add_argument("--output", required=True, help="a new run directory for the interpolated adapter")
    interpolate.set_defaults(func=_interpolate)

    export = commands.add_parser("export", help="export a model as a Hugging Face directory or a GGUF file")
    export.add_argument("model", help="a model directory (merged or full), or a run directory")
    export.add_argument("--output", required=True, help="directory (hf) or .gguf file (gguf)")
    export.add_argument("--format", default="hf", choices=["hf", "gguf"])
    export.add_argument("--quant", default="f16", choices=["f32", "f16", "q8_0"], help="GGUF tensor type")
    export.add_argument("--max-shard-size", default="5GB", help="hf: shard the safetensors above this size")
    export.add_argument("--allow-pickle", action="store_true", help="allow loading a base with pickle weights")
    export.add_argument("--base", default=None, help="an adapter's base model, if it has moved since training")
    export.set_defaults(func=_export)

    chat = commands.add_parser("chat", help="chat with a model in the terminal")
    chat.add_argument("model", help="a model directory, a run directory or an adapter directory")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--base", default=None, help="an adapter's base model, if it has moved since training")
    chat.set_defaults(func=_chat)

    serve = commands.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    serve.add_argument("model", help="a model directory, a run directory or an adapter directory")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require this key as a Bearer token "
                       "(default: the TUNESMITH_API_KEY environment variable, if set)")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                       help="serve a LoRA adapter (or run) directory on the same base under model name NAME "
                            "(repeatable; NAME: letters, digits, '.', '_', '-')")
    serve.add_argument("--adapter-dir", default=None, metavar="DIR",
                       help="serve every adapter folder in DIR under its folder's name (links leading outside DIR "
                            "are refused)")
    serve.add_argument("--max-prompt-tokens", type=int, default=4096)
    serve.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask")
    serve.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    serve.add_argument("--max-request-bytes", type=int, default=1_000_000, help="larger request bodies get 413")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="generations that may wait for the engine; a request that does not fit gets 429")
    serve.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                       help="a request not finished after this long gets 504 (queueing included)")
    serve.add_argument("--shutdown-grace", type=float, default=10.0, metavar="SECONDS",
                       help="on SIGTERM/SIGINT, time the running batch has to finish; queued requests get 503")
    serve.add_argument("--threads", type=int, default=None,
                       help="CPU threads for decoding (default: PyTorch's, one per core)")
    serve.add_argument("--base", default=None, help="an adapter's base model, if it has moved since training")
    serve.set_defaults(func=_serve)


def _add_studio(commands) -> None:
    """ui, compare-strategies, demo, env."""
    ui = commands.add_parser("ui", help="a local web studio over the run folders: runs, live curves, launch, chat")
    ui.add_argument("--runs", default="runs", help="the runs folder the studio reads and writes (default: runs)")
    ui.add_argument("--configs", default="configs", help="the recipes it may launch (default: configs)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only; others need --token)")
    ui.add_argument("--port", type=int, default=8765)
    ui.add_argument("--allow-launch", action="store_true",
                    help="allow starting and stopping commands from the page when bound beyond loopback")
    ui.add_argument("--token", default=None,
                    help="access token the page and API require (default: TUNESMITH_UI_TOKEN, if set)")
    ui.set_defaults(func=_ui)

    compare = commands.add_parser("compare-strategies",
                                  help="train the same task with each strategy and compare them in one table")
    compare.add_argument("config", help="YAML config file")
    compare.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    compare.add_argument("--strategies", nargs="+", default=None, help="subset to run (default: all)")
    compare.add_argument("--output", default=None, help="where the table and plot go (default: train.output_dir)")
    compare.set_defaults(func=_compare_strategies)

    demo = commands.add_parser("demo", help="the offline quickstart on the embedded synthetic world")
    demo.add_argument("--output-dir", default=None, help="default: runs/demo (runs/demo-real with --real)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--real", action="store_true",
                      help="the real-model quickstart: SmolLM2-135M-Instruct taught invented countries with LoRA, "
                           "evaluated before and after, exported to GGUF and run in llama.cpp")
    demo.add_argument("--threads", type=int, default=1,
                      help="--real: torch threads (default 1, the fastest on 2 cores that others share)")
    demo.set_defaults(func=_demo)

    env = commands.add_parser("env", help="versions, hardware, extras and llama.cpp: what a bug report needs")
    env.add_argument("--json", action="store_true", help="print one JSON object")
    env.set_defaults(func=_env)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (2 for a usage error or a TunesmithError)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage (or --help)
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
    if args.verbose:
        os.environ["TUNESMITH_VERBOSE"] = "1"  # read by track.logs; inherited by the processes a launcher starts
    try:
        if args.command != "env":  # `env` reports versions instead of refusing them
            from tunesmith.compat import check_versions

            check_versions()
        return args.func(args)
    except TunesmithError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("tunesmith").warning("interrupted")
        return 130


def launch(nproc: int, argv: list[str]) -> int:
    """Run `tunesmith ARGV` in `nproc` local processes with torchrun (accelerate reads its environment); for
    several machines, start torchrun (or `accelerate launch`) yourself, see the README."""
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "tunesmith", *argv]
    return subprocess.call(command)


@contextlib.contextmanager
def warnings_to_log() -> Iterator[None]:
    """Python warnings (e.g. a library's FutureWarning) go to the run's log as library records: the terminal
    shows them only with --verbose, so it carries what the user can act on."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        logging.getLogger("tunesmith.libraries").warning("%s: %s (%s:%d)", category.__name__, message, filename,
                                                         lineno, extra={"library": True})

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def one_line(message: str) -> str:
    """The message on one line: line breaks become '; ' (the contract is one `error:` line on stderr)."""
    return "; ".join(part.strip() for part in message.splitlines() if part.strip()) or "unknown error"


if __name__ == "__main__":
    raise SystemExit(main())
