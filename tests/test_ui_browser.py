"""The studio in a real browser: Debian's headless chromium, driven through chromedriver by Selenium.

One studio over a temporary project (configs/tiny.yaml, two runs trained here in seconds, one prepared data set)
serves the page; the tests, in order, open the runs page, a finished run's curves, start a tiny training run from
the Train tab and watch its step counter and curve advance, stop it (preempted, with a checkpoint), chat with two
runs side by side, compare two runs and preview prepared rows. With TUNESMITH_UI_SCREENSHOTS=docs/ui the
screenshots of each page go there (README, "Web studio"):

    TUNESMITH_UI_SCREENSHOTS=docs/ui .venv/bin/python -m pytest -q tests/test_ui_browser.py
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from test_ui import make_project
from tunesmith.ui.jobs import Jobs

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip("no /usr/bin/chromium and /usr/bin/chromedriver (apt-get install -y chromium chromium-driver)",
                allow_module_level=True)
pytest.importorskip("selenium", reason="selenium is not installed (pip install 'tunesmith[test]')")
pytest.importorskip("uvicorn", reason="the ui extra is not installed (pip install 'tunesmith[ui]')")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = pytest.mark.ui

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")
SHOTS = os.environ.get("TUNESMITH_UI_SCREENSHOTS")  # a folder for the screenshots, e.g. docs/ui


def train_run(sandbox, name: str, *overrides: str) -> None:
    """A finished run under runs/NAME, trained in this process from configs/tiny.yaml (a few seconds)."""
    from tunesmith.config import load_config
    from tunesmith.train.run import train

    train(load_config(sandbox.configs / "tiny.yaml", [f"train.output_dir={sandbox.runs / name}", "train.max_steps=16",
                                                      "data.split.validation=0.25", "eval.every=4", *overrides]))


def prepare_run(sandbox, name: str) -> Path:
    """runs/NAME/data/: the recipe's rows plus a bad one, prepared with on_error=skip (recorded as a page job);
    returns the data file."""
    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare_command
    from tunesmith.model.run_tokenizer import build_tokenizer
    from tunesmith.ui.jobs import JOBS_DIR, Job, write_record

    data = sandbox.root / "with-bad-row.jsonl"
    data.write_text((sandbox.root / "train.jsonl").read_text() + '{"messages": [{"role": "user", "content": 5}]}\n')
    overrides = [f"data.train=[{data}]", "data.on_error=skip", "data.max_seq_len=256",
                 f"train.output_dir={sandbox.runs / name}"]
    cfg = load_config(sandbox.configs / "tiny.yaml", overrides)
    prepare_command(cfg, build_tokenizer(cfg)[0])
    (sandbox.runs / name / JOBS_DIR).mkdir()
    write_record(sandbox.runs / name / JOBS_DIR / "p.json",
           Job("p", "prepare", ["prepare", str(sandbox.configs / "tiny.yaml"), *overrides], 2**22 + 1, time.time(),
               0.0, 0))
    return data


@pytest.fixture(scope="module")
def studio(tmp_path_factory, model_dirs):
    """(base URL, sandbox) of a studio serving from a thread; launched commands run on one thread each."""
    import uvicorn

    from tunesmith.serve.server import bind
    from tunesmith.ui.app import Settings, create_app
    from tunesmith.ui.command import loopback_hosts

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores: a second thread only waits (conftest's one_thread)
    sandbox = make_project(tmp_path_factory.mktemp("studio"), model_dirs["llama"])
    train_run(sandbox, "sft-a")
    train_run(sandbox, "sft-b", "train.lr=3e-3", "strategy.lora.r=8")
    prepare_run(sandbox, "prepared")
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the launched training: tiny, on busy shared cores
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    app = create_app(Settings(sandbox, allow_launch=True, hosts=loopback_hosts(port)))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", sandbox
    _stop_jobs(sandbox)
    server.should_exit = True
    thread.join(timeout=10)
    os.environ.pop("OMP_NUM_THREADS") if previous is None else os.environ.update(OMP_NUM_THREADS=previous)
    torch.set_num_threads(threads)


def _stop_jobs(sandbox) -> None:
    jobs = Jobs(sandbox.root)
    for home in [p.parent.parent for p in sandbox.runs.glob("*/ui-jobs/*.json")]:
        for job in jobs.list(home):
            if jobs.alive(job, home):
                jobs.stop(job, home)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="tunesmith-chromium-")
    for flag in (*FLAGS, f"--user-data-dir={profile}", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait(driver, condition, timeout: float = 30, message: str = ""):
    """What `condition(driver)` returns once truthy (polled every 0.2 s; an element redrawn while it was being
    read is read again)."""
    return WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
                         ).until(lambda d: condition(d), message)


def click(driver, css: str, timeout: float = 30) -> None:
    """Click the first match once it exists (found again if a redraw replaced it in between)."""
    wait(driver, lambda d: find(d, css) is not None and (find(d, css).click() or True), timeout, f"no {css} to click")


def values(driver, css: str, attribute: str) -> list[str]:
    """An attribute of every match, read in one step."""
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])].map("
                                 "(e) => e.getAttribute(arguments[1]))", css, attribute)


def text(driver, css: str) -> str:
    """The text of the first match ("" where none), read in one step."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : ''",
                                 css)


