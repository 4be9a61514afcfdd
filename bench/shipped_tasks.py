"""The shipped tasks run exactly as the README says, their metrics kept as committed results.

    python -m bench.shipped_tasks                     # nasa_qa, DPO continuing it, mission_type, nasa_qa_mixed
    python -m bench.shipped_tasks --only nasa_qa      # one of them (nasa_qa_dpo needs nasa_qa's run first)

Each run is `lmdiff-ft sft|dpo TASK` in a fresh process, written to runs/shipped/NAME (runs/ is not committed);
its metrics.json (without the generated samples) goes to bench/results/tasks/NAME.json with the machine, the
library versions, the commit and the load average at start and end: the metrics are deterministic, the seconds
depend on whatever else the machine was doing.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import REPO_ROOT, RESULTS_DIR, machine_info, portable

RUNS = Path("runs/shipped")
# name -> (command, task file, overrides); the DPO run continues nasa_qa's adapter, as `lmdiff-ft dpo` does
SHIPPED = {
    "nasa_qa": ("sft", "tasks/nasa_qa.yaml", []),
    "nasa_qa_dpo": ("dpo", "tasks/nasa_qa_dpo.yaml", [f"adapter.init_adapter={RUNS}/nasa_qa"]),
    "mission_type": ("sft", "tasks/mission_type.yaml", []),
    "nasa_qa_mixed": ("sft", "tasks/nasa_qa_mixed.yaml", []),  # docs/tasks.md, "Everything together"
}


def run_task(name: str) -> dict:
    command, task, overrides = SHIPPED[name]
    out = RUNS / name
    shutil.rmtree(REPO_ROOT / out, ignore_errors=True)
    argv = [sys.executable, "-m", "lmdiff_ft", command, task, *overrides, f"output_dir={out}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    machine = machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))  # the code as it starts
    load_start, started = os.getloadavg(), time.time()
    subprocess.run(argv, check=True, cwd=REPO_ROOT, env=env)
    wall = time.time() - started
    metrics = json.loads((REPO_ROOT / out / "metrics.json").read_text())
    metrics.pop("samples", None)
    return {
        "command": f"lmdiff-ft {command} {task}",
        "overrides": overrides,
        "machine": machine,
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "wall_seconds": round(wall, 1),
        "metrics": metrics,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SHIPPED), default=list(SHIPPED))
    args = parser.parse_args()
    folder = RESULTS_DIR / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        path = folder / f"{name}.json"
        path.write_text(json.dumps(portable(run_task(name)), indent=2) + "\n")
        print(f"wrote {path.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
