"""A sweep's summary, from its result files alone: mean, std and n over seeds of every metric, a comparison with the
reference cell that says whether a difference is beyond seed noise, and plots.

Noise: a difference of means counts as real when Welch's t-test rejects "no difference" at 95% (two-sided); with a
handful of seeds its critical value is well above 2 (4.3 at 2 degrees of freedom, 2.8 at 4). With fewer than 2 seeds
on either side nothing is claimed.

Timings: the fastest seed that trained without interruption. Other work on the machine only slows a run down, and a
resumed run's clock covers only the steps after its checkpoint.
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


# Student's t, two-sided 95% critical values by degrees of freedom (any standard table)
T_95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 15: 2.13, 20: 2.09,
        30: 2.04}  # fmt: skip


def t_critical(degrees_of_freedom: float) -> float:
    """The value for the nearest tabulated degrees of freedom at or below: never less strict than the exact one."""
    return T_95[max(k for k in T_95 if k <= max(degrees_of_freedom, 1))]


def versus(cell: dict | None, reference: dict | None) -> tuple[float, str]:
    """The difference of means and whether it is beyond seed noise (Welch's t-test at 95%)."""
    if not cell or not reference:
        return math.nan, ""
    difference = cell["mean"] - reference["mean"]
    n1, n2 = cell["n"], reference["n"]
    if n1 < 2 or n2 < 2:
        return difference, "n < 2"
    s1, s2 = cell["std"], reference["std"]
    if s1 == 0 or s2 == 0:  # seeds that agree exactly (a metric counted in whole questions) are not noise-free
        s1 = s2 = max(s1, s2)
    v1, v2 = s1**2 / n1, s2**2 / n2
    if v1 + v2 == 0:
        return difference, "within noise" if difference == 0 else "no seed spread"
    degrees_of_freedom = (v1 + v2) ** 2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1))  # Welch–Satterthwaite
    beyond = abs(difference) > t_critical(degrees_of_freedom) * math.sqrt(v1 + v2)
    return difference, "beyond noise" if beyond else "within noise"


def delta_text(difference: float, verdict: str) -> str:
    return "" if math.isnan(difference) else f"{difference:+.3f} ({verdict})"


def shown(stat: dict | None, digits: int = 3) -> str:
    if not stat:
        return ""
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}" if stat["n"] > 1 else f"{stat['mean']:.{digits}f}"


def fastest_step(results: list[dict], task: str, cell: str) -> str:
    """Seconds per step of the cell's fastest seed among those that trained without interruption."""
    times = [r["seconds_per_step"] for r in results if (r["task"], r["cell"]) == (task, cell) and not r.get("resumed")]
    return f"{min(times):.1f}" if times else ""


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
        f"`{reference}` in the held-out metric; *beyond noise* when Welch's t-test finds it at 95%. "
        "s/step: the fastest seed that trained without interruption.",
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
            row += [f"{s['trainable_parameters']['mean']:,.0f}", fastest_step(results, task, cell)]
            row += [shown(s.get("peak_rss_mib"), 0)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
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
