"""Trial recipes for the real-model quickstart (`make demo-real`): one recipe per call, the tuned model only.

    .venv/bin/python benchmarks/demo_real_trials.py OUT [--threads 2] [RECIPE_FIELD=VALUE ...]
    .venv/bin/python benchmarks/demo_real_trials.py runs/trial-lr1e-3 lr=1e-3 epochs=4
    .venv/bin/python benchmarks/demo_real_trials.py runs/trial-mlp 'target_modules=.*\\.mlp\\.(gate|up|down)_proj'

The same data, training run and scoring as `tunesmith.demo.real.run_real_demo` with the fields given replacing
the defaults of `Recipe`; it skips what does not depend on the recipe (the base model's scores: 0% held out, 100%
of the real-world questions by construction, perplexity 18.67 on the general text) and the export. Prints one
line per eval set and writes OUT/trial.json (recipe, metrics, every wrong answer). The table of trials and what it
says: docs/PERFORMANCE.md, "The real-model quickstart".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from tunesmith.demo.real import EVALUATED_GENERAL, MODEL, SCORER, Recipe, _train, real_config, replay_rows
from tunesmith.demo.real_data import contains_answer, write_data
from tunesmith.demo.world import make_world


def parse_recipe(fields: list[str]) -> Recipe:
    """`Recipe` with FIELD=VALUE overrides, each value read as its field's type."""
    types = {f.name: type(f.default) for f in dataclasses.fields(Recipe)}
    changes = {}
    for item in fields:
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            raise SystemExit(f"error: {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(types)}")
        changes[name] = types[name](value)
    return dataclasses.replace(Recipe(), **changes)


def run_trial(out: Path, recipe: Recipe, seed: int = 0) -> dict:
    """Train the recipe and score the tuned model on the quickstart's three sets."""
    from tunesmith.eval.command import eval_sets, settings_from_config
    from tunesmith.eval.harness import run_set
    from tunesmith.eval.models import load_for_eval
    from tunesmith.model.sources import resolve_model_path

    base = Path(resolve_model_path(MODEL))
    paths = write_data(make_world(seed, recipe.num_countries), out / "data", recipe.paraphrases,
                       replay_rows(base, recipe.max_new_tokens))
    started = time.perf_counter()
    run = _train(real_config(paths, out, seed, recipe))
    train_s = time.perf_counter() - started
    cfg = real_config(paths, out, seed, recipe, EVALUATED_GENERAL)
    loaded = load_for_eval(str(run))
    settings = settings_from_config(cfg)
    metrics, wrong = {}, {}
    for spec in eval_sets(cfg):
        result = run_set(loaded.model, loaded.tokenizer, spec, settings)
        metrics[spec.name] = result["metrics"]
        if spec.kind == "generate":
            wrong[spec.name] = [{"reference": e["reference"], "prediction": e["prediction"]}
                                for e in result["examples"] if not contains_answer(e["prediction"], e["reference"])]
        print(spec.name, json.dumps(result["metrics"]), flush=True)
    return {"recipe": dataclasses.asdict(recipe), "scorer": SCORER, "train_s": round(train_s, 1),
            "metrics": metrics, "wrong": wrong}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("fields", nargs="*", help="RECIPE_FIELD=VALUE (see tunesmith.demo.real.Recipe)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = parse_recipe(args.fields)
    print(recipe, flush=True)
    report = run_trial(args.output_dir, recipe, args.seed)
    (args.output_dir / "trial.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
