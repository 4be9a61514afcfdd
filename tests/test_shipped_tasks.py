"""Every task file in tasks/ passes a `--dry-run` through the command line, on the tiny base (an override), so a
schema or data change that breaks a shipped task, and with it the README's main command, fails here. So does the
"your own task" file that README.md and docs/tasks.md show, on the JSONL rows they describe."""

import json
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from lmdiff_ft.cli import main

ROOT = Path(__file__).parent.parent
TASKS = sorted((ROOT / "tasks").glob("*.yaml"))


@pytest.mark.parametrize("path", TASKS, ids=[p.stem for p in TASKS])
def test_shipped_task_dry_runs_on_the_tiny_base(path, tiny_base_path, capsys):
    task = yaml.safe_load(path.read_text())
    # the tiny base's small byte-level vocabulary spends more tokens on the same text than a real one
    overrides = [f"base={tiny_base_path}", "quantization=none", "train.max_length=1024"]
    if task.get("adapter", {}).get("init_adapter"):
        # the SFT run a DPO task continues does not exist in a fresh checkout: dry-run it from the base instead
        overrides.append("adapter.init_adapter=")
    command = "dpo" if "preference" in task else "sft"
    assert main([command, str(path), "--dry-run", *overrides]) == 0
    assert ("chosen:" if command == "dpo" else "trained on:") in capsys.readouterr().out


def first_yaml_block(page: Path) -> str:
    """The first ```yaml block of a Markdown page, also one indented inside a list item."""
    match = re.search(r"^( *)```yaml\n(.*?)^\1```", page.read_text(), re.S | re.M)
    return textwrap.dedent(match[2])


@pytest.mark.parametrize("page", ["README.md", "docs/tasks.md"])
def test_the_documented_own_task_dry_runs(page, tmp_path, tiny_base_path, capsys):
    (tmp_path / "my_qa.yaml").write_text(first_yaml_block(ROOT / page))
    rows = [{"question": f"Which probe is number {i}?", "answer": f"Probe {i}"} for i in range(12)]
    (tmp_path / "data").mkdir()
    for name, part in (("train", rows[:8]), ("eval", rows[8:])):
        (tmp_path / "data" / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in part))
    overrides = [f"base={tiny_base_path}", "quantization=none"]
    assert main(["sft", str(tmp_path / "my_qa.yaml"), "--dry-run", *overrides]) == 0
    assert "trained on: 'Probe" in capsys.readouterr().out
