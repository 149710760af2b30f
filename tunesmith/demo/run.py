"""`tunesmith demo`: the offline quickstart on the embedded synthetic world.

    world (seeded) -> corpus + SFT rows + held-out questions -> BPE tokenizer + random tiny Llama
      -> pretrain (full, clm; configs/demo/pretrain.yaml) -> LoRA SFT (chatml; configs/demo/sft_lora.yaml)
      -> greedy answers of base and tuned model -> table, demo_report.json, demo_report.md

The headline number is exact match on questions about held-out countries: their facts are only in the
pretraining corpus, never in SFT, so a rise shows instruction tuning unlocking what pretraining stored.
Nothing is hard-coded: every number comes from greedy generations scored against the world's facts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from tunesmith.config import Config, config_from_dict
from tunesmith.data.tokenize import Example
from tunesmith.demo.tiny import build_model, save_tiny, train_tokenizer
from tunesmith.demo.world import QA, World, fact_completions, make_world, read_questions, write_world
from tunesmith.errors import TunesmithError
from tunesmith.eval.generate import complete_greedy, generate_greedy
from tunesmith.eval.metrics import exact_match
from tunesmith.track.logs import setup_logging
from tunesmith.train.run import set_generation_eos, train

log = logging.getLogger(__name__)

MARKER = ".tunesmith-demo"
# The recipes live with the other shipped configs at the repository root (an editable install finds them).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "demo"
MODELS = ("base", "tuned")


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is. The default takes under a minute on 2 free CPU cores; tests use a smaller one."""

    num_countries: int = 48
    vocab_size: int = 768
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    pretrain_steps: int | None = None  # None: train.max_steps of configs/demo/pretrain.yaml
    sft_steps: int | None = None  # None: train.max_steps of configs/demo/sft_lora.yaml
    max_new_tokens: int = 24


def run_demo(output_dir: str | Path, seed: int = 0, size: DemoSize = DemoSize()) -> dict:
    """Build the world, pretrain, LoRA-tune, evaluate before/after; print the table and write the report.

    Args:
        output_dir: replaced if it holds an earlier demo (it has the `.tunesmith-demo` marker); any other
            non-empty directory is refused.
        seed: the world, the initial weights and the data order all follow from it.
        size: model, data and step counts (smaller in tests).
    Returns:
        The report, also written to `output_dir/demo_report.json` and `demo_report.md`.
    """
    out = claim_output_dir(Path(output_dir))
    started = time.perf_counter()
    with _quiet_third_party(), _one_thread():
        setup_logging(None)
        world = make_world(seed, size.num_countries)
        paths = write_world(world, out / "data")
        log.info("world: %d countries (%d for SFT questions, %d held out), %s", len(world.countries),
                 len(world.sft_countries), len(world.heldout_countries), out / "data")
        init_dir = build_base(paths["corpus"], out / "base-init", size, seed)
        pretrain = _train(demo_config("pretrain.yaml", run_overrides(
            init_dir, paths["corpus"], out / "pretrain", seed, size.pretrain_steps)))
        sft = _train(demo_config("sft_lora.yaml", run_overrides(
            out / "pretrain" / "final", paths["sft"], out / "sft", seed, size.sft_steps)))
        results = evaluate(world, paths, out / "pretrain" / "final", out / "sft" / "final", size.max_new_tokens)
        perplexity = forgetting(paths["corpus"], out / "pretrain" / "final", out / "sft" / "final")
    report = build_report(world, size, results, perplexity, pretrain, sft, time.perf_counter() - started)
    write_report(out, report)
    print(format_table(report) + "\n\n" + format_examples(report["heldout_answers"][:3]))
    p = report["corpus_perplexity"]
    print(f"\nForgetting: perplexity on the pretraining corpus {p['base']} (base) -> {p['tuned']} (tuned)")
    print(f"\nFull report: {out / 'demo_report.md'}")
    return report


def claim_output_dir(path: Path) -> Path:
    """Create `path` for the demo, replacing an earlier demo there; refuse anything else.

    Raises:
        TunesmithError: `path` is a file, or a non-empty directory without the demo's marker file.
    """
    if path.exists() and not path.is_dir():
        raise TunesmithError(f"--output-dir {path}: exists and is not a directory")
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).is_file():
            raise TunesmithError(
                f"--output-dir {path}: not empty and not written by `tunesmith demo` (no {MARKER} file); "
                "choose another directory"
            )
        shutil.rmtree(path)  # only ever a directory an earlier demo wrote
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("written by `tunesmith demo`; the next demo run here replaces this directory\n")
    return path


def build_base(corpus: Path, path: Path, size: DemoSize, seed: int) -> Path:
    """Train a BPE tokenizer on the corpus and save it with a randomly initialised tiny Llama at `path`."""
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    tokenizer = train_tokenizer(texts, vocab_size=size.vocab_size)
    model = build_model("llama", vocab_size=len(tokenizer), hidden_size=size.hidden_size,
                        num_layers=size.num_layers, num_heads=size.num_heads, seed=seed)
    log.info("base: tiny Llama, %s parameters, vocabulary %d", f"{model.num_parameters():,}", len(tokenizer))
    return save_tiny(path, model, tokenizer)


