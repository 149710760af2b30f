"""`tunesmith demo`: the offline quickstart on the embedded synthetic world.

    world (seeded) -> corpus, task records, preference pairs            (tunesmith.demo.files)
      -> BPE tokenizer + random tiny Llama
      -> pretrain (full, clm)                                            configs/demo/pretrain.yaml
      -> base model: fact QA as plain text, zero-shot and few-shot
      -> instruction tuning (LoRA, FLAN templates, two clusters held out) configs/demo/sft_lora.yaml
      -> base and tuned model: every cluster zero-shot through the chat template
      -> alignment: SFT adapter merged, DPO with a new LoRA adapter      configs/demo/dpo.yaml
      -> aligned model: held-out preference pairs and every cluster
      -> forgetting: perplexity on unseen corpus text, base vs tuned vs aligned
      -> table on the terminal, report.md + report.json, loss curves

Nothing is hard-coded: every number comes from greedy generations scored against the world's data.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from tunesmith.config import Config, config_from_dict
from tunesmith.demo import evaluate as ev
from tunesmith.demo.files import WorldSize, write_world
from tunesmith.demo.report import build_report, format_examples, format_table, write_report
from tunesmith.demo.tasks import SEEN_TASKS
from tunesmith.demo.tiny import build_model, save_tiny, train_tokenizer
from tunesmith.demo.world import World, fact_completions, make_world, questions, read_questions
from tunesmith.errors import TunesmithError
from tunesmith.model.stops import set_stop_tokens
from tunesmith.track.logs import setup_logging
from tunesmith.train.run import train

log = logging.getLogger(__name__)

MARKER = ".tunesmith-demo"
# The recipes live with the other shipped configs at the repository root (an editable install finds them).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "demo"
# The shipped recipes name the paths `make demo` writes; a demo elsewhere moves every path under this prefix.
RECIPE_ROOT = "runs/demo"


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is. The default takes a few minutes on 2 CPU cores; tests use a smaller one."""

    num_countries: int = 48
    world: WorldSize = field(default_factory=WorldSize)
    vocab_size: int = 768
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    pretrain_steps: int | None = None  # None: train.max_steps of configs/demo/pretrain.yaml
    sft_steps: int | None = None  # None: train.max_steps of configs/demo/sft_lora.yaml
    dpo_steps: int | None = None  # None: train.max_steps of configs/demo/dpo.yaml
    shots: int = 1  # solved examples in the base model's few-shot prompts (more distract a model this small)
    max_new_tokens: int = 24


def run_demo(output_dir: str | Path, seed: int = 0, size: DemoSize = DemoSize()) -> dict:
    """Build the world, pretrain, evaluate the base, instruction-tune, evaluate again; print and write the report.

    Args:
        output_dir: replaced if it holds an earlier demo (it has the `.tunesmith-demo` marker); any other
            non-empty directory is refused.
        seed: the world, the initial weights and the data order all follow from it.
        size: model, data and step counts (smaller in tests).
    Returns:
        The report, also written to `output_dir/report.json` and `report.md`.
    """
    out = claim_output_dir(Path(output_dir))
    started = time.perf_counter()
    with _quiet_third_party(), _one_thread():
        setup_logging(None)
        world = make_world(seed, size.num_countries)
        paths = write_world(world, out / "data", size.world)
        log.info("world: %d countries (%d for tuning, %d held out), %s", len(world.countries),
                 len(world.sft_countries), len(world.heldout_countries), out / "data")
        build_base(paths["corpus"], out / "base-init", size, seed)
        pretrain = _train(demo_config("pretrain.yaml", out, seed, size.pretrain_steps))
        base_dir = Path(pretrain["config"]["train"]["output_dir"]) / "final"
        prompting = evaluate_prompting(world, paths, base_dir, size, seed)
        sft = _train(demo_config("sft_lora.yaml", out, seed, size.sft_steps))
        adapter_dir = Path(sft["config"]["train"]["output_dir"]) / "final"
        merged = out / "sft-merged"
        merge_adapter_quietly(adapter_dir, merged)
        dpo = _train(demo_config("dpo.yaml", out, seed, size.dpo_steps))
        aligned_dir = Path(dpo["config"]["train"]["output_dir"]) / "final"
        models = {"base": (base_dir, None), "tuned": (merged, None), "aligned": (merged, aligned_dir)}
        clusters = evaluate_clusters(world, paths, models, size, seed)
        alignment = evaluate_alignment(paths, models)
        forgetting = evaluate_forgetting(paths, models)
    report = build_report(world, size, prompting, clusters, alignment, forgetting,
                          {"pretrain": pretrain, "sft": sft, "dpo": dpo}, time.perf_counter() - started)
    write_report(out, report)
    print(format_table(report) + "\n\n" + format_examples(report))
    f = report["forgetting"]
    print(f"\nForgetting: perplexity on unseen corpus text {f['base']} (base) -> {f['tuned']} (tuned) -> "
          f"{f['aligned']} (aligned)")
    print(f"\nFull report: {out / 'report.md'}")
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
    texts = [row["text"] for row in ev.read_jsonl(corpus)]
    tokenizer = train_tokenizer(texts, vocab_size=size.vocab_size, bare_names=True)
    model = build_model("llama", vocab_size=len(tokenizer), hidden_size=size.hidden_size,
                        num_layers=size.num_layers, num_heads=size.num_heads, seed=seed)
    log.info("base: tiny Llama, %s parameters, vocabulary %d", f"{model.num_parameters():,}", len(tokenizer))
    return save_tiny(path, model, tokenizer)


