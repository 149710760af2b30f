"""The first rows of a prepared split as the model sees them: the token ids decoded piece by piece, each piece
marked with whether it bears loss, plus the rows `prepare` skipped with their `file:line: field` reasons.

Reads the split `tunesmith prepare` wrote into the run (`<run>/data/<split>`); training's own copy lives in the
data cache outside the runs folder, which the studio does not read. The tokenizer is the run's: final/'s, else
the one its config builds (the run's config.yaml, or the config its prepare job was started with).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.config import load_config
from tunesmith.data.tokenize import IGNORE_INDEX
from tunesmith.errors import ConfigError
from tunesmith.model.run_tokenizer import build_tokenizer
from tunesmith.model.load import load_tokenizer
from tunesmith.ui.jobs import Jobs
from tunesmith.ui.sandbox import Sandbox

SPLITS = ("train", "validation", "test")
MAX_ROWS = 50


def preview(sandbox: Sandbox, jobs: Jobs, run: Path, split: str, rows: int) -> dict[str, Any]:
    """{"rows": [{"source", "tokens", "loss_tokens", "segments": [{"text", "loss"}]}], "skipped": [...]}."""
    if split not in SPLITS:
        raise ConfigError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    folder = run / "data" / split
    result: dict[str, Any] = {"split": split, "rows": [], "skipped": skipped_rows(run), "total": 0}
    if not folder.is_dir():
        result["missing"] = (f"no prepared {split} split in this run: run `prepare` on its config to see the rows "
                             "as the model sees them")
        return result
    from datasets import load_from_disk

    table = load_from_disk(str(folder))
    tokenizer = run_tokenizer(sandbox, jobs, run)
    result["total"] = len(table)
    for i in range(min(max(rows, 0), MAX_ROWS, len(table))):
        row = table[i]
        result["rows"].append(render_row(tokenizer, row["input_ids"], row["labels"], row.get("source", "")))
    return result


def render_row(tokenizer, input_ids: list[int], labels: list[int], source: str = "") -> dict[str, Any]:
    """Runs of consecutive tokens with the same loss flag, each decoded into one piece (special tokens kept)."""
    segments: list[dict[str, Any]] = []
    start = 0
    for end in range(1, len(input_ids) + 1):
        if end == len(input_ids) or (labels[end] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            segments.append({"text": _decode(tokenizer, input_ids[start:end]), "loss": labels[start] != IGNORE_INDEX})
            start = end
    return {"source": source, "tokens": len(input_ids),
            "loss_tokens": sum(1 for t in labels[1:] if t != IGNORE_INDEX), "segments": segments}


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def skipped_rows(run: Path) -> list[dict[str, Any]]:
    """Per source: rows read, kept, skipped, and the first skipped rows' reasons, from the run's data report."""
    out = []
    for name in ("data/data_report.json", "data_report.json"):
        try:
            report = json.loads((run / name).read_text())
        except (OSError, ValueError):
            continue
        for split, sources in (report.get("sources") or {}).items():
            for path, r in sources.items():
                out.append({"split": split, "source": path, "rows_read": r.get("rows_read"),
                            "rows_kept": r.get("rows_kept"), "skipped": r.get("skipped", 0),
                            "errors": list(r.get("errors") or [])})
        return out
    return out


def run_tokenizer(sandbox: Sandbox, jobs: Jobs, run: Path):
    """The tokenizer training used: final/'s, else built from the run's config as training builds it."""
    if (run / "final" / "tokenizer_config.json").is_file():
        return load_tokenizer(str(run / "final"))
    return build_tokenizer(_run_config(sandbox, jobs, run))[0]


def _run_config(sandbox: Sandbox, jobs: Jobs, run: Path):
    if (run / "config.yaml").is_file():
        return load_config(run / "config.yaml")
    for job in reversed(jobs.list(run)):
        if job.command in ("prepare", "train") and len(job.argv) > 1:
            path = Path(job.argv[1]).resolve()
            if path.is_relative_to(sandbox.configs) or path.is_relative_to(sandbox.runs):
                return load_config(path, [a for a in job.argv[2:] if not a.startswith("--")])
    raise ConfigError(f"{run.name}: no config.yaml and no recorded prepare job: the tokenizer is unknown")
