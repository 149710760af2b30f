"""Metric sinks: one record fanned out to `metrics.jsonl` and to each configured tracker.

    tracker = create_tracker(run_dir, cfg.tracking, accelerator.is_main_process, resume_step)
    tracker.log_params(to_dict(cfg))
    tracker.log({"step": 10, "loss": 2.3, "lr": 1e-4})     # -> train/loss, train/lr
    tracker.log({"step": 10, "eval_loss": 2.5})             # -> eval/loss
    tracker.log_artifact(run_dir / "report.json")
    tracker.close()

`metrics.jsonl` is the record of truth: it gets every record in full and a failure to write it stops the run.
The other sinks get the numeric values only. A sink that fails (a tracking server gone away) is reported in
the log; after `MAX_FAILURES` failures in a row it is switched off so it cannot stall or crash training.
Only the main process writes: on other processes the tracker has no sinks at all.
"""

from __future__ import annotations

import importlib
import json
import logging
import numbers
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol

from tunesmith.config.schema import TrackingConfig
from tunesmith.errors import ConfigError
from tunesmith.track.metrics import MetricsFile

log = logging.getLogger(__name__)

MAX_FAILURES = 3

# sink name -> (module that must import, package a user installs)
SINK_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny"),
}


class Sink(Protocol):
    name: str

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def log_params(self, config: dict[str, Any]) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def close(self, failed: bool) -> None: ...


# ---------------------------------------------------------------------------------------------------
# The tracker


class Tracker:
    """Fans records out to `metrics.jsonl` (when `metrics` is given) and to `sinks`; usable as a context
    manager that closes the sinks, marking their runs failed when the block raised."""

    def __init__(self, metrics: MetricsFile | None = None, sinks: list[Sink] = ()) -> None:
        self.metrics = metrics
        self.sinks = list(sinks)
        self._failures = {sink.name: 0 for sink in self.sinks}

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (it has a "step"); scalar sinks get its numbers as train/<key> or eval/<key>."""
        if self.metrics is not None:
            self.metrics.write(record)
        scalars = scalar_metrics(record)
        for sink in list(self.sinks) if scalars else []:
            self._call(sink, "log", record["step"], scalars)

    def log_params(self, config: dict[str, Any]) -> None:
        """The resolved config, nested as `to_dict(cfg)` returns it; each sink flattens it as it needs."""
        for sink in list(self.sinks):
            self._call(sink, "log_params", config)

    def log_artifact(self, path: Path) -> None:
        """A file of the run (report, plot) attached to each sink's run."""
        for sink in list(self.sinks):
            self._call(sink, "log_artifact", Path(path))

    def close(self, failed: bool = False) -> None:
        for sink in self.sinks:
            self._call(sink, "close", failed)
        self.sinks = []

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def _call(self, sink: Sink, method: str, *args: Any) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception as exc:  # noqa: BLE001 - a tracking service must not end a training run
            self._failures[sink.name] += 1
            log.warning("tracking: %s failed in %s (%s: %s)", sink.name, method, type(exc).__name__, exc)
            if self._failures[sink.name] >= MAX_FAILURES and sink in self.sinks:
                log.warning("tracking: %s failed %d times in a row and is switched off for this run; "
                            "metrics.jsonl still has every record", sink.name, MAX_FAILURES)
                self.sinks.remove(sink)
        else:
            self._failures[sink.name] = 0


def create_tracker(run_dir: Path, cfg: TrackingConfig, is_main_process: bool,
                   resume_step: int | None = None) -> Tracker:
    """The tracker of a run. Every process checks that the sinks' packages import (so all fail alike, before
    training); only the main process opens `metrics.jsonl` (truncated after `resume_step`) and the sinks."""
    names = list(dict.fromkeys(cfg.sinks))
    require_sink_packages(names)
    if not is_main_process:
        return Tracker()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sinks: list[Sink] = []
    try:
        for name in names:
            sinks.append(_open_sink(name, run_dir, cfg, resume_step))
    except BaseException:
        Tracker(sinks=sinks).close(failed=True)
        raise
    # Only once every sink opened: a refused start leaves metrics.jsonl as it was.
    return Tracker(MetricsFile(run_dir / "metrics.jsonl", resume_step=resume_step), sinks)


def require_sink_packages(names: list[str]) -> None:
    """Raise one clear ConfigError line for the first sink whose package does not import."""
    for name in names:
        module, package = SINK_PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            cause = "" if getattr(exc, "name", None) == module else f" (importing it failed: {exc})"
            raise ConfigError(f"tracking.sinks: {name!r} needs the {package} package: "
                              f'pip install "tunesmith[track]"{cause}') from None


