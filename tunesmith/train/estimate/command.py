"""The `tunesmith estimate` command: the estimate of a config as a table and `estimate.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tunesmith.config import Config
from tunesmith.model.run_tokenizer import build_tokenizer
from tunesmith.model.scratch import init_fields
from tunesmith.model.sources import resolve_model_path
from tunesmith.train.estimate.advice import MiB, advice
from tunesmith.train.estimate.config_shape import shape_from_dict
from tunesmith.train.estimate.from_config import cached_batch, plan_from_config
from tunesmith.train.estimate.peak import estimate_memory
from tunesmith.train.estimate.shape import ModelShape, model_shape
from tunesmith.train.estimate.speed import device_flops


def estimate_command(cfg: Config, measure: bool = False) -> dict:
    """Print the estimate of `cfg` as a table and write `estimate.json` to train.output_dir; with `measure`,
    also run a few steps in a fresh process and report the measured peak next to the estimate.

    Without `measure` it reads files only (the tokenizer through `tokenizers` where it can, config.json, the
    prepared data's Arrow tables, the CPU's kept rate) and imports neither torch nor transformers where the
    architecture's shape has formulas (config_shape.py) and this CPU's rate for the block is kept (cpu_rate.py).
    """
    tokenizer, _ = build_tokenizer(cfg, light=not measure)
    if measure:  # training prepares the data anyway; prepared, its longest micro-batch is known
        from tunesmith.data.build import prepare_from_config

        prepare_from_config(cfg, tokenizer)
    report = estimate_report(cfg, tokenizer)
    if measure:
        from tunesmith.train.estimate.measure import measure_peak

        report["measured"] = measure_peak(cfg)
        report["measured"]["relative_error"] = report["peak_bytes"] / report["measured"]["peak_bytes"] - 1
    print(format_table(report))
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimate.json").write_text(json.dumps(report, indent=1))
    return report


def estimate_report(cfg: Config, tokenizer) -> dict:
    """The estimate of `cfg` as `estimate.json` holds it: the model's shape, the plan, the components, the phases
    and the peak, the speed and the advice."""
    m = cfg.model
    shape = run_model_shape(cfg, tokenizer)
    plan, notes = plan_from_config(cfg, shape, cached_batch(cfg, tokenizer))
    est = estimate_memory(shape, plan)
    est.notes += notes
    device, rate, utilisation = device_flops(plan, shape, lambda: transformers_config(cfg, tokenizer),
                                             m.trust_remote_code)
    return {
        "config": m.name_or_path or f"model.init ({m.init.family})",
        "model": dataclasses.asdict(shape) | {"params": shape.params},
        "plan": dataclasses.asdict(plan), "trainable_params": est.trainable,
        "components_bytes": est.components, "phases_bytes": est.phases, "peak_bytes": est.peak,
        "peak_phase": est.peak_phase, "at_peak": est.at_peak, "flops_per_token": est.flops_per_token,
        "device": device, "device_flops": rate, "utilisation": utilisation,
        "tokens_per_s": rate * utilisation / est.flops_per_token, "advice": advice(cfg, shape, plan, est),
        "notes": est.notes,
    }


def run_model_shape(cfg: Config, tokenizer) -> ModelShape:
    """The shape of the run's model for `tokenizer`: from its config.json's fields by formula, or, for an
    architecture without formulas (or a hub id not on disk yet), counted on a meta-device model."""
    m = cfg.model
    fields = config_fields(cfg, tokenizer)
    shape = shape_from_dict(fields, len(tokenizer)) if fields is not None and not m.trust_remote_code else None
    return shape or model_shape(transformers_config(cfg, tokenizer), len(tokenizer), m.trust_remote_code)


def config_fields(cfg: Config, tokenizer) -> dict | None:
    """The run's model's config.json as a dict, read without transformers: model.init's fields, or the file of
    a local checkpoint (a packaged or GGUF model: its converted directory); None for a hub id."""
    m = cfg.model
    if m.init is not None:
        return init_fields(m.init, tokenizer)
    path = Path(resolve_model_path(m.name_or_path)) / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if not m.revision and path.is_file() else None


def transformers_config(cfg: Config, tokenizer):
    """The run's model's `transformers` config (imports transformers and torch)."""
    from tunesmith.model.build import architecture

    return architecture(cfg, tokenizer)


def format_table(report: dict) -> str:
    """The report as the terminal table: the model and batch, each component and whether the peak holds it, the
    peak (and the measured one), the speed, the advice and the notes."""
    s, p = report["model"], report["plan"]
    lines = [f"model {report['config']}: {s['model_type']}, {s['layers']} layers, hidden {s['hidden']}, vocabulary "
             f"{s['vocab']:,}; {s['params'] / 1e6:,.1f}M parameters, {report['trainable_params'] / 1e6:,.2f}M "
             f"trainable ({p['strategy']})",
             f"longest micro-batch: {p['rows']} rows x {p['seq_len']} tokens, {p['loss_rows']:,} loss positions "
             f"(from {p['source']}); weights {8 * p['weight_bytes']}-bit, mixed precision "
             f"{'on' if p['amp'] else 'off'}, gradient checkpointing {'on' if p['gradient_checkpointing'] else 'off'}",
             "", f"{'component':<24}{'MiB':>12}  at the peak", "-" * 48]
    for name, size in report["components_bytes"].items():
        if size:
            lines.append(f"{name:<24}{size / MiB:>12,.1f}  {'yes' if name in report['at_peak'] else 'no'}")
    lines += ["-" * 48, f"{'peak':<24}{report['peak_bytes'] / MiB:>12,.1f}  ({report['peak_phase']} phase)"]
    if "measured" in report:
        m = report["measured"]
        lines.append(f"{'measured peak':<24}{m['peak_bytes'] / MiB:>12,.1f}  ({m['method']}); estimate "
                     f"{m['relative_error']:+.1%}")
    rate = report["device_flops"]
    rate_text = f"{rate / 1e12:,.2f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:,.1f} GFLOP/s"
    lines += ["", f"speed: ~{report['tokens_per_s']:,.0f} tokens/s ({report['flops_per_token'] / 1e9:,.3g} GFLOP "
              f"per token; {report['device']}: {rate_text} x {report['utilisation']:.0%} utilisation)"]
    if "measured" in report and report["measured"].get("tokens_per_s"):
        lines[-1] += f"; measured {report['measured']['tokens_per_s']:,.0f} non-padding tokens/s"
    lines.append(f"to lower it: {report['advice']}")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
