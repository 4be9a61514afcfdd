"""A sweep's summary, from its result files alone: mean, std and n over seeds of every metric, a comparison with the
reference cell that says whether a difference is beyond seed noise, and plots.

Noise: a difference of means counts as real when it exceeds twice its standard error (Welch: the square root of
s1²/n1 + s2²/n2), about a 95% interval; with fewer than 2 seeds on either side nothing is claimed.
"""

import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COST = ("trainable_parameters", "train_seconds", "seconds_per_step", "peak_rss_mib")


def load_results(output_dir: Path) -> tuple[list[dict], list[dict]]:
    """The finished runs' results and the failed runs' records."""
    results = [json.loads(p.read_text()) for p in sorted((output_dir / "results").glob("*/*/seed*.json"))]
    return [r for r in results if r["status"] == "ok"], [r for r in results if r["status"] != "ok"]


def flat_metrics(result: dict) -> dict[str, float]:
    """Every number a run reports: `after.eval_exact_match`, `before.eval_loss`, …, and its cost."""
    values = {f"{when}.{k}": v for when in ("before", "after") for k, v in result[when].items() if is_number(v)}
    return values | {k: result[k] for k in COST if is_number(result.get(k))}


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def aggregate(results: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """(task, cell) → metric → {mean, std, n, values}."""
    grouped = defaultdict(lambda: defaultdict(list))
    for r in results:
        for name, value in flat_metrics(r).items():
            grouped[(r["task"], r["cell"])][name].append(value)
    return {
        key: {
            name: {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values),
                "values": values,
            }
            for name, values in metrics.items()
        }
        for key, metrics in grouped.items()
    }


def versus(cell: dict | None, reference: dict | None) -> tuple[float, str]:
    """The difference of means and whether it is beyond seed noise (2 standard errors)."""
    if not cell or not reference:
        return math.nan, ""
    difference = cell["mean"] - reference["mean"]
    if cell["n"] < 2 or reference["n"] < 2:
        return difference, "n < 2"
    error = math.sqrt(cell["std"] ** 2 / cell["n"] + reference["std"] ** 2 / reference["n"])
    return difference, ("beyond noise" if abs(difference) > 2 * error else "within noise")


def delta_text(difference: float, verdict: str) -> str:
    return "" if math.isnan(difference) else f"{difference:+.3f} ({verdict})"


def shown(stat: dict | None, digits: int = 3) -> str:
    if not stat:
        return ""
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}" if stat["n"] > 1 else f"{stat['mean']:.{digits}f}"


def task_columns(results: list[dict], task: str) -> tuple[str, list[str]]:
    """The task's held-out metric, then its other held-out and retention metrics, as `after.*` names."""
    ours = [r for r in results if r["task"] == task]
    primary = f"after.{ours[0]['primary_metric']}"
    names = sorted({k for r in ours for k in flat_metrics(r) if k.startswith("after.")})
    held_out = [n for n in names if n.startswith("after.eval_") and n != primary]
    retention = [n for n in names if n.startswith("after.retention")]
    return primary, [primary, *held_out, *retention]


