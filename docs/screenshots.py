"""The README's screenshots: `python app.py RUN ...` asked the first held-out question of the first run's task, in
Debian's chromium driven by Playwright (as tests/test_app_browser.py drives it).

    python docs/screenshots.py runs/nasa_qa runs/nasa_qa_dpo        # writes docs/app.png and docs/app-why.png
"""

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
PORT = 7861
STEP_MS = 600_000  # the real base on 2 cores: loading and four generations take minutes


def wait_until_serving(url: str, process: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the app exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    sys.exit(f"the app did not answer on {url} within {seconds} s")


def first_held_out_prompt(run: Path) -> str:
    """The first of the example prompts the app lists for this run (its task's eval split)."""
    from lmdiff_ft.schema.load import load_task
    from lmdiff_ft.serve.runs import example_prompts

    return example_prompts(load_task(run / "resolved_task.yaml"))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    url = f"http://127.0.0.1:{PORT}/"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    app = subprocess.Popen([sys.executable, "app.py", *args.runs, "--port", str(PORT)], cwd=REPO, env=env)
    try:
        wait_until_serving(url, app)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(STEP_MS)
            page.goto(url)
            page.locator("#prompt textarea").fill(first_held_out_prompt(Path(args.runs[0])))
            page.locator("#generate").click()
            page.locator("#message").filter(has_text="done:").wait_for()
            page.screenshot(path=args.out / "app.png", full_page=True)
            page.get_by_role("tab", name="Why they differ").click()
            page.locator("#attention-plot img").wait_for()
            page.screenshot(path=args.out / "app-why.png", full_page=True)
            browser.close()
    finally:
        app.terminate()
        app.wait(timeout=30)
    print(f"wrote {args.out / 'app.png'} and {args.out / 'app-why.png'}")


if __name__ == "__main__":
    main()
