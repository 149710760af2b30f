"""The demo's report: metrics from the scored generations, the terminal table, report.json and report.md."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from tunesmith.data.instruct import get_task
from tunesmith.demo.evaluate import accuracy
from tunesmith.demo.tasks import HELDOUT_TASK, NLI_LABELS, SEEN_TASKS
from tunesmith.demo.world import World

TASK_LABELS = {"qa": "fact QA", "arithmetic": "arithmetic", "sentiment": "sentiment", "extraction": "extraction"}
MODEL_LABELS = {"base": "base (pretrained)", "tuned": "base + LoRA instruction tuning"}


def build_report(world: World, size, prompting: dict[str, list[dict]], clusters: dict[str, dict[str, list[dict]]],
                 alignment: dict, forgetting: dict[str, float], pretrain: dict, sft: dict, seconds: float) -> dict:
    """Metrics per stage and model, every scored answer, and what produced them.

    Args:
        prompting: "zero_shot"/"few_shot" -> scored rows of the base model (plain text, fact QA).
        clusters: model -> task (and "fact_completion") -> scored rows (chat template, zero-shot).
        alignment: the alignment stage's outcome (`run.align`).
        forgetting: model -> perplexity on unseen corpus text.
        pretrain, sft: the two training runs' reports.
    """
    scores = {name: {task: _score(rows) for task, rows in by_task.items()} for name, by_task in clusters.items()}
    return {
        "seed": world.seed,
        "size": asdict(size),
        "world": {"countries": len(world.countries), "sft_countries": len(world.sft_countries),
                  "heldout_countries": len(world.heldout_countries)},
        "prompting": {"shots": size.shots, **{k: _score(rows) for k, rows in prompting.items()}},
        "clusters": scores,
        "seen_clusters": {name: sum(s[t]["exact_match"] for t in SEEN_TASKS) / len(SEEN_TASKS)
                          for name, s in scores.items()},
        "heldout_cluster": {"task": HELDOUT_TASK, "cluster": get_task(HELDOUT_TASK).cluster,
                            "chance": 1 / len(NLI_LABELS)},
        "alignment": alignment,
        "forgetting": {**forgetting, "measure": "perplexity on corpus_heldout.jsonl (documents no stage trained on)"},
        "answers": {"prompting": prompting, "clusters": clusters},
        "pretrain": _run_summary(pretrain),
        "sft": _run_summary(sft),
        "configs": {"pretrain": pretrain["config"], "sft": sft["config"]},
        "versions": library_versions(),
        "seconds": round(seconds, 1),
    }


def _score(rows: list[dict]) -> dict:
    return {"exact_match": accuracy(rows), "n": len(rows)}


def library_versions() -> dict[str, str]:
    """The versions a result depends on, for the report."""
    from importlib.metadata import version

    return {name: version(name) for name in ("tunesmith", "torch", "transformers", "peft", "accelerate", "datasets")}


def _run_summary(report: dict) -> dict:
    keys = ("steps", "train_loss", "trainable_parameters", "total_parameters", "seconds")
    return {k: report[k] for k in keys}


# ---------------------------------------------------------------------------------------------------
# Rendering


def format_table(report: dict) -> str:
    """One row per model and prompt style, one column per task cluster (Markdown, readable in a terminal)."""
    tasks = list(SEEN_TASKS) + [HELDOUT_TASK]
    n = {t: report["clusters"]["base"][t]["n"] for t in tasks}
    header = (["model", "prompt"] + [f"{TASK_LABELS[t]} ({n[t]})" for t in SEEN_TASKS] + ["seen clusters (mean)"]
              + [f"{HELDOUT_TASK}, held-out cluster ({n[HELDOUT_TASK]})"])
    p = report["prompting"]
    rows = [
        ["base (pretrained)", "plain text, zero-shot", _pct(p["zero_shot"])] + ["-"] * (len(tasks)),
        ["base (pretrained)", f"plain text, {p['shots']}-shot", _pct(p["few_shot"])] + ["-"] * (len(tasks)),
    ]
    for name in ("base", "tuned"):
        s = report["clusters"][name]
        rows.append([MODEL_LABELS[name], "chat, zero-shot"] + [_pct(s[t]) for t in SEEN_TASKS]
                    + [f"{100 * report['seen_clusters'][name]:.1f}%", _pct(s[HELDOUT_TASK])])
    if not report["alignment"]["ran"]:
        rows.append(["+ alignment (DPO)", report["alignment"]["status"]] + ["-"] * (len(tasks) + 1))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _pct(score: dict) -> str:
    return f"{100 * score['exact_match']:.1f}%"


def format_examples(report: dict, per_task: int = 1) -> str:
    """A few questions with both models' answers, for the terminal."""
    clusters = report["answers"]["clusters"]
    lines = ["Examples (zero-shot, chat template):"]
    for task in list(SEEN_TASKS) + [HELDOUT_TASK]:
        for b, t in list(zip(clusters["base"][task], clusters["tuned"][task]))[:per_task]:
            lines += [f"  [{task}] {_cell(b['prompt'])}", f"     reference: {_cell(b['reference'])}",
                      f"     base:  {_cell(b['prediction'])}", f"     tuned: {_cell(t['prediction'])}"]
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    """report.json (everything, every scored answer included) and report.md (the table, how to read it)."""
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "report.md").write_text("\n".join(_markdown(report)) + "\n", encoding="utf-8")


