"""The one training loop every objective runs on.

Per optimizer step: take the step's window of `grad_accum` micro-batches, count the loss units in the whole
window (all processes), backpropagate each micro-batch's summed loss divided by that global count, clip,
step. The update therefore equals that of one large batch, whatever the accumulation or process count.

The data position is derived from the step number alone (the order of an epoch depends only on the seed and
the epoch), so resuming from a checkpoint at step N replays exactly the batches an uninterrupted run sees.

Faults the loop survives:
- SIGTERM / SIGINT (preemption, Ctrl-C): the step in progress finishes, a checkpoint is written at that step
  boundary and `fit` returns with `summary.preempted`; `--resume` continues bitwise as if never stopped. A
  second signal stops at once (the default action).
- A non-finite loss or gradient norm: the update is never applied. `on_nonfinite="skip"` drops the step: the
  gradients are zeroed, the optimizer does not step (its moments and step count stay), the learning-rate
  schedule does step, so step N keeps the learning rate and batches it has in a run without the fault; the
  skipped steps are counted in metrics.jsonl (`nonfinite_steps`), the report and each checkpoint (so a resumed run
  reports them too). A skipped step depends only on the state and the batch, so resuming replays it exactly.
  `on_nonfinite="stop"` raises `NonFiniteError` before the update; the checkpoints written so far are kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from tunesmith.data.batching import epoch_batches, example_tokens
from tunesmith.data.tokenize import Example
from tunesmith.errors import TunesmithError
from tunesmith.objectives.base import Objective
from tunesmith.track.sinks import Tracker
from tunesmith.train.best import BestTracker
from tunesmith.train.checkpoint import latest_checkpoint, save_checkpoint, save_sharded_checkpoint
from tunesmith.train.distributed import is_sharded
from tunesmith.train.forgetting import ForgettingGuard
from tunesmith.train.preemption import Preemption

log = logging.getLogger(__name__)


@dataclass
class LoopSettings:
    total_steps: int
    micro_batch_size: int
    grad_accum: int
    seed: int
    max_grad_norm: float | None = 1.0
    log_every: int = 1
    save_every: int | None = None
    eval_every: int | None = None
    eval_batch_size: int = 8
    keep_last: int = 2
    progress_bar: bool = True
    best_metric: str | None = None  # e.g. eval_loss: its best checkpoint is kept (see train/best.py)
    best_mode: str = "auto"
    early_stopping_patience: int | None = None
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient: "skip" the step or "stop" the run


class NonFiniteError(TunesmithError):
    """A NaN or infinite loss or gradient norm with `on_nonfinite="stop"`; no update was applied."""


def steps_per_epoch(num_examples: int, micro_batch_size: int, grad_accum: int, num_processes: int = 1) -> int:
    """Optimizer steps in one pass over the data; a last, shorter accumulation window still counts."""
    micro_batches = math.ceil(num_examples / (micro_batch_size * num_processes))
    return math.ceil(micro_batches / grad_accum)


def window(examples: Sequence[Example], step: int, s: LoopSettings, rank: int, world: int) -> list[list[Example]]:
    """This process's micro-batches for optimizer step `step` (0-based)."""
    return padded_window(examples, step, s, rank, world)[0]


def padded_window(examples: Sequence[Example], step: int, s: LoopSettings, rank: int, world: int
                  ) -> tuple[list[list[Example]], int]:
    """This process's micro-batches for step `step`, padded to as many as the first process has, and how many
    of them are real. At the end of an epoch a process may get fewer examples than the others; it then runs
    padding micro-batches (copies of the window's first examples, weighted 0), since every process must take
    part in every gradient synchronisation."""
    per_epoch = steps_per_epoch(len(examples), s.micro_batch_size, s.grad_accum, world)
    epoch, k = divmod(step, per_epoch)
    batches = epoch_batches(len(examples), s.micro_batch_size * world, s.seed, epoch)[k * s.grad_accum:
                                                                                    (k + 1) * s.grad_accum]
    own = [b[rank * s.micro_batch_size : (rank + 1) * s.micro_batch_size] for b in batches]
    real = [[examples[i] for i in b] for b in own if b]
    filler = [examples[i] for i in batches[0][: s.micro_batch_size]]
    return real + [filler] * (len(batches) - len(real)), len(real)  # the first process has one per batch


