"""Every task file in tasks/ passes a `--dry-run` through the command line, on the tiny base (an override), so a
schema or data change that breaks a shipped task, and with it the README's main command, fails here."""

from pathlib import Path

import pytest
import yaml

from lmdiff_ft.cli import main

TASKS = sorted((Path(__file__).parent.parent / "tasks").glob("*.yaml"))


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