def demo_config(name: str, overrides: dict[str, Any]) -> Config:
    """The shipped recipe `configs/demo/<name>` with dotted-key overrides (this run's paths, seed ...).

    Everything not overridden comes from the YAML file, so the demo and the shipped config cannot drift apart.
    """
    path = CONFIG_DIR / name
    if not path.is_file():
        raise TunesmithError(f"{path}: the demo's config is missing (run the demo from a source checkout)")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return config_from_dict(raw)


def run_overrides(model: Path, train_file: Path, run_dir: Path, seed: int, max_steps: int | None) -> dict[str, Any]:
    """What the demo sets in a recipe: its own paths and seed, and the step count when the size asks for one."""
    overrides: dict[str, Any] = {
        "model.name_or_path": str(model), "data.train": [str(train_file)], "train.output_dir": str(run_dir),
        "train.seed": seed,
        # Prepared-data caches stay inside the demo's directory, so a rerun or `rm -r` leaves nothing behind.
        "data.cache_dir": str(run_dir.parent / "cache"),
    }
    if max_steps is not None:
        overrides["train.max_steps"] = max_steps
    return overrides


def _train(cfg: Config) -> dict:
    report = train(cfg)
    setup_logging(None)  # train() logged into its run's train.log; the demo's own lines go to the terminal only
    return report