def demo_config(name: str, out: Path, seed: int, max_steps: int | None = None) -> Config:
    """The shipped recipe `configs/demo/<name>` for a demo in `out`: every path under `runs/demo` moved to
    `out`, the demo's seed, its own prepared-data cache, and the step count when the size asks for one.

    Everything else comes from the YAML file, so the demo and the shipped config cannot drift apart.
    """
    path = CONFIG_DIR / name
    if not path.is_file():
        raise TunesmithError(f"{path}: the demo's config is missing (run the demo from a source checkout)")
    raw = _rebase(yaml.safe_load(path.read_text(encoding="utf-8")), str(out))
    raw["train"]["seed"] = seed
    # Prepared-data caches stay inside the demo's directory, so a rerun or `rm -r` leaves nothing behind.
    raw["data"]["cache_dir"] = str(out / "cache")
    if max_steps is not None:
        raw["train"]["max_steps"] = max_steps
    return config_from_dict(raw)


def _rebase(node: Any, out: str) -> Any:
    if isinstance(node, dict):
        return {k: _rebase(v, out) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase(v, out) for v in node]
    if isinstance(node, str) and (node == RECIPE_ROOT or node.startswith(RECIPE_ROOT + "/")):
        return out + node[len(RECIPE_ROOT):]
    return node


def _train(cfg: Config) -> dict:
    report = train(cfg)
    setup_logging(None)  # train() logged into its run's train.log; the demo's own lines go to the terminal only
    return report


# ---------------------------------------------------------------------------------------------------
# Stages after training: each loads the models it needs and returns scored rows


def evaluate_prompting(world: World, paths: dict[str, Path], base_dir: Path, size: DemoSize, seed: int
                       ) -> dict[str, list[dict]]:
    """The base model on fact questions about held-out countries as plain text: zero-shot and `size.shots`-shot
    (exemplars about SFT countries)."""
    from transformers import AutoTokenizer

    from tunesmith.model.load import load_model

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = load_model(str(base_dir))
    items = read_questions(paths["eval_heldout"])
    pool = questions(world, world.sft_countries)
    log.info("evaluating the base model: fact QA as plain text, 0-shot and %d-shot", size.shots)
    return {
        "zero_shot": ev.score_completions(model, tokenizer, ev.qa_prompts(items, pool, 0, seed), size.max_new_tokens),
        "few_shot": ev.score_completions(model, tokenizer, ev.qa_prompts(items, pool, size.shots, seed),
                                         size.max_new_tokens),
    }


