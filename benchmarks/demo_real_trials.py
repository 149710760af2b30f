"""Trial recipes for the real-model quickstart (`make demo-real`): one recipe per call, the tuned model only.

    .venv/bin/python benchmarks/demo_real_trials.py OUT [--threads 2] [RECIPE_FIELD=VALUE ...]
    .venv/bin/python benchmarks/demo_real_trials.py runs/trial-lr1e-3 lr=1e-3 epochs=4
    .venv/bin/python benchmarks/demo_real_trials.py runs/trial-mlp 'target_modules=.*\\.mlp\\.(gate|up|down)_proj'

The same data, training run and scoring as `tunesmith.demo.real.run_real_demo` with the fields given replacing
the defaults of `Recipe`; it skips what does not depend on the recipe (the base model's scores: 0% held out, 100%
of the real-world questions by construction, perplexity 18.67 on the general text) and the export. With
`--scales 1,0.8,0.65` it scores the one trained run with its LoRA update scaled by each (what `tunesmith
interpolate --weight` writes; default: the recipe's adapter_weight); a second call on the same OUT skips training.
Prints one line per eval set and writes OUT/trial.json (recipe, metrics, every wrong answer, per scale). The
table of trials and what it says: docs/PERFORMANCE.md, "The real-model quickstart".
"""

from __future__ import annotations

import argparse
import contextlib
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


def run_trial(out: Path, recipe: Recipe, seed: int = 0, scales: tuple[float, ...] = (1.0,)) -> dict:
    """Train the recipe (unless OUT/run holds its run already) and score the tuned model on the quickstart's three
    sets, once per adapter scale."""
    from tunesmith.eval.models import load_for_eval
    from tunesmith.model.sources import resolve_model_path

    paths = {name: out / "data" / f"{name}.jsonl" for name in ("train", "replay", "heldout", "real_world",
                                                                "general_text")}
    train_s = None
    if not (out / "run" / "final").exists():
        base = Path(resolve_model_path(MODEL))
        paths = write_data(make_world(seed, recipe.num_countries), out / "data", recipe.paraphrases,
                           replay_rows(base, recipe.max_new_tokens))
        started = time.perf_counter()
        _train(real_config(paths, out, seed, recipe))
        train_s = round(time.perf_counter() - started, 1)
    cfg = real_config(paths, out, seed, recipe, EVALUATED_GENERAL)
    loaded = load_for_eval(str(out / "run"))
    by_scale = {}
    for scale in scales:
        with scaled_adapter(loaded.model, scale):
            print(f"adapter scale {scale}", flush=True)
            by_scale[str(scale)] = score(loaded, cfg)
    return {"recipe": dataclasses.asdict(recipe), "scorer": SCORER, "train_s": train_s, "scales": by_scale}


def score(loaded, cfg) -> dict:
    """Metrics and wrong answers of every eval set of the config."""
    from tunesmith.eval.command import eval_sets, settings_from_config
    from tunesmith.eval.harness import run_set

    metrics, wrong = {}, {}
    for spec in eval_sets(cfg):
        result = run_set(loaded.model, loaded.tokenizer, spec, settings_from_config(cfg))
        metrics[spec.name] = result["metrics"]
        if spec.kind == "generate":
            wrong[spec.name] = [{"reference": e["reference"], "prediction": e["prediction"]}
                                for e in result["examples"] if not contains_answer(e["prediction"], e["reference"])]
        print(spec.name, json.dumps(result["metrics"]), flush=True)
    return {"metrics": metrics, "wrong": wrong}


@contextlib.contextmanager
def scaled_adapter(model, scale: float):
    """The LoRA update times `scale` (peft's per-module `scaling`): the weights interpolated between the base
    (0) and the tuned model (1), as WiSE-FT interpolates (Wortsman et al., 2022)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    saved = [dict(m.scaling) for m in layers]
    for m in layers:
        m.scaling = {name: value * scale for name, value in m.scaling.items()}
    try:
        yield
    finally:
        for m, scaling in zip(layers, saved):
            m.scaling = scaling


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("fields", nargs="*", help="RECIPE_FIELD=VALUE (see tunesmith.demo.real.Recipe)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scales", default=None,
                        help="adapter scales to score the run at, comma-separated (1.0: as trained; default: the "
                             "recipe's adapter_weight, as the quickstart interpolates it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = parse_recipe(args.fields)
    print(recipe, flush=True)
    scales = (recipe.adapter_weight,) if args.scales is None else tuple(float(x) for x in args.scales.split(","))
    report = run_trial(args.output_dir, recipe, args.seed, scales)
    (args.output_dir / "trial.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
