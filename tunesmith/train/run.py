"""`tunesmith train`: turn a Config into plain objects, run the loop, save `final/` and the report.

    setup (run dir, logging, config) -> load tokenizer + model (or build it: model.init) -> strategy -> data
      -> optimizer/schedule
      -> resume? -> fit -> final/ -> report.json + report.md
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from safetensors.torch import load_file

from tunesmith.config import Config, check_paths, save_config, to_dict
from tunesmith.config.objectives import OBJECTIVES
from tunesmith.data.build import prepare_from_config, write_data_report
from tunesmith.data.pipeline import ExampleTable
from tunesmith.errors import ConfigError
from tunesmith.model.build import build_model
from tunesmith.model.run_tokenizer import build_tokenizer
from tunesmith.model.heads import prepare_classification
from tunesmith.model.prompt_tuning import PROMPT_STRATEGIES
from tunesmith.model.reft import intervening_on_prompts
from tunesmith.model.strategies import ADAPTER_STRATEGIES, parameter_counts
from tunesmith.model.trainable import WEIGHTS, load_trainable_state
from tunesmith.objectives import build_objective
from tunesmith.objectives.base import Objective
from tunesmith.objectives.align import precompute_reference
from tunesmith.track.logs import close_logging, setup_logging
from tunesmith.track.plots import plot_training_curves
from tunesmith.track.sinks import create_tracker, require_sink_packages
from tunesmith.train.checkpoint import latest_checkpoint, load_checkpoint, load_sharded_checkpoint
from tunesmith.train.distributed import (
    build_accelerator,
    fill_deepspeed_auto,
    gathered_weights,
    is_sharded,
    prepare,
    read_deepspeed_config,
    shard_model,
)
from tunesmith.train.loop import FitSummary, LoopSettings, fit, steps_per_epoch
from tunesmith.train.optim import build_optimizer, build_scheduler
from tunesmith.train.probe import probe_memory

log = logging.getLogger(__name__)


def train(cfg: Config) -> dict:
    """Run one training job described by `cfg`; returns the report (also written to the run directory)."""
    check_paths(cfg)
    if cfg.strategy.name == "features":  # a scikit-learn classifier on frozen features: no training loop
        from tunesmith.model.features import train_features

        return train_features(cfg)
    session = start_session(cfg)
    run = assemble(cfg, session)
    resume = resume_from_checkpoint(session, run)
    tracker = create_tracker(session.run_dir, cfg.tracking, session.accelerator.is_main_process,
                             resume_step=resume.start_step or None)
    if session.accelerator.is_main_process:  # only now that everything checked out: a refused resume changes nothing
        save_config(cfg, session.run_dir / "config.yaml")
        write_data_report(run.data, session.run_dir)
    _log_plan(run, session.accelerator)
    with tracker:  # closed also when training fails, which marks the sinks' runs as failed
        tracker.log_params(to_dict(cfg))
        summary = fit(run.model, run.objective, run.optimizer, run.scheduler, session.accelerator, run.train_set,
                      run.validation_set, run.tokenizer.pad_token_id, run.settings, session.run_dir,
                      resume.start_step, run.data_state, tracker=tracker,
                      sample_eval=build_sample_eval(cfg, run.tokenizer, run.validation_set),
                      nonfinite_steps=resume.nonfinite_steps,
                      forgetting=build_forgetting(cfg, run.tokenizer, session.accelerator,
                                                  resume.forgetting_baseline))
        # Stopped by SIGTERM/SIGINT: its checkpoint is written; final/ and the report wait for --resume.
        report = {"preempted": summary.preempted, "steps": summary.steps} if summary.preempted else \
            finish(cfg, session, run, summary, tracker)
    session.accelerator.end_training()
    close_logging()
    return report


@dataclass
class Session:
    """Where a run writes, the checkpoint it resumes from, and the accelerator it runs on."""

    run_dir: Path
    resume_from: Path | None
    accelerator: Accelerator
    started: float


@dataclass
class Run:
    """What training is made of before its first step."""

    tokenizer: object
    data: object  # data.pipeline.Prepared, or the classification splits
    train_set: object
    validation_set: object
    model: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: object
    settings: LoopSettings
    data_state: dict  # stored in every checkpoint, checked on resume


@dataclass
class ResumePoint:
    start_step: int = 0
    nonfinite_steps: list[int] = field(default_factory=list)
    forgetting_baseline: dict | None = None


def start_session(cfg: Config) -> Session:
    """The run directory's resume point, the accelerator, logging into the run directory, and the seed."""
    run_dir = Path(cfg.train.output_dir)
    damaged: list[tuple[Path, str]] = []  # checkpoints that fail their checksums, reported once logging is set up
    resume_from = _resume_point(run_dir, cfg.train.resume, damaged)
    require_sink_packages(cfg.tracking.sinks)  # a missing tracker package fails before any loading
    AcceleratorState._reset_state()  # accelerate keeps one global state; a new run in this process sets its own
    accelerator = build_accelerator(cfg.train.distributed.strategy, cfg.train.mixed_precision, deepspeed_config(cfg))
    setup_logging(run_dir if accelerator.is_main_process else None, cfg.tracking.log_level)
    for path, problem in damaged:
        log.warning("skipping damaged checkpoint %s: %s; resuming from the one before it", path, problem)
    set_seed(cfg.train.seed)
    return Session(run_dir, resume_from, accelerator, time.perf_counter())


