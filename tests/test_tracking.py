"""Tracking sinks (metrics.jsonl, TensorBoard, W&B offline, MLflow file store), plots and `tunesmith report`.

Every sink is read back with its own library's reader; nothing touches the network.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
from pathlib import Path

import pytest
import yaml

from conftest import chat_rows, write_jsonl
from test_train import run_config
from tunesmith.config import TrackingConfig, build, config_from_dict, load_config
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.track.metrics import MetricsFile, read_metrics
from tunesmith.track.plots import plot_before_after, plot_loss_curve, plot_training_curves
from tunesmith.track.report import report_command
from tunesmith.track.sinks import Tracker, create_tracker, flatten, scalar_metrics

PNG = b"\x89PNG\r\n\x1a\n"

# What the loop logs: train records every step, an evaluation every second step.
RECORDS = [
    {"step": 1, "epoch": 0.25, "loss": 3.5, "loss_tokens": 40, "tokens": 90, "tokens_per_s": 100.0, "lr": 1e-3,
     "grad_norm": 2.0},
    {"step": 2, "epoch": 0.5, "loss": 3.0, "loss_tokens": 41, "tokens": 91, "tokens_per_s": 110.0, "lr": 9e-4,
     "grad_norm": 1.5},
    {"step": 2, "eval_loss": 3.25},
    {"step": 3, "epoch": 0.75, "loss": 2.5, "loss_tokens": 42, "tokens": 92, "tokens_per_s": 120.0, "lr": 8e-4,
     "grad_norm": 1.0, "note": "not a number", "missing": None},
    {"step": 4, "epoch": 1.0, "loss": 2.0, "loss_tokens": 43, "tokens": 93, "tokens_per_s": 130.0, "lr": 7e-4,
     "grad_norm": 0.5},
    {"step": 4, "eval_loss": 2.75},
]
TRAIN_LOSS = {1: 3.5, 2: 3.0, 3: 2.5, 4: 2.0}
EVAL_LOSS = {2: 3.25, 4: 2.75}
CONFIG = {"train": {"lr": 0.001, "betas": [0.9, 0.999], "max_steps": None}, "strategy": {"name": "lora"}}


def tracking(**raw) -> TrackingConfig:
    return build(TrackingConfig, raw, prefix="tracking.")


def log_all(tracker: Tracker, artifacts: list[Path] = ()) -> None:
    with tracker:
        tracker.log_params(CONFIG)
        for record in RECORDS:
            tracker.log(record)
        for path in artifacts:
            tracker.log_artifact(path)


@pytest.fixture
def artifacts(tmp_path) -> list[Path]:
    """A report and a plot, as a finished run leaves them."""
    out = tmp_path / "artifacts"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"steps": 4, "train_loss": 2.0}))
    (out / "report.md").write_text("# Training report\n\n| steps | 4 |\n")
    metrics = write_jsonl(out / "metrics.jsonl", RECORDS)
    return [out / "report.json", out / "report.md", plot_training_curves(metrics, out / "loss.png")]


# ---------------------------------------------------------------------------------------------------
# Records, params


def test_scalar_metrics_names_and_skips_non_numbers():
    assert scalar_metrics(RECORDS[3]) == {"train/epoch": 0.75, "train/loss": 2.5, "train/loss_tokens": 42.0,
                                          "train/tokens": 92.0, "train/tokens_per_s": 120.0, "train/lr": 8e-4,
                                          "train/grad_norm": 1.0}
    assert scalar_metrics({"step": 2, "eval_loss": 3.25, "eval_exact_match": 0.5, "flag": True}) == {
        "eval/loss": 3.25, "eval/exact_match": 0.5}


def test_flatten_gives_dotted_keys_and_json_values():
    assert flatten(CONFIG) == {"train.lr": "0.001", "train.betas": "[0.9, 0.999]", "train.max_steps": "null",
                               "strategy.name": "lora"}


# ---------------------------------------------------------------------------------------------------
# TensorBoard


def _event_accumulator(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_tensorboard_event_files_hold_the_scalars(tmp_path, artifacts):
    run = tmp_path / "run"
    log_all(create_tracker(run, tracking(sinks=["tensorboard"]), is_main_process=True), artifacts)
    acc = _event_accumulator(run / "tensorboard")
    assert _scalars(acc, "train/loss") == pytest.approx(TRAIN_LOSS)
    assert _scalars(acc, "eval/loss") == pytest.approx(EVAL_LOSS)
    assert _scalars(acc, "train/lr") == pytest.approx({1: 1e-3, 2: 9e-4, 3: 8e-4, 4: 7e-4})
    assert not any("note" in tag or "missing" in tag for tag in acc.Tags()["scalars"])
    assert acc.Tags()["images"] == ["loss"]
    assert {"config/text_summary", "report.md/text_summary", "report.json/text_summary"} <= set(acc.Tags()["tensors"])
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "lr: 0.001" in config_text
    assert read_metrics(run / "metrics.jsonl") == RECORDS  # the record of truth keeps everything


def test_tensorboard_resume_hides_steps_past_the_checkpoint(tmp_path):
    """The interrupted run logged steps 1-4 but its last checkpoint is step 2; the resumed run logs 3-4 anew."""
    run = tmp_path / "run"
    log_all(create_tracker(run, tracking(sinks=["tensorboard"]), is_main_process=True))
    with create_tracker(run, tracking(sinks=["tensorboard"]), is_main_process=True, resume_step=2) as tracker:
        tracker.log({"step": 3, "loss": 0.3})
        tracker.log({"step": 4, "loss": 0.4})
    assert _scalars(_event_accumulator(run / "tensorboard"), "train/loss") == pytest.approx(
        {1: 3.5, 2: 3.0, 3: 0.3, 4: 0.4})
    assert [r.get("loss") for r in read_metrics(run / "metrics.jsonl")] == [3.5, 3.0, None, 0.3, 0.4]


# ---------------------------------------------------------------------------------------------------
# Weights & Biases (offline)


def wandb_records(path: Path):
    """The records of a `.wandb` file, parsed with wandb's own protobuf definitions.

    The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of
    chunks, each with a 7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last); a block's tail
    shorter than a chunk header is zero padding.
    """
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_history(records) -> dict[str, dict[int, float]]:
    """metric name -> {step: value} from the run's history records."""
    history: dict[str, dict[int, float]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, {})[record.history.step.num] = json.loads(item.value_json)
    return history


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_wandb_offline_run_holds_the_metrics(tmp_path, artifacts, wandb_env):
    run = tmp_path / "my-run"
    log_all(create_tracker(run, tracking(sinks=["wandb"]), is_main_process=True), artifacts)
    [offline] = (run / "wandb").glob("offline-run-*")  # what `wandb sync` uploads
    records = list(wandb_records(next(offline.glob("run-*.wandb"))))
    kinds = [r.WhichOneof("record_type") for r in records]
    [header] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (header.project, header.display_name) == ("tunesmith", "my-run")
    history = _wandb_history(records)
    assert history["train/loss"] == pytest.approx(TRAIN_LOSS)
    assert history["eval/loss"] == pytest.approx(EVAL_LOSS)
    assert not any("note" in k or "missing" in k for k in history)
    config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for u in r.config.update}
    assert config["train"]["lr"] == 0.001 and config["strategy"]["name"] == "lora"
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0]
    assert kinds[-1] == "exit"
    assert {"report.json", "report.md", "loss.png"} <= {p.name for p in (offline / "files").iterdir()}
    assert json.loads((offline / "files" / "report.json").read_text())["steps"] == 4


