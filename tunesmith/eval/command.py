"""`tunesmith eval CONFIG [overrides] [--compare A B]`: evaluate a model on the config's eval sets.

    check the sets (before any model loads) -> load model, adapter, ReFT run, checkpoint, feature-based or
      classification run -> run every set
      -> general sets on the baseline too (forgetting) -> eval.json + eval.md in eval.output_dir

With `--compare A B` both models run the same sets and the report gives each metric's delta B - A; the
general sets' change from A to B is the forgetting section.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

from tunesmith.config import Config
from tunesmith.config.schema import EvalSetConfig
from tunesmith.errors import ConfigError, DataError
from tunesmith.eval.sets import EvalSet, Settings

log = logging.getLogger(__name__)

CHOOSING = ("choice", "classify")  # kinds whose causal-LM answer is the option of highest log-likelihood


def eval_command(cfg: Config, compare: Sequence[str] | None = None) -> dict:
    """Run `tunesmith eval`; returns the report written to eval.json (and rendered in eval.md)."""
    from tunesmith.eval.models import check_sets
    from tunesmith.eval.report import compare_report, single_report, write_report
    from tunesmith.track.logs import setup_logging

    sets = eval_sets(cfg)
    if not compare and not cfg.model.name_or_path:
        raise ConfigError("model.name_or_path: required (the model, adapter or checkpoint to evaluate), "
                          "or pass --compare A B")
    for path in compare or [cfg.model.name_or_path]:
        check_sets(path, sets)  # a classifier runs classify sets only: refused before any model loads
    setup_logging(None, cfg.tracking.log_level)
    started = time.perf_counter()
    settings, options = settings_from_config(cfg), load_options(cfg)
    if compare:
        a, b = (evaluate_model(path, sets, settings, options, baseline=False) for path in compare)
        report = compare_report(a, b, sets)
    else:
        report = single_report(evaluate_model(cfg.model.name_or_path, sets, settings, options), sets)
    report["seconds"] = round(time.perf_counter() - started, 2)
    out_dir = Path(cfg.eval.output_dir or Path(cfg.train.output_dir) / "eval")
    write_report(out_dir, report)
    log.info("wrote %s and %s", out_dir / "eval.json", out_dir / "eval.md")
    return report


def evaluate_model(path: str, sets: Sequence[EvalSet], settings: Settings, options, baseline: bool = True
                   ) -> dict:
    """{"model": path, "kind", "sets": {name: result}} and, when `baseline` and the model was fine-tuned from a
    known one, {"baseline": its path, "baseline_sets": results of the general sets on it}."""
    from tunesmith.eval.models import load_baseline, load_for_eval

    loaded = load_for_eval(path, options)
    result = {"model": path, "kind": loaded.kind, "sets": run_sets(loaded.model, loaded.tokenizer, sets, settings)}
    general = [s for s in sets if s.general]
    if not (baseline and general):
        return result
    if loaded.baseline is None:
        log.info("%s was not fine-tuned from a known model: forgetting on the general sets needs --compare", path)
        return result
    loaded.model = None  # one model in memory at a time
    gc.collect()
    base = load_baseline(loaded.baseline, loaded.tokenizer, options)
    result["baseline"] = loaded.baseline
    result["baseline_sets"] = run_sets(base, loaded.tokenizer, general, settings)
    return result


def run_sets(model, tokenizer, sets: Sequence[EvalSet], settings: Settings) -> dict[str, dict]:
    """Each set's result by name, logged as it finishes."""
    from tunesmith.eval.harness import run_set

    results = {}
    for spec in sets:
        started = time.perf_counter()
        results[spec.name] = run_set(model, tokenizer, spec, settings)
        log.info("%s (%s, %d examples, %.1f s): %s", spec.name, spec.kind, results[spec.name]["metrics"]["n"],
                 time.perf_counter() - started, _summary(results[spec.name]["metrics"]))
    return results


def _summary(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if k != "n")


# ---------------------------------------------------------------------------------------------------
# Config -> plain arguments (every problem is reported before a model is loaded)


def settings_from_config(cfg: Config) -> Settings:
    d = cfg.data
    return Settings(batch_size=cfg.eval.batch_size, max_seq_len=d.max_seq_len, truncation=d.truncation,
                    train_on_prompt=d.train_on_prompt, system_prompt=d.system_prompt, seed=cfg.train.seed,
                    num_examples=cfg.eval.examples)


def load_options(cfg: Config):
    from tunesmith.eval.models import LoadOptions

    m = cfg.model
    return LoadOptions(m.dtype, m.attn_implementation, m.revision, m.trust_remote_code, m.allow_pickle, m.tokenizer,
                       cfg.data.template)