def assemble(cfg: Config, session: Session) -> Run:
    """Tokenizer, data (before the model: a bad row is reported without waiting for the weights), model,
    objective, optimizer and schedule, prepared by accelerate; reference log-probs and the memory probe."""
    accelerator, spec = session.accelerator, OBJECTIVES[cfg.train.objective]
    tokenizer, added_tokens = build_tokenizer(cfg)
    with accelerator.main_process_first():  # tokenised once, by the main process; the others read its cache
        labelled = spec.data == "labelled"
        data = prepare_classification(cfg, tokenizer) if labelled else prepare_from_config(cfg, tokenizer)
    train_set, validation_set = data.splits["train"], data.splits["validation"]
    _log_data(data.report)
    check_objective_data(cfg.train.objective, train_set)
    model = build_model(cfg, tokenizer, added_tokens, data.report.get("labels"))
    ref_model = build_reference(cfg, model)
    objective = build_objective(cfg.train.objective, cfg.align, ref_model, tokenizer.pad_token_id,
                                cfg.eval.batch_size, tokenizer=tokenizer, run_dir=session.run_dir,
                                device=accelerator.device, model=model, fused_loss=cfg.train.fused_loss,
                                padding_free=cfg.data.padding_free)
    if cfg.strategy.name == "reft":  # interventions at the prompt positions each batch's labels give
        objective = intervening_on_prompts(objective)
    settings = _loop_settings(cfg, len(train_set), accelerator.num_processes)
    model = shard(cfg, model, accelerator)  # before the optimizer, which must hold the sharded parameters
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, tuple(cfg.train.betas), cfg.train.eps)
    warmup = cfg.train.warmup_steps or round(cfg.train.warmup_ratio * settings.total_steps)
    scheduler = build_scheduler(optimizer, settings.total_steps, warmup, cfg.train.scheduler)
    model, optimizer = prepare(accelerator, model, optimizer)
    if ref_model is not None:
        ref_model.to(accelerator.device)
    if cfg.align.precompute_ref and spec.precomputable_reference:
        # Before a checkpoint is loaded: the model is still the reference.
        train_set, validation_set = (with_reference(model, s, tokenizer.pad_token_id, cfg.eval.batch_size,
                                                    accelerator.device, objective.collate)
                                     for s in (train_set, validation_set))
    if cfg.train.probe_memory and not spec.generates:
        # Before a checkpoint is loaded, whose RNG state then replaces whatever the probe drew.
        probe_memory(model, objective, train_set, cfg.train.micro_batch_size, tokenizer.pad_token_id, accelerator,
                     f"lower train.micro_batch_size (now {cfg.train.micro_batch_size}) or data.max_seq_len (now "
                     f"{cfg.data.max_seq_len}), set train.gradient_checkpointing=true or "
                     "train.mixed_precision=bf16, or use strategy qlora")
    data_state = {"train_fingerprint": data.fingerprint, "total_steps": settings.total_steps}
    return Run(tokenizer, data, train_set, validation_set, model, objective, optimizer, scheduler, settings,
               data_state)