# ---------------------------------------------------------------------------------------------------
# MLflow (local file store)


def _mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # reading a file store is the same opt-in
    return MlflowClient(uri)


def _mlflow_history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_mlflow_file_store_holds_run_params_and_metrics(tmp_path, artifacts, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run = tmp_path / "my-run"
    log_all(create_tracker(run, tracking(sinks=["mlflow"]), is_main_process=True), artifacts)
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # the opt-in was only for building the store
    client = _mlflow_client((run / "mlruns").resolve().as_uri())
    [found] = client.search_runs([client.get_experiment_by_name("tunesmith").experiment_id])
    assert found.info.run_name == "my-run" and found.info.status == "FINISHED"
    assert found.data.params["train.lr"] == "0.001" and found.data.params["train.betas"] == "[0.9, 0.999]"
    assert found.data.tags["tunesmith.run_dir"] == str(run.resolve())
    assert _mlflow_history(client, found.info.run_id, "train/loss") == pytest.approx(TRAIN_LOSS)
    assert _mlflow_history(client, found.info.run_id, "eval/loss") == pytest.approx(EVAL_LOSS)
    assert not any("note" in k or "missing" in k for k in found.data.metrics)
    assert {a.path for a in client.list_artifacts(found.info.run_id)} == {"report.json", "report.md", "loss.png"}


def test_mlflow_run_marked_failed_when_training_raises(tmp_path):
    uri = (tmp_path / "store").resolve().as_uri()
    cfg = tracking(sinks=["mlflow"], mlflow={"tracking_uri": uri, "experiment": "exp", "run_name": "boom"})
    with pytest.raises(RuntimeError, match="diverged"):
        with create_tracker(tmp_path / "run", cfg, is_main_process=True) as tracker:
            tracker.log(RECORDS[0])
            raise RuntimeError("loss diverged")
    client = _mlflow_client(uri)
    [found] = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert (found.info.run_name, found.info.status) == ("boom", "FAILED")
    assert found.data.metrics["train/loss"] == 3.5


# ---------------------------------------------------------------------------------------------------
# Only the main process writes; missing packages; failing sinks


def test_non_main_process_writes_nothing(tmp_path, artifacts, wandb_env, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    tracker = create_tracker(work / "run", tracking(sinks=["tensorboard", "wandb", "mlflow"]), is_main_process=False)
    log_all(tracker, artifacts)
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("sink,module,package", [
    ("wandb", "wandb", "wandb"),
    ("mlflow", "mlflow", "mlflow-skinny"),
    ("tensorboard", "tensorboard", "tensorboard"),
])
def test_missing_package_is_one_config_error_before_anything_is_written(tmp_path, monkeypatch, sink, module,
                                                                          package):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    for is_main in (True, False):  # every process fails alike, before training
        with pytest.raises(ConfigError) as info:
            create_tracker(tmp_path / "run", tracking(sinks=["tensorboard", sink]), is_main_process=is_main)
        assert str(info.value) == (f"tracking.sinks: {sink!r} needs the {package} package: "
                                   'pip install "tunesmith[track]"')
    assert not (tmp_path / "run").exists()


class _BrokenSink:
    """A sink whose service went away: every call raises."""

    name = "broken"

    def __init__(self) -> None:
        self.calls = 0

    def log(self, step, scalars):
        self.calls += 1
        raise ConnectionError("tracking server unreachable")

    def close(self, failed):
        raise ConnectionError("tracking server unreachable")


def test_failing_sink_is_logged_then_switched_off_and_training_goes_on(tmp_path, caplog):
    broken = _BrokenSink()
    tracker = Tracker(MetricsFile(tmp_path / "metrics.jsonl"), [broken])
    with caplog.at_level(logging.WARNING, logger="tunesmith.track.sinks"):
        for record in RECORDS:
            tracker.log(record)
        tracker.close()
    assert broken.calls == 3  # then switched off
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "tracking: broken failed in log (ConnectionError: tracking server unreachable)"
    assert "broken failed 3 times in a row and is switched off" in messages[3]
    assert len(messages) == 4  # nothing more: not at close either, it is off
    assert read_metrics(tmp_path / "metrics.jsonl") == RECORDS


# ---------------------------------------------------------------------------------------------------
# Config


def test_tracking_config_defaults_and_overrides():
    default = config_from_dict({}).tracking
    assert (default.sinks, default.wandb.mode, default.wandb.project, default.mlflow.tracking_uri) == (
        [], "offline", "tunesmith", None)
    cfg = load_config(None, ["tracking.sinks=[tensorboard,mlflow]", "tracking.wandb.mode=online",
                             "tracking.wandb.name=0123", "tracking.mlflow.tracking_uri=http://localhost:5000"])
    assert cfg.tracking.sinks == ["tensorboard", "mlflow"]
    assert (cfg.tracking.wandb.mode, cfg.tracking.wandb.name) == ("online", "0123")
    assert cfg.tracking.mlflow.tracking_uri == "http://localhost:5000"
    assert load_config(None, ["tracking.sinks=wandb"]).tracking.sinks == ["wandb"]


@pytest.mark.parametrize("overrides,message", [
    (["tracking.sinks=[tensorbord]"],
     "tracking.sinks[0]: 'tensorbord' is not one of 'tensorboard', 'wandb', 'mlflow' (did you mean 'tensorboard'?)"),
    (["tracking.wandb.mode=shared"], "tracking.wandb.mode: 'shared' is not one of 'offline', 'online'"),
    (["tracking.wandb.projet=x"],
     "unknown config key 'tracking.wandb.projet' (did you mean 'tracking.wandb.project'?)"),
    (["tracking.mlflow.experiment_name=x"],
     "unknown config key 'tracking.mlflow.experiment_name' (did you mean 'tracking.mlflow.experiment'?)"),
])
def test_bad_tracking_keys_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert str(info.value).startswith(message)


# ---------------------------------------------------------------------------------------------------
# Plots and `tunesmith report`


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_plots_are_pngs_of_the_expected_size(tmp_path):
    metrics = write_jsonl(tmp_path / "metrics.jsonl", RECORDS)
    assert _png_size(plot_training_curves(metrics, tmp_path / "curves.png")) == (600, 500)
    assert _png_size(plot_loss_curve(metrics, tmp_path / "loss.png")) == (600, 350)
    before, after = {"exact_match": 0.2, "rougeL": 0.31, "name": "x"}, {"exact_match": 0.6, "rougeL": 0.52}
    assert _png_size(plot_before_after(before, after, tmp_path / "ba.png", "eval")) == (430, 350)  # 1.4 * 2 + 1.5 in
    with pytest.raises(ValueError, match="no numeric metric"):
        plot_before_after({"a": 1.0}, {"b": 2.0}, tmp_path / "none.png")


def _fake_run(path: Path, records: list[dict], report: dict | None = None, config: dict | None = None) -> Path:
    path.mkdir(parents=True)
    write_jsonl(path / "metrics.jsonl", records)
    if report is not None:
        (path / "report.json").write_text(json.dumps(report))
    if config is not None:
        (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def test_report_compares_runs_in_one_table_and_plot(tmp_path, capsys):
    lora = _fake_run(tmp_path / "runs" / "lora", RECORDS, report={
        "steps": 4, "trainable_parameters": 12288, "seconds": 12.34,
        "config": {"train": {"objective": "sft"}, "strategy": {"name": "lora"}}})
    # An interrupted full fine-tune: no report.json yet, only its config and metrics.
    full = _fake_run(tmp_path / "runs" / "full", [{"step": 1, "loss": 4.0}, {"step": 1, "eval_loss": 3.9},
                                                  {"step": 2, "loss": 3.0}, {"step": 2, "eval_loss": 3.95}],
                     config={"train": {"objective": "clm"}, "strategy": {"name": "full"}})
    out = tmp_path / "cmp"
    report_command([str(lora), str(full)], str(out))
    lines = (out / "comparison.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("| ")]
    assert table[0] == ("| run | steps | final train loss | best eval loss | last eval loss | trainable params | "
                        "seconds | objective | strategy |")
    assert table[1] == "| lora | 4 | 2.0000 | 2.7500 | 2.7500 | 12,288 | 12.3 | sft | lora |"
    assert table[2] == "| full | 2 | 3.0000 | 3.9000 | 3.9500 | - | - | clm | full |"
    assert "![loss curves](comparison.png)" in lines
    assert _png_size(out / "comparison.png") == (700, 400)
    assert table[1] in capsys.readouterr().out

    report_command([str(full)], None)  # default output: the first run directory
    assert (full / "comparison.md").is_file() and (full / "comparison.png").is_file()


def test_report_names_a_run_without_metrics(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunesmithError, match=str(tmp_path / "empty" / "metrics.jsonl")):
        report_command([str(tmp_path / "empty")], str(tmp_path / "out"))


# ---------------------------------------------------------------------------------------------------
# End to end: `train` with TensorBoard and MLflow


def test_train_writes_the_same_losses_to_every_sink(tmp_path, model_dirs):
    from tunesmith.train.run import train

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8, seed=3))
    val = write_jsonl(tmp_path / "val.jsonl", chat_rows(3, seed=4))
    out = tmp_path / "run"
    raw = run_config(model_dirs["llama"], data, out, data={"validation": [str(val)]},
                     train={"max_steps": 4, "micro_batch_size": 2}, eval={"every": 2},
                     tracking={"sinks": ["tensorboard", "mlflow"]})
    train(config_from_dict(raw))

    records = read_metrics(out / "metrics.jsonl")
    train_loss = {r["step"]: r["loss"] for r in records if "loss" in r}
    eval_loss = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(train_loss) == [1, 2, 3, 4] and sorted(eval_loss) == [2, 4]

    acc = _event_accumulator(out / "tensorboard")
    assert _scalars(acc, "train/loss") == pytest.approx(train_loss, rel=1e-6)  # float32 in event files
    assert _scalars(acc, "eval/loss") == pytest.approx(eval_loss, rel=1e-6)
    assert "loss" in acc.Tags()["images"]

    client = _mlflow_client((out / "mlruns").resolve().as_uri())
    [found] = client.search_runs([client.get_experiment_by_name("tunesmith").experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert _mlflow_history(client, found.info.run_id, "train/loss") == train_loss  # float64: exact
    assert _mlflow_history(client, found.info.run_id, "eval/loss") == eval_loss
    assert found.data.params["train.max_steps"] == "4" and found.data.params["tracking.sinks"] == (
        '["tensorboard", "mlflow"]')
    assert {"config.yaml", "report.json", "report.md", "loss.png"} <= {
        a.path for a in client.list_artifacts(found.info.run_id)}