@dataclass
class FitSummary:
    """What `fit` did: the last logged train and eval losses and eval metrics, the steps run, the steps skipped for
    a non-finite loss or gradient (the list a resumed checkpoint held, continued), the best checkpoint, the
    forgetting guard's scores, and `preempted` = {"signal", "step"} when SIGTERM or SIGINT stopped the run."""

    steps: int
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    nonfinite_steps: list[int] = field(default_factory=list)
    best: dict | None = None
    forgetting: dict | None = None
    preempted: dict | None = None


def fit(
    model: torch.nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    scheduler,
    accelerator: Accelerator,
    train: Sequence[Example],
    validation: Sequence[Example],
    pad_token_id: int,
    settings: LoopSettings,
    run_dir: Path,
    start_step: int = 0,
    checkpoint_state: dict | None = None,
    *,
    tracker: Tracker,
    sample_eval: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    nonfinite_steps: Sequence[int] = (),
    forgetting: ForgettingGuard | None = None,
) -> FitSummary:
    """Train from `start_step` to `settings.total_steps` (or an early stop, or a preemption signal).

    `sample_eval(model)` adds metrics to every validation pass (e.g. generation metrics on a sample).
    `forgetting` scores the general eval sets before the first step and at every validation pass (also without
    validation data); with its `stop`, a drop beyond its limit ends the run, and `summary.forgetting["last_good"]`
    names the checkpoint of the last pass within the limit (kept from rotation), for final/.

    Logs train and eval records through `tracker` (metrics.jsonl and any other sinks; a no-op on processes
    other than the main one) and writes checkpoints under `run_dir/checkpoints/`; `checkpoint_state` is stored
    in each checkpoint's state.json (e.g. a fingerprint of the data, checked on resume).
    """
    s = settings
    run = _Fit(model, objective, optimizer, scheduler, accelerator, train, validation, pad_token_id, s, run_dir,
               tracker, sample_eval, forgetting, checkpoint_state or {},
               FitSummary(s.total_steps, nonfinite_steps=list(nonfinite_steps)))
    run.begin(start_step)
    with Preemption() as preemption:  # SIGTERM/SIGINT: finish the step, save, return; handlers restored after
        for step in range(start_step, s.total_steps):
            done = run.train_step(step)
            improved, stop = run.validate(done) if run.validates_at(done) else (False, False)
            saved = run.save_if_due(done, improved or stop)
            if run.forgot and forgetting.stop:
                run.summary.steps = done
                break
            if stop:
                run.early_stop(done)
                break
            if done < s.total_steps and preemption.requested(accelerator):  # at a step boundary: save and return
                run.preempt(done, preemption.name, saved)
                break
    return run.finish()