def _completion_prompts(world: World) -> list[ev.Prompt]:
    # the continuation up to its first full stop must be the fact
    return [ev.Prompt(prompt, (fact,)) for prompt, fact in fact_completions(world, world.heldout_countries)]


def merge_adapter_quietly(adapter_dir: Path, output: Path) -> None:
    """The instruction-tuned model as a plain checkpoint (`tunesmith merge`): DPO's starting point and its
    reference, so that the reference is the tuned model, not the base under it."""
    from tunesmith.export.merge import merge_command

    with contextlib.redirect_stdout(io.StringIO()):  # merge prints its one-line summary; the log has it too
        report = merge_command(str(adapter_dir), str(output))
    log.info("merged the instruction-tuning adapter into the base: %s (max logit difference %.1e)", output,
             report["max_logit_diff"])


def load_stage_model(base: Path, adapter: Path | None):
    """A model of the demo: a checkpoint, with a LoRA adapter on top when given (loaded with plain PEFT, as a
    user would)."""
    from tunesmith.model.load import load_model

    model = load_model(str(base))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


def evaluate_clusters(world: World, paths: dict[str, Path], models: dict[str, tuple[Path, Path | None]],
                      size: DemoSize, seed: int) -> dict[str, dict[str, list[dict]]]:
    """Every model, zero-shot through the chat template, on the test records of every seen task and on the
    held-out clusters' records (rendered with the templates the pipeline uses, non-inverted); and the corpus's
    own phrasing ("The capital of X is") as a probe of what each model knows without any prompt format.
    Sentence completion counts an answer that ends with the missing ending (`evaluate.ends_with`).

    Args:
        models: name -> (checkpoint, adapter or None).
    Returns:
        model name -> task (or "fact_completion") -> scored rows.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["tuned"][0])  # saved by the tuning run, with its template
    prompts = {task: ev.task_prompts(ev.read_jsonl(paths[f"{task}_test"]), task, seed) for task in SEEN_TASKS}
    prompts["completion"] = ev.completion_prompts(ev.read_jsonl(paths["completion"]), seed)
    prompts["nli"] = ev.task_prompts(ev.read_jsonl(paths["nli"]), "nli", seed)
    probe = _completion_prompts(world)
    results = {}
    for name, (checkpoint, adapter) in models.items():
        model = load_stage_model(checkpoint, adapter)
        # The base model (pretrained on raw text) has no end-of-turn stop token; use the chat template's.
        set_stop_tokens(model, tokenizer)
        log.info("evaluating the %s model: %d clusters zero-shot", name, len(prompts))
        results[name] = {task: ev.score_chats(model, tokenizer, p, size.max_new_tokens,
                                              ev.ends_with if task == "completion" else ev.exact_match)
                         for task, p in prompts.items()}
        results[name]["fact_completion"] = ev.score_completions(model, tokenizer, probe, 8, stop=".")
    return results


def evaluate_alignment(paths: dict[str, Path], models: dict[str, tuple[Path, Path | None]]) -> dict[str, list[dict]]:
    """The tuned and the aligned model on preference pairs about held-out countries and unasked sums: does each
    give the chosen answer a higher log-probability than the rejected one?

    Returns:
        model name ("tuned", "aligned") -> one row per pair.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["tuned"][0])
    pairs = ev.read_jsonl(paths["preference_heldout"])
    log.info("evaluating preferences: %d held-out pairs, tuned vs aligned", len(pairs))
    return {name: ev.score_preferences(load_stage_model(*models[name]), tokenizer, pairs)
            for name in ("tuned", "aligned")}


def evaluate_forgetting(paths: dict[str, Path], models: dict[str, tuple[Path, Path | None]]) -> dict[str, float]:
    """Perplexity of every model on corpus-like documents no stage trained on: what tuning cost the model on the
    kind of text it was pretrained on."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["tuned"][0])
    texts = [row["text"] for row in ev.read_jsonl(paths["corpus_heldout"])]
    return {name: ev.perplexity(load_stage_model(*spec), tokenizer, texts) for name, spec in models.items()}


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