def markdown(results: list[dict], stats: dict, reference: str, cells: list[str], failed: list[dict]) -> str:
    lines = [
        "Mean ± std over seeds (n seeds). Δ: the difference from the reference cell "
        f"`{reference}` in the held-out metric; *beyond noise* when it exceeds twice its standard error.",
        "",
    ]
    for task in sorted({r["task"] for r in results}):
        primary, columns = task_columns(results, task)
        ref = stats.get((task, reference), {})
        lines += [f"### {task}", ""]
        header = ["cell", "n", *(c.removeprefix("after.") for c in columns), f"Δ {primary.removeprefix('after.')}"]
        header += ["trainable params", "s/step", "peak RSS (MiB)"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        first = next(c for c in [reference, *cells] if (task, c) in stats)  # the reference's, where it has run
        before = [shown(stats[(task, first)].get(c.replace("after.", "before.", 1))) for c in columns]
        lines.append(f"| before training (`{first}`) | | " + " | ".join(before) + " | | | | |")
        for cell in [c for c in cells if (task, c) in stats]:
            s = stats[(task, cell)]
            delta = "reference" if cell == reference else delta_text(*versus(s.get(primary), ref.get(primary)))
            n = max(v["n"] for v in s.values())
            row = [f"`{cell}`", str(n), *(shown(s.get(c)) for c in columns), delta]
            row += [f"{s['trainable_parameters']['mean']:,.0f}", shown(s.get("seconds_per_step"), 1)]
            row += [shown(s.get("peak_rss_mib"), 0)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    busy = [r for r in results if max(r["load_average"].values()) > r["cpu_count"]]
    if busy:
        lines.append(
            f"Timings: {len(busy)} of {len(results)} runs ran while the machine's load average exceeded its "
            f"{results[0]['cpu_count']} cores (other work beside them): their s/step are not comparable."
        )
    if failed:
        names = ", ".join(f"{r['task']}/{r['cell']}/seed{r['seed']}" for r in failed)
        lines.append(f"Failed runs (tried again by the next `lmdiff-ft sweep`): {names}.")
    return "\n".join(lines) + "\n"


def write_csv(stats: dict, path: Path) -> None:
    names = sorted({name for metrics in stats.values() for name in metrics})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "cell", *(f"{n}_{part}" for n in names for part in ("mean", "std", "n"))])
        for (task, cell), metrics in sorted(stats.items()):
            row = [task, cell]
            for n in names:
                stat = metrics.get(n)
                row += [f"{stat['mean']:.6g}", f"{stat['std']:.6g}", stat["n"]] if stat else ["", "", 0]
            writer.writerow(row)


def plot_task(results: list[dict], stats: dict, task: str, cells: list[str], path: Path) -> None:
    """Left: the held-out metric per cell (mean ± std, and each seed); right: eval loss against step, per cell."""
    primary, _ = task_columns(results, task)
    present = [c for c in cells if (task, c) in stats]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, cell in enumerate(present):
        stat = stats[(task, cell)].get(primary)
        if stat:
            left.errorbar(i, stat["mean"], yerr=stat["std"], fmt="o", capsize=4, color="C0")
            left.plot([i] * stat["n"], stat["values"], ".", color="grey", alpha=0.6)
        curves = [r["eval_curve"] for r in results if r["task"] == task and r["cell"] == cell and r["eval_curve"]]
        if curves:
            steps = sorted({p["step"] for curve in curves for p in curve})
            means = [statistics.fmean(p["eval_loss"] for c in curves for p in c if p["step"] == s) for s in steps]
            right.plot(steps, means, "o-", label=cell, color=f"C{i % 10}", markersize=3)
    left.set_xticks(range(len(present)), present, rotation=35, ha="right")
    left.set_ylabel(primary.removeprefix("after.") + " (held out, after training)")
    left.grid(alpha=0.3)
    right.set_xlabel("step")
    right.set_ylabel("eval loss (mean over seeds)")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle(f"{task}: which parts to train")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_summary(output_dir: Path, reference: str, cells: list[str]) -> str:
    """summary.{md,csv,json} and one plot per task, from the result files; returns the markdown."""
    results, failed = load_results(output_dir)
    stats = aggregate(results)
    text = markdown(results, stats, reference, cells, failed) if results else "No finished runs yet.\n"
    (output_dir / "summary.md").write_text(text)
    write_csv(stats, output_dir / "summary.csv")
    as_json = [{"task": t, "cell": c, "metrics": m} for (t, c), m in sorted(stats.items())]
    (output_dir / "summary.json").write_text(json.dumps({"reference": reference, "cells": as_json}, indent=1) + "\n")
    for task in sorted({r["task"] for r in results}):
        plot_task(results, stats, task, cells, output_dir / f"{task}.png")
    return text
