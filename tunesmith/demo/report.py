"""The demo's report: metrics from the scored generations, the terminal table, report.json and report.md."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from tunesmith.data.instruct import get_task
from tunesmith.demo.evaluate import accuracy
from tunesmith.demo.tasks import HELDOUT_TASKS, NLI_LABELS, SEEN_TASKS
from tunesmith.demo.world import World

TASK_LABELS = {"qa": "fact QA", "arithmetic": "arithmetic", "sentiment": "sentiment", "extraction": "extraction",
               "paraphrase": "paraphrase", "completion": "sentence completion", "nli": "NLI"}
MODEL_LABELS = {"base": "base (pretrained)", "tuned": "base + LoRA instruction tuning",
                "aligned": "tuned + DPO (LoRA)"}


def build_report(world: World, size, prompting: dict[str, list[dict]], clusters: dict[str, dict[str, list[dict]]],
                 alignment: dict[str, list[dict]], forgetting: dict[str, float], runs: dict[str, dict],
                 seconds: float) -> dict:
    """Metrics per stage and model, every scored answer, and what produced them.

    Args:
        prompting: "zero_shot"/"few_shot" -> scored rows of the base model (plain text, fact QA).
        clusters: model -> task (and "fact_completion") -> scored rows (chat template, zero-shot).
        alignment: model ("tuned", "aligned") -> scored held-out preference pairs.
        forgetting: model -> perplexity on unseen corpus text.
        runs: stage ("pretrain", "sft", "dpo") -> the training run's report.
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
        "heldout_clusters": heldout_clusters(world),
        "alignment": {name: _preference_rates(rows) for name, rows in alignment.items()},
        "forgetting": {**forgetting, "measure": "perplexity on corpus_heldout.jsonl (documents no stage trained on)"},
        "answers": {"prompting": prompting, "clusters": clusters, "preferences": alignment},
        **{stage: _run_summary(run) for stage, run in runs.items()},
        "configs": {stage: run["config"] for stage, run in runs.items()},
        "versions": library_versions(),
        "seconds": round(seconds, 1),
    }


def heldout_clusters(world: World) -> dict[str, dict]:
    """What each held-out cluster is, how it is scored and what a guess would score: for completion, one of the
    world's values of the right kind (a capital for a capital); for NLI, one of its three labels."""
    return {
        "completion": {"cluster": get_task("completion").cluster, "chance": 1 / len(world.countries),
                       "metric": "the answer ends with the missing ending (strict exact match: strict_exact_match)"},
        "nli": {"cluster": get_task("nli").cluster, "chance": 1 / len(NLI_LABELS), "metric": "exact match"},
    }


def _preference_rates(rows: list[dict]) -> dict:
    """Share of pairs whose chosen answer is the more probable, and the mean log-probability margin (chosen minus
    rejected, in nats), overall and per kind of pair."""
    kinds = sorted({r["kind"] for r in rows})
    by_kind = {k: [r for r in rows if r["kind"] == k] for k in kinds}
    return {"preferred": accuracy(rows), "margin": _margin(rows), "n": len(rows),
            "by_kind": {k: accuracy(r) for k, r in by_kind.items()},
            "margin_by_kind": {k: _margin(r) for k, r in by_kind.items()}}


def _margin(rows: list[dict]) -> float:
    return round(sum(r["chosen_logp"] - r["rejected_logp"] for r in rows) / len(rows), 3) if rows else 0.0


def _score(rows: list[dict]) -> dict:
    """The cluster's accuracy (under "exact_match" for every cluster; for completion it is the `ends_with` rule,
    and the strict exact match is added as "strict_exact_match")."""
    score = {"exact_match": accuracy(rows), "n": len(rows)}
    if rows and "exact_match" in rows[0]:
        score["strict_exact_match"] = sum(r["exact_match"] for r in rows) / len(rows)
    return score


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
    tasks = list(SEEN_TASKS + HELDOUT_TASKS)
    n = {t: report["clusters"]["base"][t]["n"] for t in tasks}
    pairs = report["alignment"]["tuned"]["n"]
    header = (["model", "prompt"] + [f"{TASK_LABELS[t]} ({n[t]})" for t in SEEN_TASKS] + ["seen clusters (mean)"]
              + [f"{TASK_LABELS[t]}, held out ({n[t]})" for t in HELDOUT_TASKS]
              + [f"prefers the chosen answer ({pairs})", "perplexity, unseen corpus text"])
    p = report["prompting"]
    rows = [
        [MODEL_LABELS["base"], "plain text, zero-shot", _pct(p["zero_shot"])] + ["-"] * (len(tasks) + 2),
        [MODEL_LABELS["base"], f"plain text, {p['shots']}-shot", _pct(p["few_shot"])] + ["-"] * (len(tasks) + 2),
    ]
    for name in report["clusters"]:
        s = report["clusters"][name]
        preferred = report["alignment"].get(name)
        rows.append([MODEL_LABELS[name], "chat, zero-shot"] + [_pct(s[t]) for t in SEEN_TASKS]
                    + [f"{100 * report['seen_clusters'][name]:.1f}%"] + [_pct(s[t]) for t in HELDOUT_TASKS]
                    + [f"{100 * preferred['preferred']:.1f}%" if preferred else "-",
                       str(report["forgetting"][name])])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _pct(score: dict) -> str:
    return f"{100 * score['exact_match']:.1f}%"


