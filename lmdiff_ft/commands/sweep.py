"""`lmdiff-ft sweep`: a grid of task overrides × seeds, each cell an ordinary run in its own directory.

A sweep file names the task(s), the cells (named sets of overrides) and/or a grid (values per key, crossed), the
seeds, and overrides for every run (docs/sweep.md). Each run is `lmdiff-ft sft|dpo TASK OVERRIDES` in a child
process: the code path of a run by hand, a peak memory of its own, and a crash that ends that run only.

Resumable: a run whose result file exists is skipped, one interrupted mid-training continues from its newest
checkpoint (`--resume`), and a failed run is recorded and tried again by the next invocation. Result files (small
JSON, committed) go under `sweeps/<name>/`, run directories (adapters, checkpoints) under `runs/sweeps/<name>/`.
"""

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from rich.console import Console

from ..errors import UserError
from ..schema.load import load_task
from ..schema.task import TaskLoader
from .sweep_summary import write_summary

STOPPED = {130, 143, -signal.SIGINT, -signal.SIGTERM}  # a run stopped by SIGINT/SIGTERM, not a failed one
SWEEP_KEYS = ("name", "command", "tasks", "seeds", "overrides", "cells", "grid", "reference", "output_dir", "runs_dir")


@dataclass
class Sweep:
    name: str
    command: Literal["sft", "dpo"]
    tasks: list[Path]
    seeds: list[int]
    overrides: list[str]
    cells: dict[str, list[str]]  # cell name → its overrides (the grid already crossed in)
    reference: str
    output_dir: Path  # result files and summaries (commit these)
    runs_dir: Path  # run directories (adapters, checkpoints)
    source: Path = field(default=Path("sweep.yaml"))


@dataclass
class Run:
    task: Path
    task_name: str
    cell: str
    seed: int
    overrides: list[str]

    @property
    def key(self) -> str:
        return f"{self.task_name}/{self.cell}/seed{self.seed}"


def override(key: str, value: Any) -> str:
    """`key=value` with the value as YAML reads it back (lists and mappings in flow style)."""
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def slug(value: Any) -> str:
    """A grid value as part of a cell name: [attn, mlp] → attn+mlp; letters, digits, '.', '_', '-' and '+'."""
    text = "+".join(map(str, value)) if isinstance(value, list) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")


def as_overrides(value: Any, where: str) -> list[str]:
    """A list of `key=value` strings, or a mapping of dotted keys to values."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [override(str(k), v) for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return list(value)
    raise UserError(f"{where}: expected a mapping of dotted keys to values, or a list of key=value strings")


def crossed_cells(cells: dict[str, list[str]], grid: dict[str, list[Any]]) -> dict[str, list[str]]:
    """Every named cell × every combination of the grid's values."""
    axes = [[(f"{k}={slug(v)}", override(k, v)) for v in values] for k, values in grid.items()]
    crossed = {}
    for name, base in cells.items():
        for combination in itertools.product(*axes):
            label = ",".join([name] * bool(name) + [part for part, _ in combination]) or "default"
            crossed[label] = base + [o for _, o in combination]
    return crossed


