"""The eval report: eval.json (everything) and eval.md (tables), for one model or a comparison of two.

    single   {"model", "kind", "sets": {name: {"kind", "path", "general", "metrics", ["examples"]}},
              ["forgetting"]}
    compare  {"a": {"model", "kind", "sets"}, "b": {...}, "delta": {name: {metric: B - A}}, ["forgetting"]}

Forgetting compares the general sets before and after fine-tuning (the baseline and the model, or A and B):
{"before", "after", "sets": {name: {"perplexity" and/or "accuracy": {"metric", "before", "after", "change"}}}},
where accuracy is token accuracy for loss sets, accuracy for choice and classify sets and the first metric of a
generate set.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from tunesmith.eval.sets import COUNT_KEYS


def single_report(result: dict, sets: Sequence) -> dict:
    report = {"model": result["model"], "kind": result["kind"], "sets": result["sets"]}
    if "baseline_sets" in result:
        report["forgetting"] = forgetting(result["baseline"], result["baseline_sets"], result["model"],
                                          result["sets"])
    return report


def compare_report(a: dict, b: dict, sets: Sequence) -> dict:
    report = {
        "a": {k: a[k] for k in ("model", "kind", "sets")},
        "b": {k: b[k] for k in ("model", "kind", "sets")},
        "delta": {s.name: deltas(a["sets"][s.name]["metrics"], b["sets"][s.name]["metrics"]) for s in sets},
    }
    general = [s.name for s in sets if s.general]
    if general:
        report["forgetting"] = forgetting(a["model"], {n: a["sets"][n] for n in general}, b["model"],
                                          {n: b["sets"][n] for n in general})
    return report


def scores(metrics: dict) -> dict[str, float]:
    """The metrics that are scores (not counts), with a value."""
    return {k: v for k, v in metrics.items()
            if k not in COUNT_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v)}


def deltas(a: dict, b: dict) -> dict[str, float]:
    """B - A for every score both have."""
    a, b = scores(a), scores(b)
    return {k: b[k] - a[k] for k in a if k in b}


def forgetting(before: str, before_sets: dict, after: str, after_sets: dict) -> dict:
    table = {}
    for name, result in before_sets.items():
        entry = {}
        for measure, key in (("perplexity", "perplexity" if result["kind"] == "loss" else None),
                             ("accuracy", accuracy_key(result))):
            x, y = result["metrics"].get(key), after_sets[name]["metrics"].get(key)
            if key and x is not None and y is not None:
                entry[measure] = {"metric": key, "before": x, "after": y, "change": y - x}
        table[name] = entry
    return {"before": before, "after": after, "sets": table}


def accuracy_key(result: dict) -> str | None:
    """The metric a set's accuracy is read from."""
    if result["kind"] == "loss":
        return "token_accuracy"
    if result["kind"] in ("choice", "classify"):
        return "accuracy"
    return next(iter(scores(result["metrics"])), None)


# ---------------------------------------------------------------------------------------------------
# Writing


def write_report(out_dir: Path, report: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(_json_safe(report), indent=2) + "\n", encoding="utf-8")
    (out_dir / "eval.md").write_text(markdown(report), encoding="utf-8")
    bars = before_after(report)
    if bars is not None:
        from tunesmith.track.plots import plot_before_after

        plot_before_after(*bars, out_dir / "eval.png", title="before vs after", labels=("A", "B")
                          if "delta" in report else ("base", "tuned"))


def before_after(report: dict) -> tuple[dict[str, float], dict[str, float]] | None:
    """`set/metric` scores of the two models a report compares (A and B, or base and tuned for forgetting),
    or None when it compares nothing."""
    if "delta" in report:
        pairs = [(report["a"]["sets"][name]["metrics"], report["b"]["sets"][name]["metrics"], name)
                 for name in report["delta"]]
        before = {f"{n}/{k}": v for a, _, n in pairs for k, v in scores(a).items()}
        after = {f"{n}/{k}": v for _, b, n in pairs for k, v in scores(b).items()}
    elif "forgetting" in report:
        entries = [(f"{name}/{e['metric']}", e) for name, sets in report["forgetting"]["sets"].items()
                   for e in sets.values()]
        before = {key: e["before"] for key, e in entries}
        after = {key: e["after"] for key, e in entries}
    else:
        return None
    shared = [k for k in before if k in after]
    return ({k: before[k] for k in shared}, {k: after[k] for k in shared}) if shared else None


def markdown(report: dict) -> str:
    if "delta" in report:
        lines = ["# Comparison", "", f"A: `{report['a']['model']}` ({report['a']['kind']}), "
                 f"B: `{report['b']['model']}` ({report['b']['kind']}).", "",
                 "| set | metric | A | B | B - A |", "|---|---|---|---|---|"]
        for name, delta in report["delta"].items():
            a, b = report["a"]["sets"][name]["metrics"], report["b"]["sets"][name]["metrics"]
            lines.append(f"| {name} | n | {a['n']} | {b['n']} | |")
            lines += [f"| | {k} | {_num(a[k])} | {_num(b[k])} | {_num(d, signed=True)} |" for k, d in delta.items()]
        sections = [report["a"], report["b"]]
    else:
        lines = ["# Evaluation", "", f"Model: `{report['model']}` ({report['kind']}).", "",
                 "| set | kind | n | metric | value |", "|---|---|---|---|---|"]
        for name, result in report["sets"].items():
            first = f"| {name} | {result['kind']} | {result['metrics']['n']} |"
            for i, (k, v) in enumerate(scores(result["metrics"]).items()):
                lines.append(f"{first if i == 0 else '| | | |'} {k} | {_num(v)} |")
        sections = [report]
    if "forgetting" in report:
        lines += _forgetting_lines(report["forgetting"])
    lines += _example_lines(sections)
    lines += ["", f"{report.get('seconds', 0)} s. BLEU and chrF are on sacrebleu's 0-100 scale, the other scores "
              "on 0-1. Every number is in eval.json."]
    return "\n".join(lines) + "\n"


def _forgetting_lines(f: dict) -> list[str]:
    lines = ["", "## Forgetting (general sets)", "", f"Before: `{f['before']}`; after: `{f['after']}`.", "",
             "| set | measure | before | after | change |", "|---|---|---|---|---|"]
    for name, entry in f["sets"].items():
        for measure, c in entry.items():
            label = measure if c["metric"] == measure else f"{measure} ({c['metric']})"
            lines.append(f"| {name} | {label} | {_num(c['before'])} | {_num(c['after'])} | "
                         f"{_num(c['change'], signed=True)} |")
    return lines


def _example_lines(sections: list[dict]) -> list[str]:
    lines = []
    for section in sections:
        for name, result in section["sets"].items():
            for e in result.get("examples", []):
                if not lines:
                    lines = ["", "## Examples", "", "| model | set | source | prediction | reference |",
                             "|---|---|---|---|---|"]
                lines.append(f"| `{section['model']}` | {name} | {_cell(e['source'])} | {_cell(e['prediction'])} | "
                             f"{_cell(e['reference'])} |")
    return lines


def _num(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:+d}" if signed else str(value)
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")[:200] or "(empty)"


def _finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _json_safe(value):
    """NaN and infinities (a loss over no tokens) as null: eval.json stays valid JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value if _finite(value) else None