@dataclass
class _Fit:
    """One call of `fit`: what it was given, and what it has done so far."""

    model: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: object
    accelerator: Accelerator
    train: Sequence[Example]
    validation: Sequence[Example]
    pad_token_id: int
    settings: LoopSettings
    run_dir: Path
    tracker: Tracker
    sample_eval: Callable[[torch.nn.Module], dict[str, float]] | None
    forgetting: ForgettingGuard | None
    checkpoint_state: dict
    summary: FitSummary
    best: BestTracker | None = None
    last_good: int | None = None  # with forgetting.stop: the last validation pass within the limit
    forgot: bool = False  # the last validation pass found forgetting beyond the limit

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def begin(self, start_step: int) -> None:
        """The progress bar, the best-checkpoint tracker, and the forgetting guard's baseline before any step."""
        s, a = self.settings, self.accelerator
        self.per_epoch = steps_per_epoch(len(self.train), s.micro_batch_size, s.grad_accum, a.num_processes)
        self.bar = tqdm(total=s.total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (s.progress_bar and a.is_main_process))
        self.interval = _Interval()
        self.model.train()
        if s.best_metric:
            self.best = BestTracker.create(s.best_metric, s.best_mode, s.early_stopping_patience, self.checkpoints,
                                           start_step)
        if self.forgetting is not None and not self.forgetting.baseline:
            baseline = self.forgetting.start(self.model)
            if a.is_main_process:
                self.tracker.log({"step": start_step, **baseline})
            self.model.train()

    def train_step(self, step: int) -> int:
        """Optimizer step `step` (0-based), skipped or stopped on a non-finite value, logged; returns its number."""
        s, a = self.settings, self.accelerator
        own, real = padded_window(self.train, step, s, a.process_index, a.num_processes)
        micro = [self.objective.collate(b, self.pad_token_id) for b in own]
        stats = train_step(self.model, self.objective, self.optimizer, self.scheduler, a, micro, s.max_grad_norm,
                           step + 1, real)
        done, self.forgot = step + 1, False
        if stats["nonfinite"]:
            _on_nonfinite(done, stats, s.on_nonfinite, self.checkpoints, len(self.summary.nonfinite_steps) + 1)
            self.summary.nonfinite_steps.append(done)
        self.interval.add(stats)
        if done % s.log_every == 0 or done == s.total_steps:
            self._log_train(done, stats)
        self.bar.update(1)
        return done

    def _log_train(self, done: int, stats: dict) -> None:
        record = {"step": done, "epoch": round(done / self.per_epoch, 4), **self.interval.flush(), "lr": stats["lr"]}
        if not stats["nonfinite"]:
            record["grad_norm"] = stats["grad_norm"]
        if "loss" in record:  # absent when every step of the interval was skipped
            self.summary.train_loss = record["loss"]
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        if self.accelerator.is_main_process:
            self.tracker.log(record)
        log.debug("step %d: %s", done, record)

    def validates_at(self, done: int) -> bool:
        s = self.settings
        return bool(self.validation or self.forgetting) and (
            bool(s.eval_every and done % s.eval_every == 0) or done == s.total_steps)

    def validate(self, done: int) -> tuple[bool, bool]:
        """A validation pass (loss, sample metrics, the forgetting guard); returns (a checkpoint to keep, stop
        early)."""
        result, improved, stop = {}, False, False
        if self.validation:
            result = evaluate(self.model, self.objective, self.validation, self.settings.eval_batch_size,
                              self.pad_token_id, self.accelerator)
            if self.sample_eval is not None:
                result.update(self.sample_eval(self.model))
            self.summary.eval_loss = result["loss"]
            log.info("step %d: validation loss %.4f", done, result["loss"])
        if self.forgetting is not None:
            general, self.forgot = self.forgetting.check(self.model, done)
            result.update(general)
            self.model.train()
            if self.forgetting.stop and not self.forgot:
                self.last_good, improved = done, True  # saved, and kept
        self.summary.eval_metrics = {k: v for k, v in result.items() if k != "loss"}
        record = {"step": done, **{f"eval_{k}": v for k, v in result.items()}}
        if self.accelerator.is_main_process:
            self.tracker.log(record)
        if self.best is not None and self.validation:
            improved = self.best.update(done, record) or improved
            stop = self.best.exhausted() and done < self.settings.total_steps
            if self.accelerator.is_main_process:
                self.best.write(self.checkpoints)
        return improved, stop

    def save_if_due(self, done: int, wanted: bool) -> bool:
        """A checkpoint at the save interval, at the last step, or when `wanted`; returns whether one was written."""
        s = self.settings
        due = (s.save_every and done % s.save_every == 0) or done == s.total_steps or wanted
        if due:
            self.save(done)
        return bool(due)

    def save(self, done: int) -> None:
        keep = ((self.best.best[0],) if self.best is not None and self.best.best else ()) + \
            ((self.last_good,) if self.last_good else ())
        state = {**self.checkpoint_state, "nonfinite_steps": self.summary.nonfinite_steps}
        if self.forgetting is not None:  # a resumed run compares with the scores before its first step
            state["forgetting_baseline"] = self.forgetting.baseline_state()
        _save(self.model, self.optimizer, self.scheduler, self.accelerator, self.run_dir, done,
              self.settings.keep_last, state, keep)

    def early_stop(self, done: int) -> None:
        b = self.best
        log.info("early stopping at step %d: %s has not improved for %d validation passes (best %.4f at step %d)",
                 done, b.metric, b.patience, b.best[1], b.best[0])
        self.summary.steps = done

    def preempt(self, done: int, signal_name: str, saved: bool) -> None:
        if not saved:
            self.save(done)
        log.warning("stopped by %s after step %d of %d: checkpoint %s written; continue with --resume",
                    signal_name, done, self.settings.total_steps, self.checkpoints / f"step-{done}")
        self.summary.steps = done
        self.summary.preempted = {"signal": signal_name, "step": done}

    def finish(self) -> FitSummary:
        self.bar.close()
        if self.forgetting is not None:
            self.summary.forgetting = {
                "sets": self.forgetting.summary(), "stopped": bool(self.forgetting.stop and self.forgot),
                "last_good": str(self.checkpoints / f"step-{self.last_good}") if self.last_good else None}
        if self.best is not None and self.best.best:
            step, value = self.best.best
            self.summary.best = {"metric": self.best.metric, "step": step, "value": value,
                                 "checkpoint": str(self.checkpoints / f"step-{step}")}
        return self.summary