def find(driver, css: str):
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0] if found else None


def number(driver, css: str, attribute: str) -> int:
    """An integer attribute of the first match, read in one step (the page redraws live parts every second, so
    an element found a moment ago may be gone); 0 where nothing matches."""
    value = driver.execute_script("const e = document.querySelector(arguments[0]); "
                                  "return e ? e.getAttribute(arguments[1]) : null", css, attribute)
    return int(value) if value is not None else 0


def shot(driver, name: str) -> None:
    """A screenshot of the whole page, into $TUNESMITH_UI_SCREENSHOTS when set."""
    if not SHOTS:
        return
    height = driver.execute_script("return Math.max(document.body.scrollHeight, 900)")
    driver.set_window_size(1280, min(height + 40, 2400))
    time.sleep(0.3)
    Path(SHOTS).mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(Path(SHOTS) / f"{name}.png"))
    driver.set_window_size(1280, 900)


def open_page(driver, base: str, fragment: str) -> None:
    """A fresh load of the page at `fragment` (a hash change alone keeps the page's state, e.g. the filter)."""
    driver.get("about:blank")
    driver.get(base + fragment)
    wait(driver, lambda d: find(d, f".view-{fragment.split('/')[1]}"), 15)


def test_runs_page_lists_sorts_and_filters(studio, browser):
    base, _ = studio
    open_page(browser, base, "#/runs")
    rows = wait(browser, lambda d: values(d, "#runs-table tbody tr", "data-run"))
    assert set(rows) == {"sft-a", "sft-b", "prepared"}
    assert find(browser, 'tr[data-run="sft-a"] [data-status="finished"]') is not None
    assert "16 / 16" in text(browser, 'tr[data-run="sft-a"]')  # steps
    browser.find_element(By.CSS_SELECTOR, 'th[data-sort="best_loss"]').click()
    shot(browser, "runs")
    browser.find_element(By.ID, "filter").send_keys("sft-b")
    wait(browser, lambda d: values(d, "#runs-table tbody tr", "data-run") == ["sft-b"], 10)


def test_a_finished_run_shows_its_curves_and_data(studio, browser):
    base, _ = studio
    open_page(browser, base, "#/runs")
    click(browser, 'a.run-link[href="#/run/sft-a"]')
    assert wait(browser, lambda d: number(d, '#curve-loss path.series[data-series="train"]', "data-points")) == 16
    assert number(browser, '#curve-loss path.series[data-series="validation"]', "data-points") == 4
    assert find(browser, "#curve-lr path.series") and find(browser, "#curve-tokens_per_s path.series")
    assert find(browser, "#histogram-train rect.bar") is not None
    assert "step 16 / 16" in text(browser, "#step")
    shot(browser, "run")


def test_train_from_the_page_watch_it_and_stop_it(studio, browser):
    base, sandbox = studio
    open_page(browser, base, "#/train")
    Select(wait(browser, lambda d: find(d, "#config option") and d.find_element(By.ID, "config"))).select_by_value(
        "recipe:tiny.yaml")
    overrides = browser.find_element(By.ID, "overrides")
    overrides.send_keys("train.lrr=1e-3")
    browser.find_element(By.ID, "start").click()
    error = wait(browser, lambda d: find(d, "#launch-error"))
    assert error.text == "unknown config key 'train.lrr' (did you mean 'train.lr'?)"
    assert not (sandbox.runs / "tiny").exists()
    shot(browser, "train")
    overrides.clear()
    overrides.send_keys("train.output_dir=runs/live\ntrain.max_steps=100000\ntrain.save_every=100000")
    browser.find_element(By.ID, "start").click()
    wait(browser, lambda d: d.current_url.endswith("#/run/live"), 15)
    first = wait(browser, lambda d: _step(d) >= 2 and _step(d), 120, "the run never reached step 2")
    points = wait(browser, lambda d: number(d, "#curve-loss path.series", "data-points"))
    wait(browser, lambda d: _step(d) >= first + 3, 60, "the step counter did not advance")
    wait(browser, lambda d: number(d, "#curve-loss path.series", "data-points") > points, 10, "the curve did not grow")
    assert find(browser, '[data-status="running"]') and "/ 100,000" in text(browser, "#step")
    wait(browser, lambda d: "ETA" in text(d, "#eta"), 10, "no ETA shown")
    shot(browser, "live")
    click(browser, "#stop")
    wait(browser, lambda d: find(d, '#run-head [data-status="preempted"]'), 60, "the run was not marked preempted")
    stopped = _step(browser)
    assert text(browser, "#reason").startswith(f"stopped by SIGTERM after step {stopped}")
    wait(browser, lambda d: "complete" in text(d, f'tr[data-checkpoint="step-{stopped}"]'), 10, "no checkpoint")
    assert (sandbox.runs / "live" / "checkpoints" / f"step-{stopped}" / "manifest.json").is_file()
    assert find(browser, "#resume") is not None and find(browser, "#stop") is None
    shot(browser, "preempted")


