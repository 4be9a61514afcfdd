"""Finished run directories as the app serves them: each one's adapter, task, base and scores, and the prompts its
task builds from what a user types."""

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..adapters.known_base import BASE_INFO_FILE
from ..data.rows import Prompt, source_task, user_texts, wrapped_prompt
from ..data.sources import load_parts
from ..errors import UserError
from ..outputs import COMPLETION_MARKER
from ..schema.load import load_task
from ..schema.task import Task, template_fields

BASE = "base"  # the column of the bare base; adapter names never take it
KEY_METRICS = ("eval_loss", "eval_exact_match", "eval_rouge_l", "eval_accuracy", "eval_preference_accuracy")


@dataclass(frozen=True)
class RunInfo:
    """A finished run directory: its adapter, the task that trained it, the base it was made for, its scores."""

    name: str  # the PEFT adapter name and column id
    path: Path
    task: Task
    base_info: dict
    metrics: dict  # after training

    @property
    def fingerprint(self) -> str | None:
        return self.base_info.get("fingerprint")

    @property
    def label(self) -> str:
        """'nasa_qa (run dir) · loss 1.23 · exact_match 0.4': what a user picks a column by."""
        title = self.task.name if self.path.name == self.task.name else f"{self.task.name} ({self.path.name})"
        scores = [f"{k.removeprefix('eval_')} {self.metrics[k]:.3g}" for k in KEY_METRICS if k in self.metrics]
        return " · ".join([title, *scores[:3]])


def is_finished(directory: Path) -> bool:
    """PEFT's adapter_config.json is written last (outputs.publish_run), so it marks a finished run."""
    return (directory / COMPLETION_MARKER).is_file()


def find_run_dirs(roots: Sequence[Path]) -> list[Path]:
    """Each root that is a finished run, else its finished subdirectories (`runs/` → `runs/<task>`)."""
    found = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"{root}: no such directory (expected a run directory or a directory of runs)")
        candidates = [root] if is_finished(root) else sorted(p for p in root.iterdir() if p.is_dir())
        found += [p.resolve() for p in candidates if is_finished(p) and p.resolve() not in found]
    return found


def adapter_name(directory: Path, taken: Sequence[str]) -> str:
    """A PEFT-safe name (no dots: it becomes a module key) from the directory name, unique among `taken`."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", directory.name) or "run"
    name, n = stem, 1
    while name in taken or name == BASE:
        n += 1
        name = f"{stem}_{n}"
    return name


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({exc})") from None


def read_run(directory: Path, name: str) -> RunInfo:
    """The run's task, base and metrics; a run missing any of them is refused with the file it lacks."""
    directory = Path(directory)
    base_info = read_json(directory / BASE_INFO_FILE)
    task = load_task(directory / "resolved_task.yaml")
    metrics = read_json(directory / "metrics.json").get("after", {}) if (directory / "metrics.json").is_file() else {}
    return RunInfo(name, directory, task, base_info, metrics)


def discover_runs(roots: Sequence[Path]) -> tuple[list[RunInfo], list[str]]:
    """Every finished run under `roots`, and one line per run that could not be read."""
    runs, problems = [], []
    for directory in find_run_dirs(roots):
        try:
            runs.append(read_run(directory, adapter_name(directory, [r.name for r in runs])))
        except UserError as exc:
            problems.append(str(exc))
    return runs, problems


def single_placeholder(task: Task) -> str | None:
    """The column the task's prompt template fills, when it has exactly one: the prompt box fills it."""
    fields = template_fields(task.template.prompt or "")
    return fields[0] if len(fields) == 1 else None


def task_prompt(task: Task | None, text: str) -> Prompt:
    """The prompt as the run's training built it from `text`: its prompt template, system text, chat or plain."""
    if task is None:
        return [{"role": "user", "content": text}]
    field = single_placeholder(task)
    if field is not None:
        text = task.template.prompt.replace("{" + field + "}", text)
    return text if task.data.format == "text" else wrapped_prompt(text, task)


def example_prompts(task: Task, limit: int = 8) -> list[str]:
    """The first eval rows (of each source in turn), as a user would type them into the prompt box."""
    if task.data.format == "text":
        return []
    try:
        parts, eval_parts = load_parts(task)
    except UserError:  # the data moved since training: the app works without examples
        return []
    held_out = [(part, part.train) for part in eval_parts] or [(part, part.eval) for part in parts]
    prompts = []
    for part, rows in held_out:
        rows = rows.select(range(min(limit - len(prompts), len(rows))))
        field = single_placeholder(task)
        if field is not None:
            prompts += [str(row[field]) for row in rows]
        else:
            prompts += user_texts(rows, source_task(task, part.source), part.name)
    return prompts