def _markdown(report: dict) -> list[str]:
    w, p, f = report["world"], report["prompting"], report["forgetting"]
    fact = report["clusters"]
    held = report["heldout_cluster"]
    lines = [
        "# tunesmith demo", "",
        format_table(report), "",
        f"A tiny Llama ({report['pretrain']['total_parameters']:,} parameters) was pretrained for "
        f"{report['pretrain']['steps']} steps on a synthetic corpus: the capitals, languages and currencies of "
        f"{w['countries']} invented countries in several phrasings, sums, short stories, reviews, and quiz pages "
        "that ask about sums and stories but never about a country. It was then LoRA-tuned for "
        f"{report['sft']['steps']} steps on FLAN-style templated tasks (fact QA about {w['sft_countries']} "
        "countries, arithmetic, sentiment, extraction); the "
        f"{held['task']} cluster ({held['cluster']}) was held out whole (chance: {100 * held['chance']:.1f}%).", "",
        "How to read it: every number is the share of greedy answers equal to the reference after normalising "
        f"case, spaces and trailing punctuation. Fact QA asks about the {w['heldout_countries']} held-out "
        "countries, whose facts come from pretraining only; arithmetic asks sums that the corpus states but "
        "never asks. Plain-text rows prompt the base model in the corpus's quiz format (\"Q: ...\\nA:\"), "
        f"after {p['shots']} solved questions about other countries in the few-shot row.", "",
        f"Knowledge probe (the corpus's phrasing, \"The capital of X is\"): base "
        f"{_pct(fact['base']['fact_completion'])}, tuned {_pct(fact['tuned']['fact_completion'])}.", "",
        f"Forgetting: {f['measure']}: {f['base']} (base) -> {f['tuned']} (tuned).", "",
        f"Alignment (DPO): {report['alignment']['status']}.", "",
        "Loss curves: ![pretraining](pretrain/loss.png) ![instruction tuning](sft/loss.png)", "",
        f"Seed {report['seed']}; {report['seconds']} s in all; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + ". The resolved configs of both runs are in report.json (and each run's config.yaml); every scored "
        "answer is in report.json under `answers`.", "",
        "## Answers (first 2 per cluster)", "",
        "| cluster | prompt | reference | base | tuned |", "|---|---|---|---|---|",
    ]
    clusters = report["answers"]["clusters"]
    for task in list(SEEN_TASKS) + [HELDOUT_TASK]:
        for b, t in list(zip(clusters["base"][task], clusters["tuned"][task]))[:2]:
            lines.append("| " + " | ".join([task] + [_cell(x) for x in (b["prompt"], b["reference"],
                                                                           b["prediction"], t["prediction"])]) + " |")
    return lines


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"
