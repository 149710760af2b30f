"""`tunesmith demo --real` (`make demo-real`, `python -m tunesmith.demo.real`): the quickstart on a real model.

    invented countries (seeded)  -> training rows, held-out questions, eval files    (tunesmith.demo.real_data)
      -> SmolLM2-135M-Instruct from its package, converted once                     (tunesmith.model.sources)
      -> LoRA SFT, `tunesmith train` with the recipe below; the forgetting guard      (tunesmith.train)
         watches the perplexity of general text before step 1 and after the last
      -> the update kept at the recipe's weight, `tunesmith interpolate` (WiSE-FT)    (tunesmith.export)
      -> base and tuned on the same sets, `tunesmith eval --compare`                 (tunesmith.eval)
      -> the tuned run exported to GGUF, `tunesmith export --format gguf`            (tunesmith.export)
      -> the same questions answered by the real llama.cpp, when it is built         (make llama-cpp)
      -> results.md + results.json in the output directory, the table on the terminal

Every number comes from greedy answers scored by `real_data.contains_answer` and from perplexity computed by
the eval harness; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.compat import check_versions
from tunesmith.config import Config, config_from_dict
from tunesmith.demo.real_data import chat, contains_answer, first_sentence, write_data
from tunesmith.demo.real_world_questions import REPLAY_QUESTIONS
from tunesmith.demo.real_report import SETS, format_table, results, write_results
from tunesmith.demo.run import _one_thread, _quiet_third_party, claim_output_dir
from tunesmith.demo.world import make_world
from tunesmith.errors import TunesmithError
from tunesmith.eval.items import read_items
from tunesmith.track.logs import setup_logging

log = logging.getLogger(__name__)

MODEL = "smollm2-135m-instruct"
SCORER = "tunesmith.demo.real_data:contains_answer"
DEFAULT_OUTPUT = "runs/demo-real"


@dataclass(frozen=True)
class Recipe:
    """What is taught and how: the best of the recipes measured (docs/PERFORMANCE.md, "The real-model quickstart").

    LoRA on every MLP, then the update kept at 0.65 of its size (`tunesmith interpolate`, WiSE-FT): at full size
    the tuned model answered every held-out question but kept 78% of the real-world answers; at 0.65 it still
    answered 89% of the held-out ones and kept 93%. No recipe trained to a smaller update (a lower learning rate,
    fewer epochs or blocks, a lower rank) kept as much while learning the facts."""

    num_countries: int = 6  # 3 facts each
    paraphrases: int = 8  # training questions per fact (real_data.TRAIN_QUESTIONS)
    replay_weight: float = 2.0  # each replay row (the base's own answers to other questions) this many times
    lora_r: int = 16
    lora_alpha: float = 32.0
    target_modules: str = r".*\.mlp\.(gate|up|down)_proj"  # a regex, as peft reads one
    lr: float = 1e-3
    epochs: int = 3
    adapter_weight: float = 0.65  # share of the trained update kept (`tunesmith interpolate --weight`); 1: all
    micro_batch_size: int = 8
    max_seq_len: int = 128
    max_new_tokens: int = 32  # per answer, in evaluation and in llama.cpp
    gguf_quant: str = "q8_0"
    forgetting_max_drop: float = 10.0  # percent the general text's perplexity may rise before the guard warns


STAGES = ("model", "data", "train", "evaluate", "export", "llama.cpp")
GUARDED = ("general_text",)  # watched by the forgetting guard while training: cheap to score
EVALUATED_GENERAL = ("real_world", "general_text")  # the forgetting section of the comparison


def run_real_demo(output_dir: str | Path = DEFAULT_OUTPUT, seed: int = 0, recipe: Recipe = Recipe(),
                  threads: int = 1) -> dict:
    """Teach SmolLM2 the invented countries, evaluate base and tuned, export to GGUF, answer with llama.cpp.

    Args:
        output_dir: replaced if it holds an earlier demo (its marker file); any other non-empty directory is
            refused.
        seed: the countries, their facts and the training order follow from it.
        threads: torch threads (one is fastest on 2 shared cores, see `run._one_thread`).
    Returns:
        The results, also written to `output_dir/results.json` and `results.md`.
    """
    out = claim_output_dir(Path(output_dir))
    started = time.perf_counter()
    timings: dict[str, float] = {}
    with _quiet_third_party(), _threads(threads):
        setup_logging(None)
        with _stage(1, timings, "model"):
            base = _resolve_base()
        with _stage(2, timings, "data"):
            world = make_world(seed, recipe.num_countries)
            paths = write_data(world, out / "data", recipe.paraphrases, replay_rows(base, recipe.max_new_tokens))
        with _stage(3, timings, "train"):
            run = _train(real_config(paths, out, seed, recipe))
            tuned = _interpolate(run, out / "tuned", recipe.adapter_weight)
        with _stage(4, timings, "evaluate"):
            evaluation = _evaluate(real_config(paths, out, seed, recipe, EVALUATED_GENERAL), tuned)
        with _stage(5, timings, "export"):
            gguf = _export(tuned, out, recipe.gguf_quant)
        questions = asked_questions(paths)
        with _stage(6, timings, "llama.cpp"):
            llama = answer_with_llama_cpp(gguf, questions, recipe.max_new_tokens)
    report = results(evaluation, llama, {s: [q for q, _ in rows] for s, rows in questions.items()}, recipe, seed,
                     world, run, timings, time.perf_counter() - started)
    write_results(out, report)
    print("\n" + format_table(report))
    print(f"\nFull results: {out / 'results.md'}")
    return report


def real_config(paths: dict[str, Path], out: Path, seed: int, recipe: Recipe,
                general: tuple[str, ...] = GUARDED) -> Config:
    """The run's config: LoRA SFT of SmolLM2 on the training rows and the replay rows (its own chat template and
    default system prompt), with the three eval sets.

    Args:
        general: the eval sets that measure forgetting (`eval.general`). In training, the forgetting guard scores
            them before the first step and after the last and warns on a larger drop than the recipe allows
            (GUARDED: the general text, a few seconds each time); `tunesmith eval --compare` reports their
            change from base to tuned (EVALUATED_GENERAL: the real-world questions too).
    """
    r = recipe
    generate = {"kind": "generate", "metrics": [], "scorer": SCORER, "max_new_tokens": r.max_new_tokens}
    return config_from_dict({
        "model": {"name_or_path": MODEL},
        "data": {"train": [str(paths["train"]), {"path": str(paths["replay"]), "weight": r.replay_weight}],
                 "max_seq_len": r.max_seq_len, "split": {"validation": 0},
                 "cache_dir": str(out / "cache")},
        "strategy": {"name": "lora", "lora": {"r": r.lora_r, "alpha": r.lora_alpha, "dropout": 0.0,
                                              "target_modules": r.target_modules}},
        "train": {"output_dir": str(out / "run"), "objective": "sft", "epochs": r.epochs,
                  "micro_batch_size": r.micro_batch_size, "grad_accum": 1, "lr": r.lr, "scheduler": "cosine",
                  "warmup_ratio": 0.05, "seed": seed, "log_every": 5, "probe_memory": False},
        "eval": {"batch_size": 8, "examples": 1000, "output_dir": str(out / "eval"),
                 "forgetting_max_drop": r.forgetting_max_drop, "on_forgetting": "warn",
                 "general": list(general),
                 "sets": [{"name": "heldout", "path": str(paths["heldout"]), **generate},
                          {"name": "real_world", "path": str(paths["real_world"]), **generate},
                          {"name": "general_text", "path": str(paths["general_text"]), "kind": "loss"}]},
    })


def _resolve_base() -> Path:
    from tunesmith.model.sources import resolve_model_path

    path = Path(resolve_model_path(MODEL))
    log.info("base model: %s (%s)", MODEL, path)
    return path


def replay_rows(base: Path, max_new_tokens: int) -> list[dict]:
    """The base model's own answers to REPLAY_QUESTIONS (greedy, through its chat template), each cut to its
    first sentence, as training rows: those whose first sentence holds an accepted answer.

    Self-distillation of what the base already gets right: these rows add no knowledge, they show the run real
    countries answered as the base answers them, beside the invented ones, so that "the capital of <country> is
    <invented name>" does not become the answer to every capital question.
    """
    from tunesmith.eval.generate import generate_greedy
    from tunesmith.eval.models import load_for_eval

    loaded = load_for_eval(str(base))
    questions = [[{"role": "user", "content": q}] for q, _ in REPLAY_QUESTIONS]
    answers = generate_greedy(loaded.model, loaded.tokenizer, questions, max_new_tokens, 8)
    rows = []
    for (question, accepted), answer in zip(REPLAY_QUESTIONS, answers):
        sentence = first_sentence(answer)
        if sentence and contains_answer(sentence, "|".join(accepted)):
            rows.append(chat(question, sentence))
    log.info("replay: the base model's own right answers to %d of %d other questions", len(rows),
             len(REPLAY_QUESTIONS))
    return rows


def _train(cfg: Config) -> Path:
    from tunesmith.train.run import train

    train(cfg)
    setup_logging(None)  # train() logged into its run's train.log; the demo's own lines go to the terminal
    return Path(cfg.train.output_dir)


def _interpolate(run: Path, output: Path, weight: float) -> Path:
    """`tunesmith interpolate RUN --weight WEIGHT`: the run with its update scaled (the run itself at 1)."""
    if weight == 1:
        return run
    from tunesmith.export.interpolate import interpolate_command

    interpolate_command(str(run), str(output), weight)
    return output


def _evaluate(cfg: Config, run: Path) -> dict:
    """`tunesmith eval --compare BASE RUN` on the config's sets: every answer of both models, scored."""
    from tunesmith.eval.command import eval_command

    report = eval_command(cfg, compare=[MODEL, str(run)])
    setup_logging(None)
    return report


