"""`tunesmith compare-strategies CONFIG`: the same task under each parameter strategy, side by side.

    for each strategy: the config with strategy.name set (and train.output_dir = OUTPUT/<strategy>)
        -> `tunesmith train` (or the feature classifier's fit) in a fresh process
        -> trainable parameters, peak memory, seconds per optimizer step, the task metric on held-out data
    -> comparison.md / comparison.json (one table) + comparison.png (metric vs trainable parameters)

A strategy may carry its own overrides, since methods differ in the learning rate they want (soft prompts and
ReFT train at rates that would wreck full fine-tuning): `reft:train.lr=1e-2,strategy.reft.rank=2`.

The task metric: for `train.objective=classify`, accuracy on the test split (else validation); otherwise the
first metric of the first eval set in `eval.sets` (e.g. exact match of generated answers), scored on the saved
`final/` reloaded from disk, so a strategy whose save or load is broken cannot score.

Peak memory is measured per strategy in its own process: on CUDA `torch.cuda.max_memory_allocated` (tensors
only), on CPU the peak resident set size of the process (VmHWM) minus its size before the model loaded. On CPU,
tracemalloc would miss it (torch allocates outside Python's allocator), and in a shared process freed memory
kept by the C allocator would hide later strategies' peaks; hence a process each.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import multiprocessing
import traceback
from pathlib import Path
from typing import Sequence

import torch

from tunesmith.config import Config
from tunesmith.config.objectives import OBJECTIVES
from tunesmith.errors import ConfigError

log = logging.getLogger(__name__)

STRATEGIES = ("features", "head", "freeze", "prompt_tuning", "prefix_tuning", "reft", "lora", "dora", "qlora", "full")
CLASSIFY_ONLY = ("features",)


def compare_command(cfg: Config, strategies: Sequence[str] | None = None, output: str | None = None,
                    isolate: bool = True) -> list[dict]:
    """Train `cfg`'s task with each strategy and write the comparison; returns its rows.

    Args:
        strategies: names from STRATEGIES, each optionally with overrides, `name:key=value,key=value` (None:
            every one that fits the task; qlora only with CUDA).
        output: directory for the runs (one folder each) and the comparison (None: train.output_dir).
        isolate: run each strategy in a fresh process (true peak memory); False runs them here (tests).
    """
    specs = [parse_strategy(s) for s in strategies] if strategies else [
        (n, []) for n in default_strategies(cfg.train.objective)]
    _check_names([name for name, _ in specs], cfg.train.objective)
    out = Path(output or cfg.train.output_dir)
    dirs = _run_dirs(specs)
    taken = [d for d in dirs if (out / d).exists()]
    if taken:
        raise ConfigError(f"--output: {out} already holds runs for {', '.join(taken)}; choose another directory")
    variants = [strategy_variant(cfg, name, out / d, overrides) for (name, overrides), d in zip(specs, dirs)]
    rows = []
    for (name, overrides), variant in zip(specs, variants):
        log.info("compare-strategies: %s %s-> %s", name, " ".join(overrides) + " " if overrides else "",
                 variant.train.output_dir)
        row = _run_isolated(variant, name) if isolate else run_strategy(variant, name)
        rows.append({**row, "overrides": overrides})
    write_comparison(rows, out, _task_name(cfg))
    log.info("wrote %s, %s and %s", out / "comparison.md", out / "comparison.json", out / "comparison.png")
    return rows


def parse_strategy(spec: str) -> tuple[str, list[str]]:
    """"reft:train.lr=1e-2,strategy.reft.rank=2" -> ("reft", ["train.lr=1e-2", "strategy.reft.rank=2"]); a comma
    starts a new override only where `key=` follows, so list values ([a, b]) keep theirs."""
    import re

    name, _, rest = spec.partition(":")
    return name.strip(), [o.strip() for o in re.split(r",(?=\s*[\w.]+=)", rest) if o.strip()]


def _run_dirs(specs: list[tuple[str, list[str]]]) -> list[str]:
    """A directory name per run: the strategy, numbered when it appears more than once."""
    counts = {name: sum(n == name for n, _ in specs) for name, _ in specs}
    seen: dict[str, int] = {}
    dirs = []
    for name, _ in specs:
        seen[name] = seen.get(name, 0) + 1
        dirs.append(name if counts[name] == 1 else f"{name}-{seen[name]}")
    return dirs


def default_strategies(objective: str) -> list[str]:
    names = [n for n in STRATEGIES if _classifies(objective) or n not in CLASSIFY_ONLY]
    return names if torch.cuda.is_available() else [n for n in names if n != "qlora"]


def _check_names(names: Sequence[str], objective: str) -> None:
    for name in names:
        if name not in STRATEGIES:
            import difflib

            close = difflib.get_close_matches(name, STRATEGIES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (choose from {', '.join(STRATEGIES)})"
            raise ConfigError(f"--strategies: unknown strategy {name!r}{hint}")
        if name in CLASSIFY_ONLY and not _classifies(objective):
            raise ConfigError(f"--strategies: {name} needs text + label data and train.objective=classify")


def strategy_variant(cfg: Config, name: str, output_dir: Path, overrides: Sequence[str] = ()) -> Config:
    """`cfg` with strategy `name`, its own output directory, its `overrides` (key=value), and what the strategy
    needs to be comparable: freeze trains the last block unless the config says what to train."""
    variant = _overridden(cfg, overrides) if overrides else copy.deepcopy(cfg)
    variant.strategy.name = name
    variant.train.output_dir = str(output_dir)
    variant.train.resume = False
    if name == "freeze" and not (variant.strategy.freeze.last_n_layers or variant.strategy.freeze.modules):
        variant.strategy.freeze.last_n_layers = 1
    if name == "qlora" and not torch.cuda.is_available():
        log.warning("compare-strategies: qlora on CPU (bitsandbytes' CPU kernels are slow)")
    return variant


def _overridden(cfg: Config, overrides: Sequence[str]) -> Config:
    """`cfg` with `key.sub=value` overrides applied and checked, as on the command line."""
    import tempfile

    from tunesmith.config import load_config, save_config

    with tempfile.TemporaryDirectory() as tmp:
        save_config(cfg, Path(tmp) / "config.yaml")
        return load_config(Path(tmp) / "config.yaml", list(overrides))


# ---------------------------------------------------------------------------------------------------
# One strategy


def run_strategy(cfg: Config, name: str) -> dict:
    """Train one strategy and measure it; a failure becomes a row with its error rather than stopping the rest."""
    try:
        trainer = _trainer(name)  # imported before measuring: library code is not the strategy's memory
        with PeakMemory() as memory:
            report = trainer(cfg)
        metric_name, metric = task_metric(cfg, name, report)
    except Exception as exc:  # noqa: BLE001 (one broken strategy must not hide the others' results)
        log.error("compare-strategies: %s failed: %s", name, exc)
        return {"strategy": name, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    run_dir = Path(cfg.train.output_dir)
    steps, train_seconds = step_seconds(run_dir / "metrics.jsonl")
    return {
        "strategy": name,
        "trainable_parameters": report["trainable_parameters"],
        "total_parameters": report["total_parameters"],
        "peak_memory_mb": round(memory.peak_mb, 1),
        "memory_kind": memory.kind,
        "seconds_per_step": round(train_seconds / steps, 4) if steps else None,
        "train_seconds": round(train_seconds if steps else report["seconds"], 2),
        "metric_name": metric_name,
        "metric": metric,
        "run_dir": str(run_dir),
    }


def _trainer(name: str):
    import peft  # noqa: F401 (imported lazily by the adapter strategies)

    if name == "features":
        from tunesmith.model.features import train_features

        return train_features
    from tunesmith.train.run import train

    return train


def _run_isolated(cfg: Config, name: str) -> dict:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(run_strategy, (cfg, name))


def step_seconds(metrics_path: Path) -> tuple[int, float]:
    """(optimizer steps, seconds spent in them) from a run's metrics.jsonl: each train record covers the steps
    since the previous one and carries their tokens and tokens per second."""
    if not metrics_path.is_file():
        return 0, 0.0
    steps, seconds, last = 0, 0.0, 0
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "tokens_per_s" not in record:
            continue
        steps += record["step"] - last
        last = record["step"]
        if record["tokens_per_s"] > 0:
            seconds += record["tokens"] / record["tokens_per_s"]
    return steps, seconds


class PeakMemory:
    """Peak memory of the block in MB: CUDA tensors (max_memory_allocated) or the process's resident set."""

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.kind, self.start = "cuda max allocated", torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.kind, self.start = "peak RSS", _proc_status("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _proc_status("VmHWM")
        self.peak_mb = (peak - self.start) / 2**20


def _proc_status(field: str) -> int:
    """A size from /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


# ---------------------------------------------------------------------------------------------------
# The task metric, on the saved result


def task_metric(cfg: Config, name: str, report: dict) -> tuple[str, float | None]:
    if name == "features":
        split = "test" if "test_accuracy" in report else "validation"
        return f"{split} accuracy", report.get(f"{split}_accuracy")
    final = Path(cfg.train.output_dir) / "final"
    if _classifies(cfg.train.objective):
        return classification_metric(cfg, final)
    if cfg.eval.sets:
        return generation_metric(cfg, final)
    return "validation loss", report.get("eval_loss")


def classification_metric(cfg: Config, final: Path) -> tuple[str, float]:
    from tunesmith.eval.models import load_trained
    from tunesmith.model.heads import prepare_classification
    from tunesmith.model.load import load_tokenizer
    from tunesmith.objectives.classify import accuracy

    tokenizer = load_tokenizer(str(final))
    splits = prepare_classification(cfg, tokenizer).splits
    split = "test" if len(splits["test"]) else "validation"
    model = load_trained(cfg, final, tokenizer)
    return f"{split} accuracy", accuracy(model, splits[split], tokenizer.pad_token_id, cfg.eval.batch_size)


def generation_metric(cfg: Config, final: Path) -> tuple[str, float]:
    from tunesmith.eval.command import eval_sets, settings_from_config
    from tunesmith.eval.harness import run_set
    from tunesmith.eval.models import load_trained
    from tunesmith.model.load import load_tokenizer

    spec = eval_sets(cfg)[0]
    tokenizer = load_tokenizer(str(final))
    model = load_trained(cfg, final, tokenizer)
    metrics = run_set(model, tokenizer, spec, settings_from_config(cfg))["metrics"]
    key = next(k for k in metrics if k != "n")
    return f"{spec.name} {key}", metrics[key]


def _task_name(cfg: Config) -> str:
    return "classification" if _classifies(cfg.train.objective) else cfg.train.objective


def _classifies(objective: str) -> bool:
    return OBJECTIVES[objective].head == "classification"


# ---------------------------------------------------------------------------------------------------
# Table and plot


COLUMNS = ("strategy", "trainable params", "% of total", "peak memory (MB)", "s / step", "train s", "metric",
           "overrides")


def write_comparison(rows: list[dict], out: Path, task: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps({"task": task, "rows": rows}, indent=2) + "\n")
    (out / "comparison.md").write_text(comparison_table(rows, task))
    plot_comparison(rows, out / "comparison.png", task)


def comparison_table(rows: list[dict], task: str) -> str:
    """One markdown table: a row per strategy (failed ones say why)."""
    kinds = sorted({r["memory_kind"] for r in rows if "memory_kind" in r})
    metric = next((r["metric_name"] for r in rows if r.get("metric_name") and r["strategy"] != "features"),
                  next((r["metric_name"] for r in rows if r.get("metric_name")), "metric"))
    header = [c if c != "metric" else metric for c in COLUMNS]
    lines = [f"Task: {task}. Peak memory: {', '.join(kinds) or '-'}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        overrides = " ".join(f"`{o}`" for o in r.get("overrides", ()))
        if "error" in r:
            lines.append(f"| {r['strategy']} | failed: {r['error'].splitlines()[0]} |" + " |" * (len(header) - 3)
                         + f" {overrides} |")
            continue
        share = 100 * r["trainable_parameters"] / r["total_parameters"] if r["total_parameters"] else 0
        step = "-" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.4f}"
        value = "-" if r["metric"] is None else f"{r['metric']:.4f}"
        lines.append(f"| {r['strategy']} | {r['trainable_parameters']:,} | {share:.3f} | {r['peak_memory_mb']:.1f} "
                     f"| {step} | {r['train_seconds']:.1f} | {value} | {overrides} |")
    return "\n".join(lines) + "\n"


def plot_comparison(rows: list[dict], path: Path, task: str) -> None:
    """Task metric against trainable parameters (log scale), one labelled point per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "error" not in r and r["metric"] is not None]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, r in enumerate(sorted(done, key=lambda r: r["trainable_parameters"])):
        x = max(r["trainable_parameters"], 1)
        ax.scatter(x, r["metric"])
        # neighbours often share a value (lora, dora, qlora): their labels take turns above and below
        ax.annotate(r["strategy"], (x, r["metric"]), textcoords="offset points", xytext=(4, (6, -12, 16)[i % 3]),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(done[0]["metric_name"] if done else "metric")
    ax.set_title(f"{task}: quality vs trainable parameters")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