def resume_from_checkpoint(session: Session, run: Run) -> ResumePoint:
    """Weights, optimizer, schedule and RNG of the checkpoint to resume from (none: a fresh start)."""
    path, accelerator = session.resume_from, session.accelerator
    if path is None:
        return ResumePoint()
    saved = load_sharded_checkpoint(path, run.model, run.optimizer, run.scheduler) if is_sharded(run.model) else \
        load_checkpoint(path, accelerator.unwrap_model(run.model), run.optimizer, run.scheduler)
    _check_resumable(saved, run.data_state, path)
    log.info("resumed from %s (step %d of %d)", path, saved["step"], run.settings.total_steps)
    return ResumePoint(saved["step"], saved.get("nonfinite_steps", []), saved.get("forgetting_baseline"))


def finish(cfg: Config, session: Session, run: Run, summary: FitSummary, tracker) -> dict:
    """The weights final/ holds (the best or last good checkpoint, when asked), final/, the report, the plots."""
    accelerator, run_dir = session.accelerator, session.run_dir
    _restore_chosen_weights(cfg, summary, run.model, accelerator)
    # Weights split across processes (FSDP, ZeRO-3) are gathered onto the main process, by all of them.
    weights = gathered_weights(accelerator, run.model)
    if not accelerator.is_main_process:
        return {}
    model = accelerator.unwrap_model(run.model)
    save_final(model, run.tokenizer, run_dir / "final", weights)
    trainable, total = parameter_counts(model)
    report = {
        "steps": summary.steps,
        "train_loss": summary.train_loss,
        "eval_loss": summary.eval_loss,
        **({"eval_metrics": summary.eval_metrics} if summary.eval_metrics else {}),
        **({"best": summary.best} if summary.best else {}),
        **({"forgetting": summary.forgetting} if summary.forgetting else {}),
        "nonfinite_steps": summary.nonfinite_steps,  # skipped (train.on_nonfinite=skip)
        "trainable_parameters": trainable,
        "total_parameters": total,
        "seconds": round(time.perf_counter() - session.started, 2),
        "data": run.data.report["splits"],
        "config": to_dict(cfg),
    }
    write_report(run_dir, report)
    plot_training_curves(run_dir / "metrics.jsonl", run_dir / "loss.png", title=run_dir.name)
    for path in _artifacts(run_dir):
        tracker.log_artifact(path)
    log.info("done: final model in %s", run_dir / "final")
    return report


def _restore_chosen_weights(cfg: Config, summary: FitSummary, model, accelerator: Accelerator) -> None:
    """With eval.load_best_at_end, the best checkpoint's weights; after a forgetting stop, the last good ones."""
    if cfg.eval.load_best_at_end and summary.best:
        best = Path(summary.best["checkpoint"])
        if is_sharded(model):
            load_sharded_checkpoint(best, model)
        else:
            load_trainable_state(accelerator.unwrap_model(model), load_file(best / WEIGHTS))
        log.info("final/ holds the best checkpoint (step %d, %s %.4f)", summary.best["step"],
                 summary.best["metric"], summary.best["value"])
    last_good = (summary.forgetting or {}).get("last_good")
    if last_good and summary.forgetting["stopped"]:
        load_trainable_state(accelerator.unwrap_model(model), load_file(Path(last_good) / WEIGHTS))
        log.warning("final/ holds %s, the last validation pass before the general sets fell", last_good)


def _log_plan(run: Run, accelerator: Accelerator) -> None:
    s = run.settings
    log.info("training %d optimizer steps (%d per epoch), %d micro-batches of %d per step", s.total_steps,
             steps_per_epoch(len(run.train_set), s.micro_batch_size, s.grad_accum, accelerator.num_processes),
             s.grad_accum, s.micro_batch_size)