def _on_nonfinite(step: int, stats: dict, policy: str, checkpoints: Path, count: int) -> None:
    """Log a skipped step, or raise NonFiniteError when the policy is to stop."""
    what = f"step {step}: non-finite loss ({stats['loss_sum']}) or gradient norm ({stats['grad_norm']})"
    if policy == "stop":
        last = latest_checkpoint(checkpoints)
        raise NonFiniteError(
            f"{what}; stopped before the update (train.on_nonfinite=stop); the last good checkpoint is "
            f"{last if last is not None else 'none (none was written yet)'}; lower train.lr or check the data, "
            "or set train.on_nonfinite=skip to drop such steps"
        )
    log.warning("%s: the update was skipped (train.on_nonfinite=skip); %d step(s) skipped so far", what, count)


def train_step(model, objective: Objective, optimizer, scheduler, accelerator: Accelerator,
               micro_batches: list[dict[str, torch.Tensor]], max_grad_norm: float | None, step: int = 0,
               real: int | None = None) -> dict:
    """One optimizer step over a window of micro-batches; the loss is normalised by the window's global units.
    Micro-batches after the first `real` ones are padding: they run (for the gradient synchronisation) with
    weight 0 and count nothing.

    A non-finite loss or gradient norm is never applied: the optimizer does not step, the schedule does, and
    `nonfinite` is True in the returned stats (`fit` then skips or stops). Under an fp16 gradient scaler,
    overflowing steps are the scaler's to skip (it also lowers its scale), so they are not reported."""
    real = len(micro_batches) if real is None else real
    micro_batches = [{k: v.to(accelerator.device) for k, v in b.items()} for b in micro_batches]
    if objective.prepare is not None:  # e.g. KTO's reference point, GRPO's rollouts
        objective.prepare(model, micro_batches, accelerator, step)
    local_units = sum(objective.count_units(b) for b in micro_batches[:real])
    global_units = int(accelerator.reduce(torch.tensor(local_units, device=accelerator.device), "sum"))
    # DDP averages gradients over processes; multiplying by their number turns that into a sum.
    scale = accelerator.num_processes / max(global_units, 1)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:  # its engine divides every micro-batch's loss by gradient_accumulation_steps (= train.grad_accum)
        scale *= accelerator.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"]
    loss_sum = torch.zeros((), device=accelerator.device)
    tokens = 0
    metric_sums: dict[str, float] = {}
    for i, batch in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1
        if deepspeed:  # the engine steps (clips, updates, zeroes) in the backward of the window's last micro-batch
            accelerator.gradient_state._set_sync_gradients(sync)
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            out = objective.loss(model, batch)
            accelerator.backward(out.loss_sum * (scale if i < real else 0.0))
        if i >= real:
            _add(metric_sums, {name: 0.0 for name in out.metrics})  # every process reduces the same names
            continue
        loss_sum += out.loss_sum.detach()
        tokens += example_tokens(batch)
        _add(metric_sums, out.metrics)
    grad_norm = accelerator.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad], max_grad_norm or float("inf")
    )
    lr = optimizer.param_groups[0]["lr"]
    total_loss = float(accelerator.reduce(loss_sum, "sum"))  # the same on every process, as is grad_norm
    nonfinite = not (math.isfinite(total_loss) and math.isfinite(float(grad_norm))) and accelerator.scaler is None
    if not nonfinite:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss_sum": total_loss,
        "nonfinite": nonfinite,
        "units": global_units,
        "tokens": int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum")),
        "grad_norm": float(grad_norm),
        "lr": lr,
        "metrics": _reduce_metrics(metric_sums, accelerator),
    }