# ---------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(world: World, paths: dict[str, Path], base_dir: Path, adapter_dir: Path,
             max_new_tokens: int) -> dict[str, dict]:
    """Greedy answers of the base and of base + adapter, scored by exact match.

    Returns:
        model name -> {"qa_heldout": [...], "qa_sft": [...], "fact_completion": [...]}, each a list of
        scored rows.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tunesmith.model.load import load_model

    # The SFT run saved the tokenizer with its chat template next to the adapter.
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    questions = {"qa_heldout": read_questions(paths["eval_heldout"]), "qa_sft": read_questions(paths["eval_sft"])}
    completions = fact_completions(world, world.heldout_countries)
    results = {}
    for name in MODELS:
        model = load_model(str(base_dir))
        if name == "tuned":
            model = PeftModel.from_pretrained(model, str(adapter_dir))  # the plain PEFT loader, as a user would
        # The base model (pretrained on raw text) has no end-of-turn stop token; use the chat template's.
        set_generation_eos(model, tokenizer)
        results[name] = {key: score_questions(model, tokenizer, rows, max_new_tokens)
                         for key, rows in questions.items()}
        results[name]["fact_completion"] = score_completions(model, tokenizer, completions)
    return results


def forgetting(corpus: Path, base_dir: Path, adapter_dir: Path) -> dict[str, float]:
    """Perplexity of base and tuned model on the pretraining corpus (token-weighted): what SFT cost the model
    on the data it learnt its facts from."""
    from accelerate import Accelerator
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tunesmith.data.tokenize import encode_text
    from tunesmith.model.load import load_model
    from tunesmith.objectives import OBJECTIVES
    from tunesmith.train.loop import evaluate_loss

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    examples = [Example(*encode_text(tokenizer, json.loads(line)["text"]))
                for line in corpus.read_text(encoding="utf-8").splitlines() if line]
    perplexity = {}
    for name in MODELS:
        model = load_model(str(base_dir))
        if name == "tuned":
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        loss = evaluate_loss(model, OBJECTIVES["clm"], examples, 32, tokenizer.pad_token_id, Accelerator(cpu=True))
        perplexity[name] = round(math.exp(loss), 3)
    return perplexity


def score_questions(model, tokenizer, rows: list[QA], max_new_tokens: int) -> list[dict]:
    """Each question answered through the chat template, greedily, and checked by exact match."""
    predictions = generate_greedy(model, tokenizer, [qa.messages(with_answer=False) for qa in rows],
                                  max_new_tokens=max_new_tokens)
    return [{"question": qa.question, "reference": qa.answer, "prediction": p, "correct": exact_match(p, qa.answer)}
            for qa, p in zip(rows, predictions)]


def score_completions(model, tokenizer, rows: list[tuple[str, str]], max_new_tokens: int = 8) -> list[dict]:
    """Corpus-style prompts ("The capital of X is"): is the text up to the first full stop the fact?

    This probes what the model knows without the chat format, before and after SFT.
    """
    continuations = complete_greedy(model, tokenizer, [prompt for prompt, _ in rows], max_new_tokens)
    return [{"prompt": prompt, "reference": fact, "prediction": c,
             "correct": exact_match(c.split(".")[0], fact)} for (prompt, fact), c in zip(rows, continuations)]


# ---------------------------------------------------------------------------------------------------
# Report


def accuracy(rows: list[dict]) -> float:
    """Share of scored rows marked correct (0.0 for none)."""
    return sum(r["correct"] for r in rows) / len(rows) if rows else 0.0


def build_report(world: World, size: DemoSize, results: dict[str, dict], perplexity: dict[str, float],
                 pretrain: dict, sft: dict, seconds: float) -> dict:
    """Metrics per model, the held-out answers side by side, and what produced them."""
    metrics = {name: {key: {"exact_match": accuracy(rows), "n": len(rows)} for key, rows in r.items()}
               for name, r in results.items()}
    heldout = [{"question": b["question"], "reference": b["reference"], "base": b["prediction"],
                "tuned": t["prediction"], "base_correct": b["correct"], "tuned_correct": t["correct"]}
               for b, t in zip(results["base"]["qa_heldout"], results["tuned"]["qa_heldout"])]
    return {
        "seed": world.seed,
        "size": asdict(size),
        "world": {"countries": len(world.countries), "sft_countries": len(world.sft_countries),
                  "heldout_countries": len(world.heldout_countries)},
        "metrics": metrics,
        "corpus_perplexity": perplexity,
        "heldout_answers": heldout,
        "pretrain": _run_summary(pretrain),
        "sft": _run_summary(sft),
        "configs": {"pretrain": pretrain["config"], "sft": sft["config"]},
        "versions": library_versions(),
        "seconds": round(seconds, 1),
    }


def library_versions() -> dict[str, str]:
    """The versions a result depends on, for the report."""
    from importlib.metadata import version

    return {name: version(name) for name in ("tunesmith", "torch", "transformers", "peft", "accelerate", "datasets")}


def _run_summary(report: dict) -> dict:
    keys = ("steps", "train_loss", "trainable_parameters", "total_parameters", "seconds")
    return {k: report[k] for k in keys}


TABLE_COLUMNS = (
    ("qa_heldout", "QA exact match, held-out countries"),
    ("qa_sft", "QA exact match, SFT countries"),
    ("fact_completion", "fact completion, held-out countries"),
)
MODEL_LABELS = {"base": "base (pretrained)", "tuned": "base + LoRA SFT"}


def format_table(report: dict) -> str:
    """The before/after table as Markdown (readable in a terminal too)."""
    header = "| model | " + " | ".join(label for _, label in TABLE_COLUMNS) + " |"
    lines = [header, "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for name in MODELS:
        m = report["metrics"][name]
        cells = [f"{100 * m[key]['exact_match']:.1f}% of {m[key]['n']}" for key, _ in TABLE_COLUMNS]
        lines.append(f"| {MODEL_LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_examples(rows: list[dict]) -> str:
    """A few held-out questions with both models' answers, for the terminal."""
    lines = ["Held-out questions (their countries were never asked about in SFT):"]
    for row in rows:
        lines += [f"  Q: {row['question']}", f"     base:  {_cell(row['base'])}", f"     tuned: {_cell(row['tuned'])}"]
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    """demo_report.json (everything) and demo_report.md (the table, how to read it, a few answers)."""
    (out / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    w = report["world"]
    lines = [
        "# tunesmith demo", "",
        format_table(report), "",
        f"A tiny Llama ({report['pretrain']['total_parameters']:,} parameters) was pretrained for "
        f"{report['pretrain']['steps']} steps on a corpus stating the facts of {w['countries']} invented "
        f"countries, then LoRA-tuned for {report['sft']['steps']} steps on questions about {w['sft_countries']} "
        f"of them. The {w['heldout_countries']} held-out countries were never asked about in SFT: their facts "
        "come from pretraining only. Exact match compares greedy answers with the reference sentence after "
        "normalising case, spaces and trailing punctuation. Fact completion prompts in the corpus's own "
        "phrasing (\"The capital of X is\"), without the chat format.", "",
        f"Forgetting: perplexity on the pretraining corpus {report['corpus_perplexity']['base']} (base) -> "
        f"{report['corpus_perplexity']['tuned']} (tuned).", "",
        "Loss curves: ![pretraining](pretrain/loss.png) ![LoRA SFT](sft/loss.png)", "",
        f"Seed {report['seed']}; {report['seconds']} s in all; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + ". The resolved configs of both runs are in demo_report.json (and each run's config.yaml).", "",
        "## Held-out answers (first 6)", "",
        "| question | reference | base | tuned |", "|---|---|---|---|",
    ]
    for row in report["heldout_answers"][:6]:
        lines.append("| " + " | ".join(_cell(row[k]) for k in ("question", "reference", "base", "tuned")) + " |")
    (out / "demo_report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"


# ---------------------------------------------------------------------------------------------------
# Process settings for the demo's duration


@contextlib.contextmanager
def _quiet_third_party() -> Iterator[None]:
    """Hide output that says nothing about the demo: transformers' per-file progress bars, bitsandbytes'
    notice about a 4-bit CPU kernel (nothing is quantised here), a deprecation inside PEFT."""
    from transformers.utils import logging as hf_logging

    bnb = logging.getLogger("bitsandbytes")
    level, bars = bnb.level, hf_logging.is_progress_bar_enabled()
    bnb.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        bnb.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread. The demo's matrices are too small for a second thread to pay off, and when
    another process competes for the cores, threads wait on each other at every op: on 2 busy cores the default
    demo took 228-272 s with two threads and 44-52 s with one (same results)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