def deepspeed_config(cfg: Config) -> dict | None:
    """train.distributed.deepspeed_config read, checked and its "auto" values filled (None: not deepspeed)."""
    d, t = cfg.train.distributed, cfg.train
    if d.strategy != "deepspeed":
        return None
    return fill_deepspeed_auto(read_deepspeed_config(d.deepspeed_config), micro_batch_size=t.micro_batch_size,
                               grad_accum=t.grad_accum, world_size=int(os.environ.get("WORLD_SIZE", "1")),
                               max_grad_norm=t.max_grad_norm, mixed_precision=t.mixed_precision)


def shard(cfg: Config, model, accelerator: Accelerator):
    """The model sharded with FSDP2 when train.distributed.strategy=fsdp and there are several processes."""
    d = cfg.train.distributed
    if d.strategy != "fsdp":
        return model
    if accelerator.num_processes == 1:
        log.warning("train.distributed.strategy=fsdp with one process: nothing to shard, training unsharded")
        return model
    return shard_model(model, d.wrap, d.reshard_after_forward, cfg.train.mixed_precision, accelerator.device)


# Strategies whose model can switch its trained parts off (`disable_adapter`): the base is the reference.
WITH_BASE_SWITCH = ADAPTER_STRATEGIES + PROMPT_STRATEGIES + ("reft",)


def build_reference(cfg: Config, model):
    """A frozen copy of the model as the reference, where one is needed and nothing cheaper serves: with
    adapters the policy with its adapters off is the reference; `align.precompute_ref` needs none at all."""
    if (not OBJECTIVES[cfg.train.objective].needs_reference(cfg.align.kl_beta) or cfg.align.precompute_ref
            or cfg.strategy.name in WITH_BASE_SWITCH):
        return None
    log.info("reference model: a frozen copy of the model (align.precompute_ref=true avoids the second copy)")
    return copy.deepcopy(model).eval().requires_grad_(False)


def with_reference(model, examples, pad_token_id: int, batch_size: int, device, collate_fn=None):
    """The examples with the reference log-probs of their answers attached (computed with `model` as it is, on
    batches laid out by `collate_fn`, the objective's)."""
    if not len(examples):
        return examples
    logps = precompute_reference(model, examples, pad_token_id, batch_size, device, collate_fn)
    if isinstance(examples, ExampleTable):
        return ExampleTable(examples.table.add_column("ref_logps", logps))
    return [replace(e, ref_logps=v) for e, v in zip(examples, logps)]


def check_objective_data(objective: str, examples) -> None:
    """The objective's data kind: pairs for preference objectives, desirable flags for KTO."""
    if not len(examples):
        return
    first, data = examples[0], OBJECTIVES[objective].data
    if data == "preference" and first.rejected_ids is None:
        raise ConfigError(f"train.objective: {objective} trains on preference pairs (prompt, chosen, rejected), "
                          f"but the training data ({first.source}) has none; set data.format=preference")
    if data == "unpaired" and first.desirable is None:
        raise ConfigError(f"train.objective: {objective} trains on (prompt, completion, desirable) rows, but the "
                          f"training data ({first.source}) has none; set data.format=unpaired")
    if OBJECTIVES[objective].next_token_loss and first.rejected_ids is not None:
        log.warning("train.objective=%s on preference pairs: only the chosen answers are trained on", objective)


def _loop_settings(cfg: Config, num_examples: int, num_processes: int) -> LoopSettings:
    t = cfg.train
    per_epoch = steps_per_epoch(num_examples, t.micro_batch_size, t.grad_accum, num_processes)
    return LoopSettings(
        total_steps=t.max_steps or t.epochs * per_epoch,
        micro_batch_size=t.micro_batch_size,
        grad_accum=t.grad_accum,
        seed=t.seed,
        max_grad_norm=t.max_grad_norm,
        log_every=t.log_every,
        save_every=t.save_every,
        eval_every=cfg.eval.every,
        eval_batch_size=cfg.eval.batch_size,
        keep_last=t.keep_last,
        progress_bar=cfg.tracking.progress_bar,
        best_metric=cfg.eval.best_metric,
        best_mode=cfg.eval.best_mode,
        early_stopping_patience=cfg.eval.early_stopping_patience,
        on_nonfinite=t.on_nonfinite,
    )


