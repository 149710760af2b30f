"""Plots of a run, as PNG files next to its report (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.track.metrics import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_points(records: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, validation loss) pairs of `metrics.jsonl` records."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    return train, evals


def _draw_losses(ax, records: list[dict[str, Any]], title: str) -> None:
    train, evals = loss_points(records)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss", markersize=3)
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    if train or evals:
        ax.legend()


def _save(fig, out_path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    _pyplot().close(fig)
    return Path(out_path)


def plot_loss_curve(metrics_path: Path, out_path: Path, title: str = "") -> Path:
    """Training loss per logged step and validation loss per evaluation, from `metrics.jsonl`."""
    fig, ax = _pyplot().subplots(figsize=(6, 3.5))
    _draw_losses(ax, read_metrics(metrics_path), title)
    ax.set_xlabel("optimizer step")
    return _save(fig, out_path)


def plot_training_curves(metrics_path: Path, out_path: Path, title: str = "") -> Path:
    """Train and validation loss on the top panel, the learning rate below, sharing the step axis."""
    records = read_metrics(metrics_path)
    fig, (loss_ax, lr_ax) = _pyplot().subplots(2, 1, figsize=(6, 5), sharex=True,
                                               gridspec_kw={"height_ratios": [2, 1]})
    _draw_losses(loss_ax, records, title)
    lrs = [(r["step"], r["lr"]) for r in records if "lr" in r]
    if lrs:
        lr_ax.plot(*zip(*lrs), color="tab:green", linewidth=1)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    return _save(fig, out_path)


def plot_before_after(metrics_before: dict[str, float], metrics_after: dict[str, float], path: Path,
                      title: str = "", labels: tuple[str, str] = ("before", "after")) -> Path:
    """Grouped bars: for each metric in both mappings, its value before and after, each bar labelled.

    Non-numeric values are left out; the metrics keep the order of `metrics_before`.
    """
    names = [k for k, v in metrics_before.items() if _is_number(v) and _is_number(metrics_after.get(k))]
    if not names:
        raise ValueError("plot_before_after: the two mappings share no numeric metric")
    fig, ax = _pyplot().subplots(figsize=(max(4.0, 1.4 * len(names) + 1.5), 3.5))
    width = 0.38
    for offset, label, values in ((-width / 2, labels[0], metrics_before), (width / 2, labels[1], metrics_after)):
        heights = [float(values[n]) for n in names]
        bars = ax.bar([i + offset for i in range(len(names))], heights, width, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 4 else 0)
    ax.set_title(title)
    ax.legend()
    ax.margins(y=0.15)
    return _save(fig, path)


def plot_runs(runs: dict[str, list[dict[str, Any]]], out_path: Path, title: str = "") -> Path:
    """Several runs' loss curves on one axis: train solid, validation dashed with markers, one colour a run."""
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for i, (label, records) in enumerate(runs.items()):
        color = f"C{i % 10}"
        train, evals = loss_points(records)
        if train:
            ax.plot(*zip(*train), color=color, linewidth=1, label=f"{label} train")
        if evals:
            ax.plot(*zip(*evals), "o--", color=color, markersize=3, label=f"{label} validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    if ax.lines:
        ax.legend(fontsize=8)
    return _save(fig, out_path)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
