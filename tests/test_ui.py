"""tunesmith.ui without a browser: its folders (traversal, links out, outputs outside refused), run folders read as
they are (half-written, damaged, stopped, killed), launch checks, the guard (token, host, origin), the data
preview. (Nothing but the CLI imports the studio: tests/test_layers.py.) The page itself: tests/test_ui_browser.py."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from conftest import chat_rows, write_jsonl
from tunesmith.cli import main
from tunesmith.errors import ConfigError

pytest.importorskip("fastapi", reason="the ui extra is not installed (pip install 'tunesmith[ui]')")
from starlette.testclient import TestClient  # noqa: E402

from tunesmith.ui.app import Settings, create_app  # noqa: E402
from tunesmith.ui.command import loopback_hosts, require_ui_packages, ui_command  # noqa: E402
from tunesmith.ui.jobs import JOBS_DIR, Job, Jobs, write_record  # noqa: E402
from tunesmith.ui.metrics import read_chunk  # noqa: E402
from tunesmith.ui.sandbox import Sandbox  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_recipe(model_dir: Path, data_file: Path, output_dir: str, **train) -> str:
    """A small LoRA SFT recipe as YAML (relative output_dir: resolved against the project root, as the CLI does)."""
    raw = {"model": {"name_or_path": str(model_dir)},
           "data": {"train": [str(data_file)], "template": "chatml", "max_seq_len": 64},
           "strategy": {"name": "lora", "lora": {"r": 4, "alpha": 8}},
           "train": {"output_dir": output_dir, "max_steps": 4, "micro_batch_size": 2, "lr": 1e-3, **train},
           "tracking": {"progress_bar": False, "log_level": "warning"}}
    return yaml.safe_dump(raw, sort_keys=False)


def make_project(root: Path, model_dir: Path) -> Sandbox:
    """root/configs/tiny.yaml (writes runs/tiny) and an empty root/runs/."""
    root.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(root / "train.jsonl", chat_rows(16))
    (root / "configs").mkdir()
    (root / "runs").mkdir()
    (root / "configs" / "tiny.yaml").write_text(tiny_recipe(model_dir, data, "runs/tiny"))
    return Sandbox(root, Path("runs"), Path("configs"))


def fake_run(run: Path, steps: int, checkpoint: int | None = None, final: bool = False,
             stopped_at: int | None = None, config: bool = True) -> Path:
    """A run folder as training leaves it, written by hand (no model): metrics, log, checkpoint, final/, report."""
    run.mkdir(parents=True)
    if config:
        (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "strategy": {"name": "lora"},
                                                         "train": {"objective": "sft", "max_steps": 10}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3}) + "\n"
                                               for s in range(1, steps + 1)))
    log = "2026-01-01 10:00:00,000 WARNING tunesmith.train.run: start\n"
    if stopped_at is not None:
        log += (f"2026-01-01 10:00:05,000 WARNING tunesmith.train.loop: stopped by SIGTERM after step {stopped_at} of "
                f"10: checkpoint {run}/checkpoints/step-{stopped_at} written; continue with --resume\n")
    (run / "train.log").write_text(log)
    if checkpoint is not None:
        (run / "checkpoints" / f"step-{checkpoint}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{checkpoint}" / "manifest.json").write_text('{"files": {}}')
    if final:
        (run / "final").mkdir()
        (run / "report.json").write_text(json.dumps({"steps": steps, "seconds": 12.5}))
    old = time.time() - 3600  # written long ago: nothing is still running
    for path in run.rglob("*"):
        os.utime(path, (old, old))
    return run


@pytest.fixture
def project(tmp_path, model_dirs) -> Sandbox:
    return make_project(tmp_path / "project", model_dirs["llama"])


def client(sandbox: Sandbox, **settings) -> TestClient:
    return TestClient(create_app(Settings(sandbox, **settings)))


def rows_by_id(c: TestClient) -> dict[str, dict]:
    response = c.get("/api/runs")
    assert response.status_code == 200, response.text
    return {r["id"]: r for r in response.json()["runs"]}


# ------------------------------------------------------------------------------------------------
# Folders: nothing outside --runs and configs/


@pytest.mark.parametrize("run_id", ["../configs", "/etc", "a/../../x", "..", "", "a\\..\\b"])
def test_paths_outside_the_runs_folder_are_refused(project, run_id):
    fake_run(project.runs / "a", 3)
    response = client(project).get("/api/run", params={"id": run_id})
    assert response.status_code == 403 and response.json()["error"].startswith(f"run {run_id!r}: ")


def test_a_link_pointing_out_is_neither_listed_nor_readable(project, tmp_path):
    outside = fake_run(tmp_path / "outside" / "secret-run", 3)
    (project.runs / "escape").symlink_to(outside, target_is_directory=True)
    (project.configs / "escape.yaml").symlink_to(outside / "config.yaml")
    c = client(project)
    assert "escape" not in rows_by_id(c)
    for path, params in (("/api/run", {"id": "escape"}), ("/api/metrics", {"id": "escape"}),
                         ("/api/config", {"ref": "recipe:escape.yaml"}),
                         ("/api/config", {"ref": "recipe:../project/configs/tiny.yaml"})):
        response = c.get(path, params=params)
        assert response.status_code == 403, (path, response.text)
        assert "outside" in response.json()["error"] or "only paths inside" in response.json()["error"]
    assert "recipe:escape.yaml" not in c.get("/api/info").json()["recipes"]


@pytest.mark.parametrize("override, key", [("train.output_dir=/tmp/elsewhere", "train.output_dir"),
                                           ("train.output_dir=runs/../../elsewhere", "train.output_dir"),
                                           ("eval.output_dir=/tmp/elsewhere", "eval.output_dir"),
                                           ("data.cache_dir=/tmp/cache", "data.cache_dir")])
def test_a_config_writing_outside_the_runs_folder_is_refused(project, override, key):
    response = client(project).post("/api/launch", json={"command": "train", "config": "recipe:tiny.yaml",
                                                         "overrides": [override]})
    assert response.status_code == 403
    assert response.json()["error"].startswith(f"{key}: ") and "outside the runs folder" in response.json()["error"]
    assert not list(project.root.parent.glob("elsewhere"))


def test_a_recipe_whose_output_dir_points_outside_is_refused(project):
    (project.configs / "bad.yaml").write_text((project.configs / "tiny.yaml").read_text().replace(
        "output_dir: runs/tiny", "output_dir: /tmp/tunesmith-ui-escape"))
    response = client(project).post("/api/launch", json={"command": "prepare", "config": "recipe:bad.yaml"})
    assert response.status_code == 403 and "train.output_dir: /tmp/tunesmith-ui-escape" in response.json()["error"]


def test_a_link_inside_the_runs_folder_leading_out_is_not_an_output(project, tmp_path):
    (tmp_path / "out").mkdir()
    (project.runs / "link").symlink_to(tmp_path / "out", target_is_directory=True)
    response = client(project).post("/api/launch", json={"command": "prepare", "config": "recipe:tiny.yaml",
                                                         "overrides": ["train.output_dir=runs/link/x"]})
    assert response.status_code == 403 and "outside the runs folder" in response.json()["error"]


# ------------------------------------------------------------------------------------------------
# Run folders read as they are


def test_statuses_of_finished_stopped_killed_and_unfinished_runs(project):
    fake_run(project.runs / "done", 10, checkpoint=10, final=True)
    fake_run(project.runs / "stopped", 4, checkpoint=4, stopped_at=4)
    fake_run(project.runs / "killed", 6, checkpoint=4)  # died after its last checkpoint
    fake_run(project.runs / "resumed-then-killed", 7, checkpoint=6, stopped_at=4)
    rows = rows_by_id(client(project))
    assert {k: rows[k]["status"] for k in rows} == {"done": "finished", "stopped": "preempted", "killed": "failed",
                                                    "resumed-then-killed": "failed"}
    assert rows["stopped"]["reason"] == "stopped by SIGTERM after step 4; checkpoint step-4 written"
    assert (rows["stopped"]["step"], rows["stopped"]["total_steps"], rows["stopped"]["resumable"]) == (4, 10, True)
    assert (rows["done"]["wall_seconds"], rows["done"]["last_loss"], rows["done"]["best_loss"]) == (
        12.5, pytest.approx(2.0), pytest.approx(2.0))


def test_a_damaged_or_half_written_run_shows_as_such(project):
    run = fake_run(project.runs / "broken", 3)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "loss": oops}\n[1, 2]\n{"step": 5, "lo')  # damaged, not a record, being written
    (run / "config.yaml").write_text("model: [unclosed\n")
    (project.runs / "empty-jobs" / JOBS_DIR).mkdir(parents=True)
    (project.runs / "empty-jobs" / JOBS_DIR / "x.json").write_text("{not json")
    c = client(project)
    rows = rows_by_id(c)
    assert rows["broken"]["step"] == 3
    assert rows["broken"]["problems"] == ["config.yaml: unreadable, damaged or still being written (ParserError)",
                                          "metrics.jsonl: 2 damaged line(s) skipped"]
    assert rows["empty-jobs"]["status"] == "failed"
    detail = c.get("/api/run", params={"id": "broken"})
    assert detail.status_code == 200 and detail.json()["checkpoints"] == []
    assert c.get("/", headers={"Accept": "text/html"}).status_code == 200


def test_metrics_are_read_incrementally(tmp_path):
    """Complete lines only; a line being written waits; a rewritten (shorter) file restarts from the top."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    first = read_chunk(path)
    assert [r["step"] for r in first.records] == [1] and first.partial and first.offset == 25
    with open(path, "a") as fh:
        fh.write('ss": 1.5}\nnot json\n')
    second = read_chunk(path, first.offset)
    assert [r["step"] for r in second.records] == [2] and len(second.damaged) == 1 and not second.partial
    path.write_text('{"step": 1, "loss": 9.0}\n')  # a resumed run truncated the file
    third = read_chunk(path, second.offset)
    assert third.reset and third.records == [{"step": 1, "loss": 9.0}]
    assert read_chunk(tmp_path / "absent.jsonl").records == []


