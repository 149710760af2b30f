"""Config -> plain arguments for the data pipeline, and the reports `prepare` and `train` write.

The pipeline itself (`pipeline.py`) never sees a config object.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tunesmith.config import Config, SourceConfig
from tunesmith.data.clean import CleanSteps
from tunesmith.data.quality import QualityLimits
from tunesmith.errors import ConfigError
from tunesmith.data.pipeline import InstructOptions, Options, Prepared, Source, prepare
from tunesmith.paths import cache_home


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
                                 d.instruct.inverted, d.instruct.shots, d.instruct.fewshot_format, d.instruct.cot,
                                 tuple(d.instruct.held_out_clusters)),
    )


def cache_dir(cfg: Config) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    return cache_home() / "data"


def clean_from_config(cfg: Config) -> CleanSteps | None:
    """The cleaning steps asked for, or None when every step is off."""
    c = cfg.data.clean
    if not (c.normalize or c.pii or c.quality or c.exact_dedup or c.near_dedup != "off"):
        return None
    try:
        return CleanSteps(
            normalize=c.normalize, unicode_form=c.unicode_form, pii=c.pii, pii_kinds=tuple(c.pii_kinds),
            quality=QualityLimits(**dataclasses.asdict(c.quality_limits)) if c.quality else None,
            exact_dedup=c.exact_dedup, near_dedup=c.near_dedup, near_threshold=c.near_threshold,
            num_perm=c.num_perm, seed=cfg.train.seed,
        )
    except ConfigError as exc:
        raise ConfigError(f"data.{exc}") from None


def prepare_from_config(cfg: Config, tokenizer, load: bool = True) -> Prepared:
    return prepare(tokenizer, sources_from_config(cfg), options_from_config(cfg), cache_dir(cfg),
                   clean_from_config(cfg), load)


def write_data_report(prepared: Prepared, out_dir: Path) -> None:
    """`data_report.json`, `data_report.md` and a token-length histogram (PNG) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = prepared.report
    (out_dir / "data_report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "data_report.md").write_text(_markdown(report))
    _plot_lengths(prepared, out_dir / "token_lengths.png")


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
        lines += _clean_markdown(report["clean"])
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


def _clean_markdown(clean: dict) -> list[str]:
    lines = ["", "## Cleaning", "", "| split | rows | normalised | PII rows changed | quality drops | exact dups "
             "| near dups dropped | near-dup groups | kept |", "|---|---|---|---|---|---|---|---|---|"]
    for name, c in clean.items():
        lines.append(f"| {name} | {c['rows']} | {c.get('normalize', {}).get('changed', '-')} | "
                     f"{c.get('pii', {}).get('changed', '-')} | {c['quality']['removed']} | "
                     f"{c['exact_dedup']['removed']} | {c['near_dedup']['removed']} | {c['near_dedup']['groups']} | "
                     f"{c['kept']} |")
    for name, c in clean.items():
        if c.get("pii", {}).get("replaced"):
            lines.append(f"\nPersonal data replaced in {name}: " +
                         ", ".join(f"{k} {n}" for k, n in c["pii"]["replaced"].items()))
        if c["quality"]["by_check"]:
            lines.append(f"\nQuality drops in {name}: " +
                         ", ".join(f"{k} {n}" for k, n in c["quality"]["by_check"].items()))
        if c["removed_examples"]:
            lines += [f"\nRemoved from {name} (first ones):", ""] + [f"- {e}" for e in c["removed_examples"]]
    return lines


def _plot_lengths(prepared: Prepared, path: Path) -> None:
    """Token lengths of the examples of each split, before packing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # not pyplot: no backend machinery to import, nothing global to close

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, split in prepared.report["splits"].items():
        hist = split.get("length_histogram") or {}
        if hist.get("counts"):
            ax.stairs(hist["counts"], hist["edges"], fill=True, alpha=0.6, label=f"{name} ({split['examples']})")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