def parse_grid_option(items: list[str]) -> dict[str, list[str]]:
    """`--grid adapter.r=8,16 --grid dtype=float32,bfloat16` → {key: [values]} (Hydra multirun's form)."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UserError(f"--grid {item!r}: expected key=value1,value2, e.g. --grid adapter.r=8,16")
        try:  # one YAML flow sequence, so that a value may be a list itself: presets=[attn],[attn, mlp]
            grid[key] = yaml.load(f"[{values}]", Loader=TaskLoader)
        except yaml.YAMLError:
            raise UserError(f"--grid {item!r}: the values are not valid YAML, e.g. --grid adapter.r=8,16") from None
    return grid


def load_sweep(path: str | Path, grid_options: list[str] = (), seeds: list[int] | None = None) -> Sweep:
    """A sweep file (or a task file, swept with `--grid`/`--seeds` alone), checked: every run's task with its
    overrides is validated here, so a bad key is one line before anything trains."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=TaskLoader)
    except OSError as exc:
        raise UserError(f"{path}: cannot read the sweep file ({exc.__class__.__name__})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping (a sweep file: tasks, cells, grid, seeds)")
    if "tasks" not in raw:  # a task file: sweep it as it is
        raw = {"name": path.stem, "tasks": [path.name]}
    unknown = [k for k in raw if k not in SWEEP_KEYS]
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r}; a sweep file has {', '.join(SWEEP_KEYS)}")

    here = path.resolve().parent
    tasks = raw["tasks"] if isinstance(raw["tasks"], list) else [raw["tasks"]]
    if not tasks or not all(isinstance(t, str) for t in tasks):
        raise UserError(f"{path}: tasks: expected a list of task files")
    seeds = seeds or raw.get("seeds", [42])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise UserError(f"{path}: seeds: expected a list of integers, got {seeds!r}")
    cells_raw = raw.get("cells") or {"": {}}
    if not isinstance(cells_raw, dict):
        raise UserError(f"{path}: cells: expected a mapping of cell names to overrides")
    cells = {str(name): as_overrides(value, f"{path}: cells.{name}") for name, value in cells_raw.items()}
    for name in cells:
        if name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
            raise UserError(f"{path}: cells: name {name!r} must be letters, digits, '.', '_', '+' or '-'")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError(f"{path}: grid: expected a mapping of dotted keys to lists of values")
    grid = {**grid, **parse_grid_option(list(grid_options))}
    command = raw.get("command", "sft")
    if command not in ("sft", "dpo"):
        raise UserError(f"{path}: command: expected sft or dpo, got {command!r}")
    name = str(raw.get("name", path.stem))
    crossed = crossed_cells(cells, grid)
    reference = str(raw.get("reference", next(iter(crossed))))
    if reference not in crossed:
        raise UserError(f"{path}: reference: no cell {reference!r} (cells: {', '.join(crossed)})")
    sweep = Sweep(
        name=name,
        command=command,
        tasks=[Path(os.path.abspath(here / t)) for t in tasks],
        seeds=seeds,
        overrides=as_overrides(raw.get("overrides"), f"{path}: overrides"),
        cells=crossed,
        reference=reference,
        output_dir=Path(raw.get("output_dir", f"sweeps/{name}")),
        runs_dir=Path(raw.get("runs_dir", f"runs/sweeps/{name}")),
        source=path,
    )
    for run in plan(sweep):  # every override checked against the schema before the first run
        try:
            load_task(run.task, run.overrides)
        except UserError as exc:
            raise UserError(f"{path}: cell {run.cell!r}: {exc}") from None
    return sweep


def plan(sweep: Sweep) -> list[Run]:
    """Seeds outermost, so that every cell has one seed before any has three: a sweep cut short still compares."""
    runs = []
    for seed, task in itertools.product(sweep.seeds, sweep.tasks):
        task_name = load_task(task).name
        for cell, overrides in sweep.cells.items():
            runs.append(Run(task, task_name, cell, seed, [*sweep.overrides, *overrides, f"train.seed={seed}"]))
    return runs


def result_file(sweep: Sweep, run: Run) -> Path:
    return sweep.output_dir / "results" / run.task_name / run.cell / f"seed{run.seed}.json"


def run_dir(sweep: Sweep, run: Run) -> Path:
    return sweep.runs_dir / run.task_name / run.cell / f"seed{run.seed}"