def test_a_job_is_found_again_after_a_restart(project):
    """A fresh Jobs (a restarted studio) tells a live job from a dead one by process id and start time."""
    import psutil

    home = project.runs / "r"
    (home / JOBS_DIR).mkdir(parents=True)
    me = psutil.Process()
    for job_id, create_time in (("alive", me.create_time()), ("reused-pid", me.create_time() - 100)):
        write_record(home / JOBS_DIR / f"{job_id}.json", Job(job_id, "train", ["train", "x"], me.pid, time.time(),
                                                       create_time))
    jobs = Jobs(project.root)
    assert {j.id: jobs.alive(j, home) for j in jobs.list(home)} == {"alive": True, "reused-pid": False}


# ------------------------------------------------------------------------------------------------
# Launching: the CLI's checks first, and only where allowed


def test_a_wrong_override_is_the_clis_one_line_error(project):
    c = client(project)
    response = c.post("/api/launch", json={"command": "train", "config": "recipe:tiny.yaml",
                                           "overrides": ["train.lrr=1e-4"]})
    assert response.status_code == 400
    assert response.json() == {"error": "unknown config key 'train.lrr' (did you mean 'train.lr'?)"}
    assert c.post("/api/launch", json={"command": "train", "config": "recipe:tiny.yaml",
                                       "overrides": ["--resume"]}).json()["error"].startswith("override '--resume'")
    assert not (project.runs / "tiny").exists()