def build_forgetting(cfg: Config, tokenizer, accelerator: Accelerator, baseline: dict | None = None):
    """The forgetting guard over the config's general eval sets (`eval.general`), or None when it has none;
    `baseline`: the scores a resumed run started from (its checkpoint's state)."""
    if not any(s.general or s.name in cfg.eval.general for s in cfg.eval.sets) \
            or not OBJECTIVES[cfg.train.objective].compared_with_base:
        return None
    from tunesmith.eval.command import eval_sets, settings_from_config
    from tunesmith.eval.harness import run_set
    from tunesmith.train.forgetting import ForgettingGuard

    general, settings = [s for s in eval_sets(cfg) if s.general], settings_from_config(cfg)

    def score(model) -> dict[str, dict]:
        model = accelerator.unwrap_model(model).eval()
        with torch.no_grad():
            return {spec.name: run_set(model, tokenizer, spec, settings) for spec in general}

    guard = ForgettingGuard(score, cfg.eval.forgetting_max_drop, cfg.eval.on_forgetting == "stop")
    guard.restore_baseline(baseline)
    return guard


def build_sample_eval(cfg: Config, tokenizer, validation):
    """Generation metrics on the first `eval.generate_samples` validation examples, or None."""
    n = min(cfg.eval.generate_samples, len(validation))
    if not n or not OBJECTIVES[cfg.train.objective].samples_generations:
        return None
    from tunesmith.eval.during import sample_generation_metrics

    sample = [validation[i] for i in range(n)]
    return lambda model: sample_generation_metrics(model, tokenizer, sample, cfg.eval.generate_metrics,
                                                   cfg.eval.max_new_tokens, cfg.eval.batch_size)


def _artifacts(run_dir: Path) -> list[Path]:
    """The files of a finished run attached to each tracker's run: config, reports, plots."""
    names = ("config.yaml", "report.json", "report.md", "data_report.json", "data_report.md")
    return [run_dir / n for n in names if (run_dir / n).is_file()] + sorted(run_dir.glob("*.png"))


def _resume_point(run_dir: Path, resume: bool, damaged: list[tuple[Path, str]] | None = None) -> Path | None:
    """The checkpoint to resume from (None: start afresh); damaged checkpoints skipped on the way are appended
    to `damaged`."""
    checkpoints = run_dir / "checkpoints"
    if not resume:
        if (run_dir / "final").exists() or latest_checkpoint(checkpoints, []) is not None:
            raise ConfigError(
                f"train.output_dir: {run_dir} already holds a run; pass --resume to continue it "
                "or choose another output_dir"
            )
        return None
    found = latest_checkpoint(checkpoints, damaged)
    if found is None:
        raise ConfigError(f"--resume: no complete checkpoint in {checkpoints}"
                          + "".join(f"; {path.name} is damaged ({problem})" for path, problem in damaged or ()))
    return found


def _check_resumable(saved: dict, current: dict, path: Path) -> None:
    if saved.get("train_fingerprint") != current["train_fingerprint"]:
        raise ConfigError(
            f"--resume: the training data differs from what {path} was trained on (its files, data options, "
            "tokenizer or tunesmith's data code changed), so resuming would not replay the same batches; "
            "restore them or start a new output_dir"
        )
    if saved.get("total_steps") != current["total_steps"]:
        log.warning("resuming with %d total steps instead of %d: the learning-rate schedule changes from here",
                    current["total_steps"], saved.get("total_steps"))