def _open_sink(name: str, run_dir: Path, cfg: TrackingConfig, resume_step: int | None) -> Sink:
    """Turn the config into plain arguments for one sink."""
    if name == "tensorboard":
        # On resume, TensorBoard hides the events the interrupted run wrote past its checkpoint.
        return TensorBoardSink(run_dir / "tensorboard", purge_step=resume_step + 1 if resume_step else None)
    tags = {"tunesmith.run_dir": str(run_dir.resolve())}
    if resume_step:
        tags["tunesmith.resumed_from_step"] = str(resume_step)
    if name == "wandb":
        w = cfg.wandb
        return WandbSink(w.project, w.entity, w.name or run_dir.name, w.mode, Path(w.dir) if w.dir else run_dir,
                         tags)
    if name == "mlflow":
        m = cfg.mlflow
        uri = m.tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        return MlflowSink(uri, m.experiment, m.run_name or run_dir.name, tags)
    raise ValueError(f"unknown sink {name!r}")


# ---------------------------------------------------------------------------------------------------
# Record -> scalars, config -> flat params


def scalar_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a record, named for dashboards: eval_loss -> eval/loss, lr -> train/lr.

    The step is the x axis, not a metric; strings, None and booleans are skipped.
    """
    scalars = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        name = f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"
        scalars[name] = float(value)
    return scalars


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.001}} -> {"train.lr": "0.001"}; lists and null as JSON text."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat


# ---------------------------------------------------------------------------------------------------
# The sinks: each small, each given plain arguments


class TensorBoardSink:
    """Event files under `log_dir`: scalars, the config as text, PNGs as images, reports as text."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=10)
        self.last_step = 0

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.last_step = step

    def log_params(self, config: dict[str, Any]) -> None:
        import yaml

        text = yaml.safe_dump(config, sort_keys=False)
        # Markdown: indented lines render as a code block in TensorBoard's text tab.
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), global_step=0)

    def log_artifact(self, path: Path) -> None:
        if path.suffix == ".png":
            from matplotlib.image import imread

            self.writer.add_image(path.stem, imread(path)[..., :3], global_step=self.last_step, dataformats="HWC")
        elif path.suffix in (".md", ".json", ".yaml", ".txt"):
            text = path.read_text(encoding="utf-8")
            body = text if path.suffix == ".md" else "".join(f"    {line}\n" for line in text.splitlines())
            self.writer.add_text(path.name, body, global_step=self.last_step)
        else:
            log.debug("tensorboard: %s is neither an image nor text, not logged", path)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run. Offline mode writes `<dir>/wandb/offline-run-*`, which `wandb sync` uploads later."""

    name = "wandb"

    def __init__(self, project: str, entity: str | None, run_name: str, mode: str, directory: Path,
                 tags: dict[str, str]) -> None:
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        try:
            # create_new: a run of the caller's own (a notebook's) is left alone.
            self.run = wandb.init(project=project, entity=entity, name=run_name, mode=mode, dir=str(directory),
                                  config={"tunesmith": tags}, reinit="create_new")
        except wandb.errors.Error as exc:
            raise ConfigError(f"tracking.wandb: could not start a W&B run in {mode} mode: {exc}") from None
        log.info("tracking: W&B run %s (%s) in %s", self.run.id, mode, self.run.dir)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def log_params(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_artifact(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowSink:
    """An MLflow run in `experiment` at `tracking_uri` (a server, or a local `file:` store)."""

    name = "mlflow"

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            with _file_store_allowed(tracking_uri):
                self.client = MlflowClient(tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        except MlflowException as exc:
            raise ConfigError(f"tracking.mlflow: could not start a run at {tracking_uri}: {exc.message}") from None
        log.info("tracking: MLflow run %s in experiment %r at %s", self.run_id, experiment, tracking_uri)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def log_params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        params = [Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in flatten(config).items()]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


@contextmanager
def _file_store_allowed(tracking_uri: str) -> Iterator[None]:
    """Recent MLflow releases refuse a `file:` store unless MLFLOW_ALLOW_FILE_STORE is set; asking for one in
    the config is that opt-in. Set only while the store is built (MLflow keeps the built store), and never over
    a value the user set."""
    if not tracking_uri.startswith("file:") or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        del os.environ["MLFLOW_ALLOW_FILE_STORE"]
