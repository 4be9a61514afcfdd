"""End to end in a real browser: `python app.py` on 127.0.0.1 with the tiny base and two trained adapters,
driven by Debian's chromium through Playwright (no browser download). Screenshots go to test-artifacts/."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_compare import QUESTIONS, trained_runs  # noqa: F401  (a shared session fixture)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
MAX_PROMPT_CHARS = 300
STARTUP_SECONDS = 240  # imports + base + adapters on a busy 2-core machine
STEP_MS = 120_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the app did not answer on {url} within {STARTUP_SECONDS} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def page(tmp_path):
    """A headless chromium page with a fresh profile; skipped only where chromium or playwright is missing."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            tmp_path / "profile",
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(STEP_MS)
            yield page
        finally:
            browser.close()


@pytest.fixture
def server(trained_runs, tmp_path) -> Iterator[tuple[str, Path]]:  # noqa: F811
    """The app as a user starts it, on a free local port; stopped at the end."""
    url, data_dir, log = f"http://127.0.0.1:{free_port()}/", tmp_path / "app-data", tmp_path / "server.log"
    # One torch thread: the tiny model's matmuls are too small to share between cores.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "app.py", str(trained_runs), "--port", url.rsplit(":", 1)[1].strip("/")]
    command += ["--data-dir", str(data_dir), "--max-prompt-chars", str(MAX_PROMPT_CHARS)]
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(url, process, log)
        yield url, data_dir
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_text(page, selector: str, text: str) -> None:
    page.locator(selector).filter(has_text=text).wait_for()


def test_compare_inspect_and_vote_in_a_real_browser(page, server, tmp_path):
    url, data_dir = server
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((url, "data:", "blob:")) else None)
    page.goto(url)

    # compare: every column answers, and the adapters answer differently from the base
    page.locator("#prompt textarea").fill(QUESTIONS[0])
    page.locator("#generate").click()
    wait_for_text(page, "#message", "done: 3 columns")
    answers = [page.locator(f"#output-{i} textarea").input_value() for i in range(3)]
    assert all(answers), answers  # (the random base may answer in control characters: not .strip())
    assert answers[1] != answers[0] and answers[2] != answers[0], answers
    assert all("tokens/s" in page.locator(f"#stats-{i}").inner_text() for i in range(3))
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "app.png", full_page=True)

    # vote: one JSONL line with the prompt, the settings, both outputs and both names
    page.locator("#vote-left-better").click()
    wait_for_text(page, "#message", "recorded")
    [line] = [json.loads(text) for text in (data_dir / "votes.jsonl").read_text().splitlines()]
    assert (line["vote"], line["prompt"], line["settings"]["seed"]) == ("left better", QUESTIONS[0], 0)
    assert (line["left"]["column"], line["left"]["output"]) == ("base", answers[0])
    assert (line["right"]["column"], line["right"]["output"]) == ("alpha", answers[1])

    # why they differ: opening the tab draws the plots for the current prompt
    page.get_by_role("tab", name="Why they differ").click()
    for plot in ("#lambda-plot", "#se-plot", "#attention-plot"):
        image = page.locator(f"{plot} img")
        image.wait_for()
        assert image.evaluate("img => img.complete && img.naturalWidth > 0")
    page.screenshot(path=ARTIFACTS / "app-why.png", full_page=True)

    # limits and safety: an over-long prompt and a directory outside the served ones get a message
    page.get_by_role("tab", name="Compare").click()
    page.locator("#prompt textarea").fill("x" * (MAX_PROMPT_CHARS + 1))
    page.locator("#generate").click()
    wait_for_text(page, "#message", f"the limit is {MAX_PROMPT_CHARS}")
    page.get_by_text("Serve another run directory").click()
    page.locator("#add-path textarea").fill(str(tmp_path))
    page.locator("#add-run").click()
    wait_for_text(page, "#message", "outside the adapter directories")

    assert outside == []  # no fonts, analytics or anything else from outside this machine