def _export(run: Path, out: Path, quant: str) -> Path:
    """`tunesmith export RUN --format gguf --quant QUANT`: the adapter merged into the base, written as GGUF."""
    from tunesmith.export.command import export_command

    gguf = out / f"tuned-{quant}.gguf"
    with contextlib.redirect_stdout(io.StringIO()):  # its one-line summary; the stage line says the same
        export_command(str(run), str(gguf), fmt="gguf", quant=quant)
    log.info("exported %s (%.0f MB)", gguf, gguf.stat().st_size / 1e6)
    return gguf


def asked_questions(paths: dict[str, Path]) -> dict[str, list[tuple[str, str]]]:
    """The held-out and real-world sets as (question, reference) pairs, read as the eval harness reads them."""
    return {name: [(item.prompt[-1]["content"], item.answer) for item in read_items(str(paths[name]), "generate")]
            for name in SETS}


def answer_with_llama_cpp(gguf: Path, questions: dict[str, list[tuple[str, str]]], max_tokens: int
                          ) -> dict | None:
    """The held-out and real-world questions answered by llama.cpp's `llama-completion` from the GGUF file
    (greedy, through the chat template the file carries), scored as the eval harness scores them.

    Returns:
        set name -> rows {"question", "reference", "prediction", "correct"}; None when llama.cpp is not built.
    """
    from tqdm import tqdm

    from tunesmith.export.llama_cpp import complete, find

    llama = find()
    if llama is None:
        print("llama.cpp is not built: skipping its answers (make llama-cpp builds it once, ~8 min)")
        return None
    answers: dict[str, list[dict]] = {}
    with tqdm(total=sum(map(len, questions.values())), desc="llama.cpp answers", unit="question") as bar:
        for name, pairs in questions.items():
            answers[name] = []
            for question, reference in pairs:
                prediction = complete(llama, gguf, question, max_tokens=max_tokens, threads=torch.get_num_threads())
                answers[name].append({"question": question, "reference": reference, "prediction": prediction,
                                      "correct": bool(contains_answer(prediction, reference))})
                bar.update()
    return answers


@contextlib.contextmanager
def _stage(number: int, timings: dict[str, float], name: str):
    """Announce a stage, time it, and say when it is done."""
    print(f"[{number}/{len(STAGES)}] {name} ...", flush=True)
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 1)
    print(f"[{number}/{len(STAGES)}] {name}: done in {timings[name]:.0f} s", flush=True)


@contextlib.contextmanager
def _threads(count: int):
    if count == 1:
        with _one_thread():
            yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> int:
    """`python -m tunesmith.demo.real [--output-dir DIR] [--seed N]`."""
    parser = argparse.ArgumentParser(prog="python -m tunesmith.demo.real", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on shared cores)")
    args = parser.parse_args(argv)
    try:
        check_versions()
        run_real_demo(args.output_dir, seed=args.seed, threads=args.threads)
    except TunesmithError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