def _log_data(report: dict) -> None:
    for name, sources in report["sources"].items():
        for path, r in sources.items():
            if r["skipped"]:
                log.warning("%s: skipped %d bad rows (data.on_error=skip), e.g. %s", path, r["skipped"], r["errors"][0])
    for name, s in report["splits"].items():
        if not s.get("rows"):
            continue
        log.info("%s data: %d rows -> %d examples, %d tokens (%d with loss), %d truncated", name, s["rows"],
                 s["examples"], s["tokens"], s["loss_tokens"], s["truncated"])
        if s["dropped_no_loss_tokens"]:
            log.warning("%s data: dropped %d examples with no loss-bearing token left after truncation "
                        "(first: %s); raise data.max_seq_len to keep them", name, s["dropped_no_loss_tokens"],
                        ", ".join(s["dropped_sources"][:3]))
        if "packing" in s:
            log.info("%s data packed into %d sequences (%.1f%% of token slots used)", name,
                     s["packing"]["sequences"], 100 * s["packing"]["efficiency"])


def save_final(model, tokenizer, path: Path, weights: dict | None = None) -> None:
    """Adapter (PEFT format) or full model (safetensors) plus tokenizer, written atomically; `weights`: the
    whole state dict to save instead of the model's own (a sharded model's, gathered)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    value_head = model._modules.pop("v_head", None)  # PPO's value head is training state, not the policy
    options = adapter_save_options(model)
    if weights is not None:
        model.save_pretrained(tmp, state_dict={k: v for k, v in weights.items() if not k.startswith("v_head.")},
                              **options)
    else:
        model.save_pretrained(tmp, **options)
    if value_head is not None:
        model.add_module("v_head", value_head)
    tokenizer.save_pretrained(tmp)
    generation_config = getattr(model, "generation_config", None)  # a reward model generates nothing
    if generation_config is not None and not (tmp / "generation_config.json").exists():
        generation_config.save_pretrained(tmp)  # PEFT saves only the adapter: keep the stop tokens
    if path.exists():
        shutil.rmtree(path)
    os.rename(tmp, path)


def adapter_save_options(model) -> dict:
    """PEFT saves the whole (resized) embedding matrix next to an adapter when template tokens were added: 1.36 GB
    for Gemma's 262k x 640 embeddings and tied head, for 3.8M trained parameters. The new tokens' rows are already
    in the adapter (`trainable_token_indices`), so only those are saved; the base is resized before loading."""
    config = getattr(model, "peft_config", {}).get("default")
    return {"save_embedding_layers": False} if getattr(config, "trainable_token_indices", None) else {}


def write_report(run_dir: Path, report: dict) -> None:
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    lines = ["# Training report", "", "| metric | value |", "|---|---|"]
    for key in ("steps", "train_loss", "eval_loss", "trainable_parameters", "total_parameters", "seconds"):
        value = report.get(key)
        lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    for key, value in report.get("eval_metrics", {}).items():
        lines.append(f"| eval_{key} | {value:.4f} |")
    if "best" in report:
        b = report["best"]
        lines += ["", f"Best checkpoint: step {b['step']} ({b['metric']} {b['value']:.4f}), {b['checkpoint']}."]
    for name, f in (report.get("forgetting") or {}).get("sets", {}).items():
        drop = f["largest_drop"]
        lines += ["", f"Forgetting, general set {name}: {f['metric']} {f['before']:.4f} before training, largest "
                  f"drop {drop:.1f} points" + (" (beyond eval.forgetting_max_drop)" if f["exceeded"] else "") + "."
                  if drop is not None else f"Forgetting, general set {name}: {f['metric']} {f['before']:.4f} before "
                  "training, not measured again."]
    if report.get("nonfinite_steps"):
        steps = report["nonfinite_steps"]
        lines += ["", f"Skipped {len(steps)} step(s) with a non-finite loss or gradient (train.on_nonfinite=skip): "
                  f"{', '.join(map(str, steps[:20]))}{' ...' if len(steps) > 20 else ''}."]
    d = report["data"]["train"]
    lines += ["", f"Train data: {d['rows']} rows, {d['examples']} examples, {d['truncated']} truncated, "
              f"{d['dropped_no_loss_tokens']} dropped for having no loss-bearing token (see data_report.md)."]
    lines += ["", "![loss](loss.png)"]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