def _add(sums: dict[str, float], metrics: dict[str, float]) -> None:
    for name, value in metrics.items():
        sums[name] = sums.get(name, 0.0) + float(value)


def _reduce_metrics(sums: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    """Objective metrics summed over processes (every process reports the same names)."""
    if not sums or accelerator.num_processes == 1:
        return sums
    names = sorted(sums)
    total = accelerator.reduce(torch.tensor([sums[n] for n in names], device=accelerator.device), "sum")
    return dict(zip(names, total.tolist()))


@torch.no_grad()
def evaluate_loss(model, objective: Objective, examples: Sequence[Example], batch_size: int, pad_token_id: int,
                  accelerator: Accelerator) -> float:
    """Loss over `examples`, weighted by loss units (not a mean of batch means); memory independent of size."""
    return evaluate(model, objective, examples, batch_size, pad_token_id, accelerator)["loss"]


@torch.no_grad()
def evaluate(model, objective: Objective, examples: Sequence[Example], batch_size: int, pad_token_id: int,
             accelerator: Accelerator) -> dict[str, float]:
    """The objective's loss and metrics over `examples`, each divided by the total loss units (a
    unit-weighted mean, not a mean of batch means); memory independent of the number of examples."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    units = 0
    metric_sums: dict[str, float] = {}
    rank, world = accelerator.process_index, accelerator.num_processes
    starts = range(rank * batch_size, len(examples), batch_size * world)
    # Every process runs as many forwards as the first (FSDP's weight gathers are collective): one that has run
    # out of batches runs the first one again and discards it.
    rounds = math.ceil(math.ceil(len(examples) / batch_size) / world)
    for i in range(rounds):
        start = starts[i] if i < len(starts) else 0
        batch = objective.collate(examples[start : start + batch_size], pad_token_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        if objective.prepare is not None:
            objective.prepare(model, [batch], accelerator, None)
        out = objective.loss(model, batch)
        if i >= len(starts):
            continue
        loss_sum += out.loss_sum.double()
        units += out.num_units
        _add(metric_sums, out.metrics)
    total = accelerator.reduce(loss_sum, "sum")
    total_units = float(accelerator.reduce(torch.tensor(units, device=accelerator.device), "sum"))
    model.train(was_training)
    metrics = _reduce_metrics(metric_sums, accelerator)
    return {"loss": float(total) / total_units, **{k: v / total_units for k, v in metrics.items()}}


def _save(model, optimizer, scheduler, accelerator: Accelerator, run_dir: Path, step: int, keep_last: int,
          state: dict, keep: tuple[int, ...] = ()) -> None:
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # config checks refuse save_every and resume
        log.warning("step %d: no checkpoint written: checkpoints of deepspeed runs are not implemented", step)
        return
    if is_sharded(model):  # every process writes its shard
        save_sharded_checkpoint(run_dir / "checkpoints", step, model, optimizer, scheduler, state, keep_last, keep)
        return
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path = save_checkpoint(run_dir / "checkpoints", step, accelerator.unwrap_model(model), optimizer,
                               scheduler, state, keep_last, keep)
        log.debug("saved %s", path)
    accelerator.wait_for_everyone()


class _Interval:
    """Sums over the steps since the last log line, so a logged loss is token-weighted over the interval."""

    def __init__(self) -> None:
        self.loss_sum, self.units, self.tokens, self.start = 0.0, 0, 0, time.perf_counter()
        self.metrics: dict[str, float] = {}
        self.nonfinite = 0  # skipped steps: counted, kept out of the averages

    def add(self, stats: dict) -> None:
        if stats.get("nonfinite"):
            self.nonfinite += 1
            return
        self.loss_sum += stats["loss_sum"]
        self.units += stats["units"]
        self.tokens += stats["tokens"]
        _add(self.metrics, stats["metrics"])

    def flush(self) -> dict:
        elapsed = time.perf_counter() - self.start
        record = {"loss": self.loss_sum / self.units, "loss_tokens": self.units, "tokens": self.tokens,
                  "tokens_per_s": self.tokens / elapsed if elapsed > 0 else 0.0,
                  **{name: value / self.units for name, value in self.metrics.items()}} if self.units else {}
        if self.nonfinite:
            record["nonfinite_steps"] = self.nonfinite
        self.__init__()
        return record