def format_examples(report: dict, per_task: int = 1) -> str:
    """A few questions with every model's answer, for the terminal."""
    clusters = report["answers"]["clusters"]
    lines = ["Examples (zero-shot, chat template):"]
    for task in SEEN_TASKS + HELDOUT_TASKS:
        for i, row in enumerate(clusters["base"][task][:per_task]):
            lines += [f"  [{task}] {_cell(row['prompt'])}", f"     reference: {_cell(row['reference'])}"]
            lines += [f"     {name + ':':8} {_cell(rows[task][i]['prediction'])}" for name, rows in clusters.items()]
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    """report.json (everything, every scored answer included) and report.md (the table, how to read it)."""
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "report.md").write_text("\n".join(_markdown(report)) + "\n", encoding="utf-8")


def _markdown(report: dict) -> list[str]:
    w, p, f, a = report["world"], report["prompting"], report["forgetting"], report["alignment"]
    fact = report["clusters"]
    clusters = report["answers"]["clusters"]
    held = report["heldout_clusters"]
    strict = {name: scores["completion"]["strict_exact_match"] for name, scores in fact.items()}
    lines = [
        "# tunesmith demo", "",
        format_table(report), "",
        f"A tiny Llama ({report['pretrain']['total_parameters']:,} parameters) was pretrained for "
        f"{report['pretrain']['steps']} steps on a synthetic corpus: the capitals, languages and currencies of "
        f"{w['countries']} invented countries in several phrasings, sums, short stories, reviews, and quiz pages "
        "that ask about sums and stories but never about a country. It was then LoRA-tuned for "
        f"{report['sft']['steps']} steps on FLAN-style templated tasks (fact QA about {w['sft_countries']} "
        "countries, arithmetic, sentiment, extraction, paraphrases of fact sentences about the same countries). "
        "Two clusters were held out whole, no instruction of theirs in the tuning data: sentence completion "
        f"({held['completion']['cluster']}; the corpus's sentences about the {w['heldout_countries']} held-out "
        "countries cut before the fact, \"Complete the sentence: The capital of X is\"; chance, a guess among "
        f"the world's values of the right kind: {100 * held['completion']['chance']:.1f}%) and NLI "
        f"({held['nli']['cluster']}; chance {100 * held['nli']['chance']:.1f}%). "
        f"The tuning adapter was merged, and DPO trained a new LoRA adapter for {report['dpo']['steps']} steps on "
        "preference pairs about the SFT countries and asked sums (correct over another country's fact, concise "
        "over rambling, the sum over a sum off by one), with the merged tuned model as its reference.", "",
        "How to read it: every number is the share of greedy answers equal to the reference after normalising "
        "case, spaces and trailing punctuation, except sentence completion, where an answer counts when it ends "
        "with the missing ending (the ending alone, the completed sentence, or a sentence of the QA cluster's "
        "wording such as \"People in X speak Y.\"); by strict exact match (the ending or the completed sentence) "
        "completion scores " + ", ".join(f"{100 * v:.1f}% ({name})" for name, v in strict.items())
        + f". Fact QA asks about the {w['heldout_countries']} held-out "
        "countries, whose facts come from pretraining only; arithmetic asks sums that the corpus states but "
        "never asks. Plain-text rows prompt the base model in the corpus's quiz format (\"Q: ...\\nA:\"), "
        f"after {p['shots']} solved questions about other countries in the few-shot row. \"Prefers the chosen "
        f"answer\" is the share of {a['tuned']['n']} held-out preference pairs (about held-out countries and "
        "unasked sums) whose chosen answer gets the higher log-probability through the chat template.", "",
        "Preference by kind of pair, share preferred and mean margin log p(chosen) - log p(rejected): " + "; ".join(
            f"{kind} {100 * a['tuned']['by_kind'][kind]:.1f}%, {a['tuned']['margin_by_kind'][kind]} nats (tuned) -> "
            f"{100 * rate:.1f}%, {a['aligned']['margin_by_kind'][kind]} nats (aligned)"
            for kind, rate in a["aligned"]["by_kind"].items()) + ".", "",
        "Knowledge probe (the corpus's phrasing, \"The capital of X is\"): " + ", ".join(
            f"{name} {_pct(scores['fact_completion'])}" for name, scores in fact.items()) + ".", "",
        f"Forgetting: {f['measure']}: {f['base']} (base) -> {f['tuned']} (tuned) -> {f['aligned']} (aligned).", "",
        "Loss curves: ![pretraining](pretrain/loss.png) ![instruction tuning](sft/loss.png) "
        "![DPO](dpo/loss.png)", "",
        f"Seed {report['seed']}; {report['seconds']} s in all; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + ". The resolved configs of every run are in report.json (and each run's config.yaml); every scored "
        "answer is in report.json under `answers`.", "",
        "## Answers (first 2 per cluster)", "",
        "| cluster | prompt | reference | " + " | ".join(clusters) + " |", "|---|---|---|" + "---|" * len(clusters),
    ]
    for task in SEEN_TASKS + HELDOUT_TASKS:
        for i, row in enumerate(clusters["base"][task][:2]):
            cells = [row["prompt"], row["reference"]] + [rows[task][i]["prediction"] for rows in clusters.values()]
            lines.append("| " + " | ".join([task] + [_cell(x) for x in cells]) + " |")
    return lines


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"
