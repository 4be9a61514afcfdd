"""Checkpoints that are complete or ignored: which checkpoint-N `--resume` can load, and a full disk while one is
written as one line.

The Trainer writes a checkpoint's files in place (weights, optimizer, scheduler, RNG states) and trainer_state.json
last, so one cut short by a kill lacks it. A disk that filled, or a file damaged later, can still leave a directory
that looks whole: each file the Trainer reads back on resume is therefore opened here first (their headers, and the
checksums of the torch zip files), which costs a read of the newest checkpoint only.
"""

import errno
import json
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import safe_open
from transformers.trainer import SCHEDULER_NAME, TRAINER_STATE_NAME

from ..errors import UserError


def checkpoints(out: Path) -> list[Path]:
    """checkpoint-N directories, newest first."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def checkpoint_problem(directory: Path) -> str | None:
    """Why `--resume` cannot continue from this checkpoint, in a few words; None when every part it needs loads."""
    try:
        state = json.loads((directory / TRAINER_STATE_NAME).read_text())
    except FileNotFoundError:
        return f"no {TRAINER_STATE_NAME} (cut short while it was written)"
    except (OSError, ValueError):
        return f"{TRAINER_STATE_NAME} is not valid JSON"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return f"{TRAINER_STATE_NAME} has no global_step"
    deepspeed = any(directory.glob("global_step*"))  # DeepSpeed keeps weights and optimizer in its own directory
    weights = sorted(directory.glob("*.safetensors"))
    if not weights and not deepspeed:
        return "no weights (adapter_model.safetensors)"
    for path in weights:
        try:
            with safe_open(str(path), "pt") as f:
                f.keys()
        except Exception as exc:  # safetensors raises its own error type for a truncated or garbled file
            return f"{path.name} is unreadable ({str(exc).splitlines()[0]})"
    # what the Trainer reads back (optimizer.pt, or FSDP's and others' optimizer* files), checked with transformers 5.24
    required = {"optimizer state": "optimizer*", "scheduler state": SCHEDULER_NAME, "RNG state": "rng_state*.pth"}
    if deepspeed:
        required = {"RNG state": "rng_state*.pth"}
    for what, pattern in required.items():
        found = sorted(directory.glob(pattern))
        if not found:
            return f"no {what} ({pattern})"
        for path in found:
            if path.suffix in (".pt", ".pth", ".bin") and (problem := torch_file_problem(path)):
                return f"{path.name} {problem}"
    return None


def torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip archive: a truncated one has no central directory, a damaged one fails its CRCs."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (OSError, zipfile.BadZipFile):
        return "is truncated or not a torch file"
    return f"is damaged ({damaged} fails its checksum)" if damaged else None


def newest_loadable(out: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that loads, and one line for each newer one skipped, saying why."""
    skipped = []
    for directory in checkpoints(out):
        problem = checkpoint_problem(directory)
        if problem is None:
            return directory, skipped
        skipped.append(f"skipping {directory}: {problem}")
    return None, skipped


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC as Python reports it, or as the C++ and Rust writers below torch.save and safetensors do (they may
    only say that a write failed: the caller also checks the free space)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "StorageFull" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(exc: BaseException, out: Path, step: int, estimate: int) -> UserError | None:
    """A one-line error when training failed while writing checkpoint-`step` because the disk is full; else None.

    The partial checkpoint is removed (it would be skipped anyway, and its space is needed); the previous one is
    untouched. `estimate` is what a checkpoint takes when no earlier one says it better.
    """
    partial = out / f"checkpoint-{step}"
    if not partial.is_dir() or checkpoint_problem(partial) is None:
        return None
    previous = next((c for c in checkpoints(out) if c != partial and checkpoint_problem(c) is None), None)
    needed = directory_bytes(previous) if previous else estimate
    free = shutil.disk_usage(out).free
    if not is_disk_full(exc) and free >= needed:
        return None
    shutil.rmtree(partial, ignore_errors=True)
    kept = f"{previous.name} is intact" if previous else "no earlier checkpoint"
    return UserError(
        f"{partial}: no space left on device while writing the checkpoint of step {step} (it needs about "
        f"{needed / 2**20:.1f} MiB, {shutil.disk_usage(out).free / 2**20:.1f} MiB free after removing it; {kept}); "
        "free some space, then continue with --resume"
    )


@contextmanager
def disk_full_is_one_line(trainer, trainable: int) -> Iterator[None]:
    """A disk that fills while a checkpoint is written: one line naming it and the space needed (estimated, before the
    first checkpoint, as the trainable weights and Adam's two moments in fp32)."""
    try:
        yield
    except Exception as exc:
        out, step = Path(trainer.args.output_dir), trainer.state.global_step
        if error := disk_full_error(exc, out, step, estimate=3 * 4 * trainable):
            raise error from None
        raise