def is_done(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def write_result(path: Path, result: dict) -> None:
    """Written whole, then renamed: a result file is complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)


def run_one(sweep: Sweep, run: Run, log: Path) -> tuple[int, float, bool]:
    """The run as `lmdiff-ft <command>` in a child process; SIGINT/SIGTERM are passed on to it, so that it saves a
    checkpoint and stops. Returns its exit code, wall seconds, and whether it continued from a checkpoint."""
    out = run_dir(sweep, run)
    resume = ["--resume"] if any(out.glob("checkpoint-*")) and not (out / "adapter_config.json").exists() else []
    if (out / "adapter_config.json").exists():
        return 0, 0.0, True  # finished before its result file was written: only collect it (its timing is unknown)
    command = [sys.executable, "-m", "lmdiff_ft", sweep.command, str(run.task), *run.overrides, f"output_dir={out}"]
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with log.open("a") as stream:
        stream.write(f"$ {' '.join(command + resume)}\n")
        stream.flush()
        child = subprocess.Popen(command + resume, stdout=stream, stderr=subprocess.STDOUT)
        forward = lambda signum, frame: child.send_signal(signum)  # noqa: E731
        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = child.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return code, time.time() - started, bool(resume)


def collect(sweep: Sweep, run: Run, seconds: float, resumed: bool) -> dict:
    """What the summary needs from a finished run: its metrics, loss curves and cost."""
    out = run_dir(sweep, run)
    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    task = load_task(run.task, run.overrides)
    steps = max(metrics["global_step"], 1)
    return {
        "status": "ok",
        "task": run.task_name,
        "cell": run.cell,
        "seed": run.seed,
        "overrides": run.overrides,
        "primary_metric": f"eval_{task.eval.metrics[0]}",
        "before": metrics["before"],
        "after": metrics["after"],
        "trainable_parameters": metrics["trainable_parameters"],
        "train_seconds": metrics["train_seconds"],
        "seconds_per_step": round(metrics["train_seconds"] / steps, 2),
        "global_step": metrics["global_step"],
        "peak_rss_mib": metrics.get("peak_rss_mib"),
        "eval_curve": metrics.get("eval_curve", []),
        "train_curve": [{"step": e["step"], "loss": e["loss"]} for e in history if "loss" in e],
        "wall_seconds": round(seconds, 1),
        "resumed": resumed,  # then train_seconds counts only the steps after the checkpoint
        "cpu_count": os.cpu_count(),
    }


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


def run_sweep(sweep: Sweep, console: Console | None = None) -> int:
    """Every run not yet done, in order; then the summary. Returns the exit code: 0, 1 if a run failed, or the
    stopped run's signal code when interrupted (rerun the same command to continue)."""
    console = console or Console()
    runs = plan(sweep)
    todo = [run for run in runs if not is_done(result_file(sweep, run))]
    console.print(
        f"sweep {sweep.name}: {len(runs)} runs ({len(sweep.tasks)} task(s) × {len(sweep.cells)} cells × "
        f"{len(sweep.seeds)} seeds), {len(runs) - len(todo)} done, {len(todo)} to run"
    )
    failed, spent = 0, []
    for number, run in enumerate(todo, start=len(runs) - len(todo) + 1):
        eta = f", about {duration(sum(spent) / len(spent) * (len(todo) - len(spent)))} left" if spent else ""
        console.print(f"[{number}/{len(runs)}] {run.key}{eta}")
        log = sweep.runs_dir / "logs" / f"{run.key.replace('/', '__')}.log"
        code, seconds, resumed = run_one(sweep, run, log)
        if code in STOPPED:
            console.print(f"sweep stopped during {run.key}; run the same command again to continue")
            return 143 if code in (143, -signal.SIGTERM) else 130
        if code == 0:
            write_result(result_file(sweep, run), collect(sweep, run, seconds, resumed))
            spent.append(seconds)
            continue
        failed += 1
        last = (log.read_text().strip().splitlines() or ["(no output)"])[-1]
        write_result(result_file(sweep, run), {"status": "failed", "exit_code": code, "last_line": last, **run_id(run)})
        console.print(f"  failed (exit {code}): {last}")
    table = write_summary(sweep.output_dir, sweep.reference, list(sweep.cells))
    console.print(table, markup=False, highlight=False)
    console.print(f"wrote {sweep.output_dir}/summary.md, summary.csv, summary.json and a plot per task")
    return 1 if failed else 0


def run_id(run: Run) -> dict:
    return {"task": run.task_name, "cell": run.cell, "seed": run.seed, "overrides": run.overrides}