def test_an_occupied_output_dir_and_a_run_without_checkpoint(project):
    fake_run(project.runs / "tiny", 3, checkpoint=3)
    c = client(project)
    response = c.post("/api/launch", json={"command": "train", "config": "recipe:tiny.yaml"})
    assert response.status_code == 400 and "tiny already holds a run" in response.json()["error"]
    fake_run(project.runs / "nockpt", 3)
    response = c.post("/api/resume", json={"id": "nockpt"})
    assert response.status_code == 400


def test_delivery_commands_write_inside_the_run(project):
    from tunesmith.ui.launch import plan_delivery

    run = fake_run(project.runs / "done", 10, checkpoint=10, final=True)
    assert plan_delivery(project, "done", "merge").argv == ["merge", str(run), "--output", str(run / "merged")]
    assert plan_delivery(project, "done", "export-gguf", "f16").argv[-5:] == [
        str(run / "export" / "model-f16.gguf"), "--format", "gguf", "--quant", "f16"]
    with pytest.raises(ConfigError, match="quant"):
        plan_delivery(project, "done", "export-gguf", "q2")


def test_launching_is_off_beyond_loopback_without_allow_launch(project):
    fake_run(project.runs / "done", 10, checkpoint=10, final=True)
    c = client(project, allow_launch=False)
    for path, body in (("/api/launch", {"command": "train", "config": "recipe:tiny.yaml"}),
                       ("/api/stop", {"id": "done"}), ("/api/resume", {"id": "done"}),
                       ("/api/deliver", {"id": "done", "action": "merge"})):
        response = c.post(path, json=body)
        assert response.status_code == 403 and "launching is off" in response.json()["error"], path
    assert c.get("/api/info").json()["allow_launch"] is False


# ------------------------------------------------------------------------------------------------
# The guard and the command


def test_a_token_is_required_when_set(project):
    c = client(project, token="s3cret")
    assert c.get("/api/runs").status_code == 401
    assert c.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    response = c.get("/?token=s3cret", follow_redirects=False)  # the printed link: the token becomes a cookie
    assert response.status_code == 303 and "tunesmith_ui_token=s3cret" in response.headers["set-cookie"]
    assert c.get("/api/runs").status_code == 200  # the client keeps the cookie


