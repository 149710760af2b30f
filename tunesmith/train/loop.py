"""The one training loop every objective runs on.

Per optimizer step: take the step's window of `grad_accum` micro-batches, count the loss units in the whole
window (all processes), backpropagate each micro-batch's summed loss divided by that global count, clip,
step. The update therefore equals that of one large batch, whatever the accumulation or process count.

The data position is derived from the step number alone (the order of an epoch depends only on the seed and
the epoch), so resuming from a checkpoint at step N replays exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from tunesmith.data.batching import epoch_batches
from tunesmith.data.tokenize import Example
from tunesmith.objectives import Objective
from tunesmith.track.sinks import Tracker
from tunesmith.train.best import BestTracker
from tunesmith.train.checkpoint import save_checkpoint

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
) -> dict:
    """Train from `start_step` to `settings.total_steps` (or an early stop); returns the last logged train and
    eval losses, the steps run and the best checkpoint.

    `sample_eval(model)` adds metrics to every validation pass (e.g. generation metrics on a sample).

    Logs train and eval records through `tracker` (metrics.jsonl and any other sinks; a no-op on processes
    other than the main one) and writes checkpoints under `run_dir/checkpoints/`; `checkpoint_state` is stored
    in each checkpoint's state.json (e.g. a fingerprint of the data, checked on resume).
    """
    s = settings
    per_epoch = steps_per_epoch(len(train), s.micro_batch_size, s.grad_accum, accelerator.num_processes)
    bar = tqdm(total=s.total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (s.progress_bar and accelerator.is_main_process))
    model.train()
    interval = _Interval()
    summary: dict = {"train_loss": None, "eval_loss": None, "steps": s.total_steps}
    checkpoints = run_dir / "checkpoints"
    best = BestTracker.create(s.best_metric, s.best_mode, s.early_stopping_patience, checkpoints, start_step) \
        if s.best_metric else None
    for step in range(start_step, s.total_steps):
        own, real = padded_window(train, step, s, accelerator.process_index, accelerator.num_processes)
        micro = [objective.collate(b, pad_token_id) for b in own]
        stats = train_step(model, objective, optimizer, scheduler, accelerator, micro, s.max_grad_norm, step + 1,
                           real)
        interval.add(stats)
        done = step + 1
        if done % s.log_every == 0 or done == s.total_steps:
            record = {"step": done, "epoch": round(done / per_epoch, 4), **interval.flush(), "lr": stats["lr"],
                      "grad_norm": stats["grad_norm"]}
            summary["train_loss"] = record["loss"]
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            if accelerator.is_main_process:
                tracker.log(record)
            log.debug("step %d: %s", done, record)
        bar.update(1)
        improved = stop = False
        if validation and ((s.eval_every and done % s.eval_every == 0) or done == s.total_steps):
            result = evaluate(model, objective, validation, s.eval_batch_size, pad_token_id, accelerator)
            if sample_eval is not None:
                result.update(sample_eval(model))
            eval_loss = summary["eval_loss"] = result["loss"]
            summary["eval_metrics"] = {k: v for k, v in result.items() if k != "loss"}
            record = {"step": done, **{f"eval_{k}": v for k, v in result.items()}}
            log.info("step %d: validation loss %.4f", done, eval_loss)
            if accelerator.is_main_process:
                tracker.log(record)
            if best is not None:
                improved = best.update(done, record)
                stop = best.exhausted() and done < s.total_steps
                if accelerator.is_main_process:
                    best.write(checkpoints)
        if (s.save_every and done % s.save_every == 0) or done == s.total_steps or improved or stop:
            keep = (best.best[0],) if best is not None and best.best else ()
            _save(model, optimizer, scheduler, accelerator, run_dir, done, s.keep_last, checkpoint_state or {}, keep)
        if stop:
            log.info("early stopping at step %d: %s has not improved for %d validation passes (best %.4f at "
                     "step %d)", done, best.metric, best.patience, best.best[1], best.best[0])
            summary["steps"] = done
            break
    bar.close()
    if best is not None and best.best:
        summary["best"] = {"metric": best.metric, "step": best.best[0], "value": best.best[1],
                           "checkpoint": str(checkpoints / f"step-{best.best[0]}")}
    return summary


def train_step(model, objective: Objective, optimizer, scheduler, accelerator: Accelerator,
               micro_batches: list[dict[str, torch.Tensor]], max_grad_norm: float | None, step: int = 0,
               real: int | None = None) -> dict:
    """One optimizer step over a window of micro-batches; the loss is normalised by the window's global units.
    Micro-batches after the first `real` ones are padding: they run (for the gradient synchronisation) with
    weight 0 and count nothing."""
    real = len(micro_batches) if real is None else real
    micro_batches = [{k: v.to(accelerator.device) for k, v in b.items()} for b in micro_batches]
    if objective.prepare is not None:  # e.g. KTO's reference point, GRPO's rollouts
        objective.prepare(model, micro_batches, accelerator, step)
    local_units = sum(objective.count_units(b) for b in micro_batches[:real])
    global_units = int(accelerator.reduce(torch.tensor(local_units, device=accelerator.device), "sum"))
    # DDP averages gradients over processes; multiplying by their number turns that into a sum.
    scale = accelerator.num_processes / max(global_units, 1)
    loss_sum = torch.zeros((), device=accelerator.device)
    tokens = 0
    metric_sums: dict[str, float] = {}
    for i, batch in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            out = objective.loss(model, batch)
            accelerator.backward(out.loss_sum * (scale if i < real else 0.0))
        if i >= real:
            _add(metric_sums, {name: 0.0 for name in out.metrics})  # every process reduces the same names
            continue
        loss_sum += out.loss_sum.detach()
        tokens += int(batch["token_mask"].sum())
        _add(metric_sums, out.metrics)
    grad_norm = accelerator.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad], max_grad_norm or float("inf")
    )
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss_sum": float(accelerator.reduce(loss_sum, "sum")),
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
    for start in range(rank * batch_size, len(examples), batch_size * world):
        batch = objective.collate(examples[start : start + batch_size], pad_token_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        if objective.prepare is not None:
            objective.prepare(model, [batch], accelerator, None)
        out = objective.loss(model, batch)
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

    def add(self, stats: dict) -> None:
        self.loss_sum += stats["loss_sum"]
        self.units += stats["units"]
        self.tokens += stats["tokens"]
        _add(self.metrics, stats["metrics"])

    def flush(self) -> dict:
        elapsed = time.perf_counter() - self.start
        record = {"loss": self.loss_sum / self.units, "loss_tokens": self.units, "tokens": self.tokens,
                  "tokens_per_s": self.tokens / elapsed if elapsed > 0 else 0.0,
                  **{name: value / self.units for name, value in self.metrics.items()}}
        self.__init__()
        return record
