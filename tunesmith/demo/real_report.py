"""The real-model quickstart's results: one table (base, tuned, tuned in llama.cpp) and every scored answer.

    results.json   seed, recipe, countries, stage times and load, the table's numbers, the forgetting guard's
                   summary from the training run, and every answer of every model with its verdict
    results.md     the table, the timing line and the wrong answers
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tunesmith.demo.real_data import contains_answer

SETS = ("heldout", "real_world")
SET_TITLES = {"heldout": "invented countries, held-out questions", "real_world": "real-world questions"}


def model_rows(evaluation: dict, llama: dict | None) -> list[dict]:
    """The table's rows from `tunesmith eval --compare BASE RUN`'s report and llama.cpp's answers: accuracy
    (0-1) on each question set and perplexity on the general text (None where not measured)."""
    rows = []
    for key, name in (("a", "base"), ("b", "tuned")):
        sets = evaluation[key]["sets"]
        rows.append({"model": name, "runtime": "transformers",
                     **{s: sets[s]["metrics"]["contains_answer"] for s in SETS},
                     "perplexity": sets["general_text"]["metrics"]["perplexity"]})
    if llama is not None:
        rows.append({"model": "tuned, GGUF", "runtime": "llama.cpp",
                     **{s: sum(r["correct"] for r in llama[s]) / len(llama[s]) for s in SETS}, "perplexity": None})
    return rows


def scored_answers(evaluation: dict, llama: dict | None, questions: dict[str, list[str]]
                   ) -> dict[str, dict[str, list[dict]]]:
    """model -> set -> {"question", "reference", "prediction", "correct"} rows, in the sets' order.

    Args:
        questions: set -> its questions in file order (the eval report names each answer's file and line).
    """
    answers = {}
    for key, name in (("a", "base"), ("b", "tuned")):
        answers[name] = {s: [{"question": q, "reference": e["reference"], "prediction": e["prediction"],
                              "correct": bool(contains_answer(e["prediction"], e["reference"]))}
                             for q, e in zip(questions[s], evaluation[key]["sets"][s]["examples"], strict=True)]
                         for s in SETS}
    if llama is not None:
        answers["tuned, GGUF"] = llama
    return answers


def results(evaluation: dict, llama: dict | None, questions: dict[str, list[str]], recipe, seed: int, world,
            run: Path, timings: dict[str, float], wall_s: float) -> dict:
    """Everything results.json holds (see the module docstring)."""
    from dataclasses import asdict

    train_report = json.loads((run / "report.json").read_text(encoding="utf-8"))
    return {
        "seed": seed, "recipe": asdict(recipe), "run": str(run),
        "countries": [{"name": c.name, "capital": c.capital, "language": c.language, "currency": c.currency}
                      for c in world.countries],
        "counts": {s: len(evaluation["a"]["sets"][s]["examples"]) for s in SETS}
        | {"general_text": evaluation["a"]["sets"]["general_text"]["metrics"]["n"]},
        "rows": model_rows(evaluation, llama),
        "forgetting_guard": train_report.get("forgetting"),
        "timings": timings, "wall_s": round(wall_s, 1), "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "answers": scored_answers(evaluation, llama, questions),
    }


def format_table(report: dict) -> str:
    """The results as a markdown table, with the timing line under it."""
    counts, quant = report["counts"], report["recipe"]["gguf_quant"]
    header = ["model", "runs in"] + [f"{SET_TITLES[s]} ({counts[s]})" for s in SETS] + \
        [f"perplexity, general text ({counts['general_text']} paragraphs)"]
    names = {"base": "SmolLM2-135M-Instruct (base)", "tuned": "+ LoRA on the invented countries",
             "tuned, GGUF": f"+ LoRA, merged, GGUF {quant}"}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["rows"]:
        cells = [names[row["model"]], row["runtime"]] + [f"{100 * row[s]:.1f}%" for s in SETS] + \
            ["-" if row["perplexity"] is None else f"{row['perplexity']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if not any(row["runtime"] == "llama.cpp" for row in report["rows"]):
        lines.append("\n(llama.cpp was not built: `make llama-cpp`, then run again for its row)")
    return "\n".join(lines) + "\n\n" + timing_line(report)


def timing_line(report: dict) -> str:
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in report["timings"].items())
    load = ", ".join(f"{x:.1f}" for x in report["load_average"])
    return (f"Wall time {report['wall_s'] / 60:.1f} min ({stages}) on {report['cpu_count']} CPU cores; load "
            f"average at the end {load} (1, 5, 15 min).")


def wrong_answers(report: dict) -> str:
    """Every wrong answer, per model and set, for results.md."""
    lines = []
    for model, sets in report["answers"].items():
        for name, rows in sets.items():
            wrong = [r for r in rows if not r["correct"]]
            if wrong and not (model == "base" and name == "heldout"):  # the base cannot know those
                lines.append(f"\n**{model}, {SET_TITLES[name]}: {len(wrong)} wrong of {len(rows)}**\n")
                lines += [f"- {r['question']!r} (want {r['reference']}): {r['prediction']!r}" for r in wrong]
    return "\n".join(lines)


def write_results(out: Path, report: dict) -> None:
    """results.json (everything) and results.md (table, timing, wrong answers) in `out`."""
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    text = "# Real-model quickstart\n\n" + format_table(report) + "\n\n## Wrong answers\n" + wrong_answers(report)
    (out / "results.md").write_text(text + "\n", encoding="utf-8")