def test_host_origin_and_body_type_are_checked(project):
    c = client(project, hosts=loopback_hosts(80))
    assert c.get("/api/info", headers={"Host": "127.0.0.1:80"}).status_code == 200
    assert c.get("/api/info", headers={"Host": "evil.example:80"}).status_code == 403  # DNS rebinding
    body = {"command": "train", "config": "recipe:tiny.yaml", "overrides": ["train.lrr=1"]}
    headers = {"Host": "localhost:80"}
    assert c.post("/api/launch", json=body, headers={**headers, "Origin": "http://evil.example"}).status_code == 403
    assert c.post("/api/launch", content=json.dumps(body), headers={**headers, "Content-Type": "text/plain"}
                  ).status_code == 400
    assert c.post("/api/launch", json=body, headers={**headers, "Origin": "http://localhost:80"}).status_code == 400


def test_binding_beyond_loopback_needs_a_token(capsys, monkeypatch):
    monkeypatch.delenv("TUNESMITH_UI_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="needs an access token: pass --token"):
        ui_command(host="0.0.0.0")
    assert main(["ui", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --host 0.0.0.0: listening beyond loopback needs an access token") and err.count(
        "\n") == 1


def test_a_missing_extra_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(ConfigError) as info:
        require_ui_packages()
    assert str(info.value) == 'tunesmith ui needs uvicorn: pip install "tunesmith[ui]"'


def test_the_static_page_is_small_and_self_contained():
    """No file of the page loads anything from elsewhere (no CDN: the studio works offline)."""
    static = ROOT / "tunesmith" / "ui" / "static"
    for path in static.iterdir():
        text = path.read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, path.name
        assert len(text.splitlines()) < 500, path.name


# ------------------------------------------------------------------------------------------------
# Data preview


def test_preview_marks_loss_tokens_and_lists_skipped_rows(project):
    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare_command
    from tunesmith.model.run_tokenizer import build_tokenizer

    data = project.root / "train.jsonl"
    with open(data, "a") as fh:
        fh.write('{"messages": [{"role": "user", "content": 5}]}\n')
    overrides = ["data.on_error=skip", "data.max_seq_len=256"]  # nothing truncated
    cfg = load_config(project.configs / "tiny.yaml", [*overrides, f"train.output_dir={project.runs}/prep",
                                                      f"data.cache_dir={project.runs}/.cache"])
    prepare_command(cfg, build_tokenizer(cfg)[0])
    # the record a prepare started from the page leaves: the preview builds the tokenizer from its config
    argv = ["prepare", str(project.configs / "tiny.yaml"), *overrides]
    (project.runs / "prep" / JOBS_DIR).mkdir()
    write_record(project.runs / "prep" / JOBS_DIR / "p.json", Job("p", "prepare", argv, 2**22 + 1, time.time(), 0.0, 0))
    c = client(project)
    assert rows_by_id(c)["prep"]["kind"] == "prepare" and rows_by_id(c)["prep"]["status"] == "finished"
    result = c.get("/api/preview", params={"id": "prep", "split": "train", "rows": 2}).json()
    assert result["total"] == 16 and len(result["rows"]) == 2
    row = result["rows"][0]
    loss_text = "".join(s["text"] for s in row["segments"] if s["loss"])
    assert loss_text.startswith("It is ") and loss_text.endswith("<|im_end|>")
    assert "What is" in "".join(s["text"] for s in row["segments"] if not s["loss"])
    skipped = [s for s in result["skipped"] if s["skipped"]]
    assert len(skipped) == 1 and skipped[0]["errors"][0].startswith(f"{data}:17: ")
    assert c.get("/api/preview", params={"id": "prep", "split": "bogus"}).status_code == 400


@pytest.mark.slow
def test_merge_a_finished_run_from_the_studio(project):
    """The Export tab's merge: an ordinary `tunesmith merge` process writing RUN/merged/, found by its record."""
    from tunesmith.config import load_config
    from tunesmith.train.run import train

    train(load_config(project.configs / "tiny.yaml", [f"train.output_dir={project.runs / 'done'}"]))
    c = client(project)
    job = c.post("/api/deliver", json={"id": "done", "action": "merge"}).json()["job"]
    assert job["argv"] == ["merge", str(project.runs / "done"), "--output", str(project.runs / "done" / "merged")]
    deadline = time.time() + 180
    while time.time() < deadline and any(j["alive"] for j in c.get("/api/run", params={"id": "done"}).json()["jobs"]):
        time.sleep(1)
    detail = c.get("/api/run", params={"id": "done"}).json()
    assert detail["jobs"][-1]["returncode"] == 0, detail["jobs"][-1]["log"]
    assert (project.runs / "done" / "merged" / "config.json").is_file()
    assert detail["status"] == "finished" and detail["activity"] == []