def eval_sets(cfg: Config) -> list[EvalSet]:
    """The config's eval sets as plain `EvalSet`s, checked: files exist, options fit the kind, names are
    unique, `eval.general` names sets. Raises ConfigError naming the key."""
    if not cfg.eval.sets:
        raise ConfigError("eval.sets: no eval sets to run; add at least one {name, path, kind}")
    if cfg.eval.examples < 0:
        raise ConfigError(f"eval.examples: must not be negative, got {cfg.eval.examples}")
    sets = [eval_set(f"eval.sets[{i}]", s) for i, s in enumerate(cfg.eval.sets)]
    repeated = sorted(name for name, count in Counter(s.name for s in sets).items() if count > 1)
    if repeated:
        raise ConfigError(f"eval.sets: set names must be unique, repeated: {', '.join(repeated)}")
    names = [s.name for s in sets]
    for i, name in enumerate(cfg.eval.general):
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (sets: {', '.join(names)})"
            raise ConfigError(f"eval.general[{i}]: no eval set named {name!r}{hint}")
    return [dataclasses.replace(s, general=s.general or s.name in cfg.eval.general) for s in sets]


def eval_set(key: str, s: EvalSetConfig) -> EvalSet:
    _check_file(f"{key}.path", s.path)
    _check_common(key, s)
    if s.kind == "generate":
        _check_generate(key, s)
    elif s.kind == "choice" and s.format is not None:
        raise ConfigError(f"{key}.format: choice sets read prompt/options/label records; format does not apply")
    elif s.kind == "classify" and s.format not in (None, "auto", "classification"):
        raise ConfigError(f"{key}.format: classify sets read text + label rows (format: classification), not "
                          f"{s.format}")
    if s.kind in CHOOSING and len(s.options) == 1:
        raise ConfigError(f"{key}.options: a fixed list needs at least two options, got {s.options}")
    if s.kind not in CHOOSING and (s.options or s.length_normalize != "none"):
        raise ConfigError(f"{key}.{'options' if s.options else 'length_normalize'}: only for kind: choice or "
                          "classify")
    return EvalSet(
        name=s.name or Path(s.path).stem, path=s.path, kind=s.kind, format=s.format or "auto",
        fields=tuple(sorted(s.fields.items())), limit=s.limit, general=s.general, options=tuple(s.options),
        length_normalize=s.length_normalize, metrics=tuple(s.metrics), scorer=s.scorer,
        max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, prompt_format=s.prompt_format,
        shots=s.shots, fewshot_path=s.fewshot_path, cot=s.cot, cot_instruction=s.cot_instruction,
    )


def _check_common(key: str, s: EvalSetConfig) -> None:
    if s.limit is not None and s.limit < 1:
        raise ConfigError(f"{key}.limit: must be at least 1 or null, got {s.limit}")
    if s.shots < 0:
        raise ConfigError(f"{key}.shots: must not be negative, got {s.shots}")
    if s.kind == "loss" and (s.shots or s.cot or s.fewshot_path):
        raise ConfigError(f"{key}.{'shots' if s.shots else 'cot' if s.cot else 'fewshot_path'}: prompting "
                          "applies to choice and generate sets, not to loss sets")
    if s.shots and not s.fewshot_path:
        raise ConfigError(f"{key}.fewshot_path: required for shots: {s.shots} (a training file to draw exemplars "
                          "from)")
    if s.fewshot_path and not s.shots:
        raise ConfigError(f"{key}.shots: fewshot_path is set but shots is 0; set how many exemplars to draw")
    if s.fewshot_path:
        _check_file(f"{key}.fewshot_path", s.fewshot_path)
    if s.cot and s.kind != "generate":
        raise ConfigError(f"{key}.cot: chain of thought applies to generate sets")


def _check_generate(key: str, s: EvalSetConfig) -> None:
    from tunesmith.eval.metrics import load_scorer

    if not s.metrics and not s.scorer:
        raise ConfigError(f"{key}.metrics: a generate set needs metrics and/or a scorer")
    if s.scorer:
        load_scorer(s.scorer, f"{key}.scorer")
    if s.max_new_tokens < 1:
        raise ConfigError(f"{key}.max_new_tokens: must be at least 1, got {s.max_new_tokens}")
    if s.temperature < 0:
        raise ConfigError(f"{key}.temperature: must not be negative, got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise ConfigError(f"{key}.top_p: must be in (0, 1], got {s.top_p}")


def _check_file(key: str, path: str) -> None:
    from tunesmith.paths import resolve_paths

    if not path:
        raise ConfigError(f"{key}: required (a data file)")
    try:
        resolve_paths(path)
    except DataError as exc:
        raise ConfigError(f"{key}: {exc}") from None
