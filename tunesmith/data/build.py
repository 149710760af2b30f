"""Config -> plain arguments for the data pipeline, and the reports `prepare` and `train` write.

The pipeline itself (`pipeline.py`) never sees a config object.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tunesmith.config import Config, SourceConfig
from tunesmith.data.pipeline import InstructOptions, Options, Prepared, Source, prepare


def sources_from_config(cfg: Config) -> dict[str, list[Source]]:
    d = cfg.data
    out = {}
    for name in ("train", "validation", "test"):
        out[name] = [_source(s, d.format, d.fields, d.text_unit) for s in getattr(d, name)]
    return out


def _source(entry: str | SourceConfig, fmt: str, fields: dict[str, str], text_unit: str) -> Source:
    if isinstance(entry, str):
        return Source(entry, fmt, 1.0, tuple(sorted(fields.items())), text_unit)
    return Source(entry.path, entry.format or fmt, entry.weight, tuple(sorted((entry.fields or fields).items())),
                  entry.text_unit or text_unit, entry.task)


def options_from_config(cfg: Config) -> Options:
    d = cfg.data
    return Options(
        system_prompt=d.system_prompt, on_error=d.on_error, max_seq_len=d.max_seq_len, truncation=d.truncation,
        train_on_prompt=d.train_on_prompt, pack=d.pack, objective=cfg.train.objective,
        validation=d.split.validation, test=d.split.test, stratify_by=d.split.stratify_by, seed=cfg.train.seed,
        num_proc=d.num_proc,
        instruct=InstructOptions(tuple(d.instruct.templates), tuple(d.instruct.template_ids or ()),
                                 d.instruct.inverted, d.instruct.shots, d.instruct.fewshot_format, d.instruct.cot),
    )


def cache_dir(cfg: Config) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    base = os.environ.get("TUNESMITH_CACHE") or Path.home() / ".cache" / "tunesmith"
    return Path(base) / "data"


def prepare_from_config(cfg: Config, tokenizer) -> Prepared:
    return prepare(tokenizer, sources_from_config(cfg), options_from_config(cfg), cache_dir(cfg))


def write_data_report(prepared: Prepared, out_dir: Path) -> None:
    """`data_report.json`, `data_report.md` and a token-length histogram (PNG) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = prepared.report
    (out_dir / "data_report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "data_report.md").write_text(_markdown(report))
    _histogram(prepared, out_dir / "token_lengths.png")


def _markdown(report: dict) -> str:
    lines = ["# Data report", "", f"Fingerprint `{report['fingerprint']}`.", "", "## Sources", "",
             "| split | source | rows read | rows kept | skipped |", "|---|---|---|---|---|"]
    for split, sources in report["sources"].items():
        for path, r in sources.items():
            lines.append(f"| {split} | `{path}` | {r['rows_read']} | {r['rows_kept']} | {r['skipped']} |")
    errors = [e for sources in report["sources"].values() for r in sources.values() for e in r["errors"]]
    if errors:
        lines += ["", "Skipped rows (first ones):", ""] + [f"- {e}" for e in errors]
    if "clean" in report:
        lines += ["", "## Cleaning", "", "```", json.dumps(report["clean"], indent=1), "```"]
    lines += ["", "## Splits", "", "| split | rows | examples | truncated | dropped (no loss token) | tokens | "
              "loss tokens | length p50 / p90 / max |", "|---|---|---|---|---|---|---|---|"]
    for name, s in report["splits"].items():
        if not s.get("rows"):
            continue
        length = s.get("length", {})
        lines.append(f"| {name} | {s['rows']} | {s['examples']} | {s['truncated']} | {s['dropped_no_loss_tokens']} "
                     f"| {s['tokens']} | {s['loss_tokens']} | {length.get('p50')} / {length.get('p90')} / "
                     f"{length.get('max')} |")
        if "packing" in s:
            p = s["packing"]
            lines.append(f"|  | packed: {p['documents']} documents into {p['sequences']} sequences, "
                         f"{p['efficiency']:.1%} of token slots used | | | | | | |")
    return "\n".join(lines) + "\n"


def _histogram(prepared: Prepared, path: Path) -> None:
    """Token lengths of the examples of each split, before packing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, split in prepared.report["splits"].items():
        hist = split.get("length_histogram") or {}
        if hist.get("counts"):
            ax.stairs(hist["counts"], hist["edges"], fill=True, alpha=0.6, label=f"{name} ({split['examples']})")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
