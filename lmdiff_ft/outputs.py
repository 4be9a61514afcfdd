"""Output directories that are either complete or absent: a crash never leaves one that looks finished."""

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError, first_line


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a sibling temp directory to write into; it is renamed to `out` only if the block succeeds."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: already exists and is not empty (choose another output directory)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


COMPLETION_MARKER = "adapter_config.json"  # PEFT's own "this is an adapter" file, so it doubles as "run finished"


def publish_run(out: str | Path, write: Callable[[Path], None]) -> None:
    """Write a run's final files next to its checkpoints so that it never looks finished before it is.

    `write` fills a temp dir; its files are then moved into `out` one by one (each move atomic) with
    adapter_config.json last. A crash at any point leaves no adapter_config.json, so neither PEFT, the app,
    nor `--resume` mistakes the directory for a finished adapter.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".final.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write(staging)
        names = sorted(os.listdir(staging), key=lambda name: name == COMPLETION_MARKER)
        for name in names:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# What a published run uploads: the adapter, tokenizer, card, metrics and resolved task, not its checkpoints or logs
HUB_IGNORED = ["checkpoint-*", "checkpoint-*/**", "runs/**", ".*", "metrics_before.json"]


def push_run(out: str | Path, repo_id: str, private: bool) -> str:
    """Upload a finished run to the Hub repo `repo_id` (created if absent). It stays complete on disk whatever the
    Hub says; a failure (offline, no token, no rights) is one line saying how to push it later."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(out), ignore_patterns=HUB_IGNORED, commit_message="lmdiff-ft run"
        )
    except Exception as exc:  # offline mode, network, auth, permissions: the user's to fix, the run is safe
        raise UserError(
            f"{out}: trained and saved, but pushing it to the Hub repo {repo_id} failed ({first_line(exc)}); push it "
            f"later "
            f"with `hf upload {repo_id} {out}`"
        ) from None
    return f"pushed {out} to {getattr(info, 'repo_url', repo_id)}"
