"""`tunesmith report RUN_DIR [RUN_DIR ...]`: finished (or interrupted) runs side by side.

Reads each run's `metrics.jsonl` (required) and `report.json` (when the run finished) or `config.yaml`, and
writes `comparison.md` (one table) and `comparison.png` (all loss curves overlaid) into `output`, by default
the first run directory.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from tunesmith.errors import TunesmithError
from tunesmith.track.metrics import read_metrics
from tunesmith.track.plots import loss_points, plot_runs

COLUMNS = ("run", "steps", "final train loss", "best eval loss", "last eval loss", "trainable params", "seconds",
           "objective", "strategy")


def report_command(run_dirs: list[str], output: str | None = None) -> Path:
    """Write comparison.md and comparison.png for `run_dirs`, print the table; returns the markdown path."""
    if not run_dirs:
        raise TunesmithError("report: give at least one run directory")
    dirs = [Path(d) for d in run_dirs]
    runs = {label: load_run(d) for label, d in zip(run_labels(dirs), dirs)}
    out = Path(output) if output else dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    plot_runs({label: run["records"] for label, run in runs.items()}, out / "comparison.png",
              title="loss per optimizer step")
    table = comparison_table([summarize(label, run) for label, run in runs.items()])
    command = "tunesmith report " + " ".join(shlex.quote(d) for d in run_dirs)
    if output:
        command += f" --output {shlex.quote(output)}"
    text = f"# Run comparison\n\n{table}\n\n![loss curves](comparison.png)\n\nMade with `{command}`.\n"
    (out / "comparison.md").write_text(text, encoding="utf-8")
    print(table)
    print(f"\nwritten: {out / 'comparison.md'}, {out / 'comparison.png'}")
    return out / "comparison.md"


def run_labels(dirs: list[Path]) -> list[str]:
    """Each run's directory name, or its path where two runs share a name."""
    names = [d.resolve().name for d in dirs]
    return [n if names.count(n) == 1 else str(d) for d, n in zip(dirs, names)]


def load_run(run_dir: Path) -> dict[str, Any]:
    """{"records": metrics.jsonl records, "report": report.json or {}, "config": the resolved config or {}}."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise TunesmithError(f"report: {metrics} not found (is {run_dir} a tunesmith run directory?)")
    report = json.loads((run_dir / "report.json").read_text()) if (run_dir / "report.json").is_file() else {}
    config = report.get("config")
    if config is None and (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return {"records": read_metrics(metrics), "report": report, "config": config or {}}


def summarize(label: str, run: dict[str, Any]) -> dict[str, Any]:
    """One table row; None where the run does not say (no evaluation, not finished)."""
    train, evals = loss_points(run["records"])
    report, config = run["report"], run["config"]
    return {
        "run": label,
        "steps": report.get("steps", max((r["step"] for r in run["records"]), default=None)),
        "final train loss": train[-1][1] if train else None,
        "best eval loss": min(v for _, v in evals) if evals else None,
        "last eval loss": evals[-1][1] if evals else None,
        "trainable params": report.get("trainable_parameters"),
        "seconds": report.get("seconds"),
        "objective": config.get("train", {}).get("objective"),
        "strategy": config.get("strategy", {}).get("name"),
    }


def comparison_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c], c) for c in COLUMNS) + " |")
    return "\n".join(lines)


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if column == "seconds" else f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