def _step(driver) -> int:
    return number(driver, "#step", "data-step")


def test_chat_with_two_runs_side_by_side(studio, browser):
    base, _ = studio
    open_page(browser, base, "#/chat/sft-a")
    Select(wait(browser, lambda d: d.find_element(By.ID, "chat-run-1"))).select_by_value("sft-b")
    assert Select(browser.find_element(By.ID, "chat-run-0")).first_selected_option.text == "sft-a"
    browser.find_element(By.ID, "chat-max-tokens").clear()
    browser.find_element(By.ID, "chat-max-tokens").send_keys("24")
    browser.find_element(By.ID, "chat-prompt").send_keys("What is 2 plus 3?")
    browser.find_element(By.ID, "chat-send").click()
    for pane in (0, 1):
        answer = wait(browser, lambda d: find(d, f'#chat-answer-{pane}[data-done="true"]'), 60)
        assert number(browser, f"#chat-answer-{pane}", "data-chunks") >= 2, "the answer was not streamed in pieces"
        assert answer.text.strip()
    assert browser.find_elements(By.CSS_SELECTOR, ".bubble.user")[0].text == "What is 2 plus 3?"
    shot(browser, "chat")


def test_compare_two_runs(studio, browser):
    base, _ = studio
    open_page(browser, base, "#/runs")
    for run in ("sft-a", "sft-b"):
        click(browser, f'input.pick[data-run="{run}"]')
    click(browser, "#compare-selected")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#overlay-loss path.series")) == 2, 15)
    assert set(values(browser, "#overlay-loss path.series", "data-series")) == {"sft-a", "sft-b"}
    wait(browser, lambda d: "sft-b" in d.find_element(By.ID, "compare-table").text, 10)
    shot(browser, "compare")


def test_preview_shows_loss_tokens_and_skipped_rows(studio, browser):
    base, sandbox = studio
    open_page(browser, base, "#/run/prepared")
    wait(browser, lambda d: find(d, "#show-rows")).click()
    loss = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#preview-rows pre.tokens .tok.loss"), 30)
    assert loss[0].text.startswith("It is ")
    reasons = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#skipped-rows .skip-reason")]
    assert len(reasons) == 1 and reasons[0].startswith(f"{sandbox.root / 'with-bad-row.jsonl'}:17: ")
    shot(browser, "data")


def test_evaluate_and_export_tabs(studio, browser):
    base, _ = studio
    open_page(browser, base, "#/eval/sft-a")
    assert Select(wait(browser, lambda d: d.find_element(By.ID, "eval-run"))).first_selected_option.text == "sft-a"
    shot(browser, "evaluate")
    open_page(browser, base, "#/export/sft-b")
    assert Select(wait(browser, lambda d: d.find_element(By.ID, "export-run"))).first_selected_option.text == "sft-b"
    assert set(values(browser, ".toolbar button", "id")) == {"merge", "export-hf", "export-gguf"}
    shot(browser, "export")


@pytest.mark.slow
def test_resume_the_stopped_run_to_its_end_and_chat_with_it(studio, browser):
    """Resume from the page with train.max_steps just past the checkpoint: it finishes, and its model answers."""
    base, _ = studio
    open_page(browser, base, "#/run/live")
    stopped = wait(browser, lambda d: _step(d))
    browser.find_element(By.ID, "resume-overrides").send_keys(f"train.max_steps={stopped + 2}")
    click(browser, "#resume")
    wait(browser, lambda d: find(d, '#run-head [data-status="finished"]'), 180, "the resumed run did not finish")
    click(browser, "#chat-link")
    wait(browser, lambda d: find(d, "#chat-prompt")).send_keys("Hello?")
    browser.find_element(By.ID, "chat-send").click()
    wait(browser, lambda d: find(d, '#chat-answer-0[data-done="true"]'), 60)
    assert number(browser, "#chat-answer-0", "data-chunks") >= 2
