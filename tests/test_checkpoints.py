"""Checkpoints are complete or ignored: `--resume` skips a damaged one with one line saying why and continues from the
newest that loads, exactly; a disk that fills while a checkpoint is written is one line, and the previous checkpoint
stays intact. Faults are injected: truncated files, garbage JSON, missing states, a write that fails with ENOSPC."""

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_sft import QA, QA_BODY, losses, write_jsonl, write_task

from lmdiff_ft.cli import main
from lmdiff_ft.errors import UserError
from lmdiff_ft.recipes import checkpoints as checkpoint_module
from lmdiff_ft.recipes.checkpoints import checkpoint_problem
from lmdiff_ft.recipes.common import run_directory
from lmdiff_ft.recipes.sft import run_sft
from lmdiff_ft.schema.load import load_task

OVERRIDES = [
    "train.max_steps=8",
    "train.save_steps=2",
    "train.save_total_limit=4",
    "eval.num_samples=0",
    "eval.train_samples=0",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_base_path) -> Path:
    """A run of 8 steps with checkpoints 2, 4, 6 and 8 (seconds on the tiny base): the uninterrupted reference."""
    root = tmp_path_factory.mktemp("finished")
    write_jsonl(root / "qa.jsonl", QA)
    run_sft(load_task(write_task(root, tiny_base_path, QA_BODY), OVERRIDES))
    return root / "runs" / "qa"


@pytest.fixture
def interrupted(finished, tmp_path, tiny_base_path) -> tuple[str, Path]:
    """The task, and its output dir as a run stopped after checkpoint-8 leaves it (checkpoints, metrics before)."""
    write_jsonl(tmp_path / "qa.jsonl", QA)
    task = write_task(tmp_path, tiny_base_path, QA_BODY)
    out = tmp_path / "runs" / "qa"
    out.mkdir(parents=True)
    for checkpoint in finished.glob("checkpoint-*"):
        shutil.copytree(checkpoint, out / checkpoint.name)
    shutil.copy(finished / "metrics_before.json", out)
    return task, out


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


FAULTS = {
    "truncated weights": (lambda c: truncate(c / "adapter_model.safetensors"), "adapter_model.safetensors is unread"),
    "garbage trainer_state.json": (lambda c: (c / "trainer_state.json").write_text('{"global_st'), "not valid JSON"),
    "no trainer_state.json": (lambda c: (c / "trainer_state.json").unlink(), "no trainer_state.json (cut short"),
    "missing optimizer state": (lambda c: (c / "optimizer.pt").unlink(), "no optimizer state"),
    "truncated optimizer state": (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt is truncated"),
    "missing scheduler state": (lambda c: (c / "scheduler.pt").unlink(), "no scheduler state"),
    "missing RNG state": (lambda c: (c / "rng_state.pth").unlink(), "no RNG state"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_resume_skips_a_damaged_checkpoint_with_one_line_saying_why(interrupted, fault):
    task, out = interrupted
    damage, why = FAULTS[fault]
    damage(out / "checkpoint-8")
    lines = []
    assert run_directory(load_task(task), True, lines.append) == (out, str(out / "checkpoint-6"))
    assert len(lines) == 1 and lines[0].startswith(f"skipping {out / 'checkpoint-8'}: ") and why in lines[0]
    with pytest.raises(UserError, match=f"checkpoint-8: not a complete checkpoint directory: .*{why[:10]}"):
        run_directory(load_task(task), str(out / "checkpoint-8"))
    with pytest.raises(UserError, match=r"interrupted run \(checkpoint-8\)"):
        run_directory(load_task(task), None)


def test_no_loadable_checkpoint_is_one_line(interrupted):
    task, out = interrupted
    for checkpoint in out.glob("checkpoint-*"):
        (checkpoint / "optimizer.pt").unlink()
    lines = []
    with pytest.raises(UserError, match="no complete checkpoint-N to resume from"):
        run_directory(load_task(task), True, lines.append)
    assert len(lines) == 4, "one line per checkpoint"


def test_resume_from_the_newest_good_checkpoint_ends_as_an_uninterrupted_run(interrupted, finished, capsys):
    task, out = interrupted
    FAULTS["truncated weights"][0](out / "checkpoint-8")
    FAULTS["garbage trainer_state.json"][0](out / "checkpoint-6")
    assert main(["sft", task, *OVERRIDES, "--resume"]) == 0
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipping ")]
    assert [line.split(": ")[0] for line in skipped] == [
        f"skipping {out / name}" for name in ("checkpoint-8", "checkpoint-6")
    ]
    got, expected = losses(out), losses(finished)
    assert got.keys() == expected.keys()
    assert all(got[step] == pytest.approx(expected[step], rel=1e-5) for step in expected)


def failing_save(exception: Exception):
    """torch.save that fails on the optimizer state of checkpoint-6, as on a disk that filled meanwhile."""
    save = torch.save

    def save_or_fail(obj, path, *args, **kwargs):
        if str(path).endswith("checkpoint-6/optimizer.pt"):
            Path(path).write_bytes(b"PK\x03\x04 partial")  # what the writer got onto the disk before it failed
            raise exception
        return save(obj, path, *args, **kwargs)

    return save_or_fail


# Python's own writes raise OSError(ENOSPC); torch.save's C++ writer only says that a write failed (measured on a full
# tmpfs: "[enforce fail at inline_container.cc:672] . unexpected pos ..."), so there the free space decides.
FULL_DISK = {
    "OSError ENOSPC": (OSError(errno.ENOSPC, "No space left on device"), None),
    "torch's writer": (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 24192 vs 24080"), 4096),
}


@pytest.mark.parametrize("case", list(FULL_DISK))
def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(
    interrupted, finished, monkeypatch, capsys, case
):
    task, out = interrupted
    shutil.rmtree(out)  # a fresh run
    exception, free = FULL_DISK[case]
    monkeypatch.setattr(torch, "save", failing_save(exception))
    if free is not None:
        usage = shutil.disk_usage(out.parent)
        monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda p: usage._replace(free=free))
    assert main(["sft", task, *OVERRIDES]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar's last update
    assert f"lmdiff-ft sft: error: {out / 'checkpoint-6'}: no space left on device while writing" in err
    assert "MiB" in err and "checkpoint-4 is intact" in err and "--resume" in err and "Traceback" not in err
    assert checkpoint_problem(out / "checkpoint-4") is None and not (out / "checkpoint-6").exists()
    assert not (out / "adapter_config.json").exists()

    monkeypatch.undo()  # space was freed
    assert main(["sft", task, *OVERRIDES, "--resume"]) == 0
    got, expected = losses(out), losses(finished)
    assert all(got[step] == pytest.approx(expected[step], rel=1e-5) for step in expected)


def test_another_error_while_checkpointing_is_not_called_a_full_disk(interrupted, monkeypatch):
    task, out = interrupted
    shutil.rmtree(out)
    monkeypatch.setattr(torch, "save", failing_save(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        run_sft(load_task(task, OVERRIDES))
    assert (out / "checkpoint-6").exists(), "left for a look: --resume skips it"


def test_the_trainer_state_is_the_last_file_of_a_checkpoint(finished):
    """A kill at any point while a checkpoint is written leaves no trainer_state.json (transformers writes it last)."""
    files = sorted((finished / "checkpoint-8").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert files[-1].name == "trainer_state.json"
    assert json.loads(files[-1].read_text())["global_step"] == 8
