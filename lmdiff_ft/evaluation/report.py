"""What a run shows and leaves behind for people: the before/after table, the loss curve and the model card."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402


def metric_names(before: dict, after: dict | None = None) -> list[str]:
    """The numbers to show, in order: before's, then those only measured after (e.g. `retention_kept`); lists such
    as the retention questions answered correctly stay in the files."""
    names = [k for k in before if isinstance(before[k], int | float)]
    return names + [k for k, v in (after or {}).items() if k not in before and isinstance(v, int | float)]


def cell(metrics: dict, key: str) -> str:
    return f"{metrics[key]:.4f}" if key in metrics else ""


def print_metrics_table(before: dict, after: dict | None, console: Console, title: str = "evaluation") -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("before", justify="right")
    if after is not None:
        table.add_column("after", justify="right")
    for key in metric_names(before, after):
        table.add_row(key, cell(before, key), *([cell(after, key)] if after is not None else []))
    console.print(table)


def plot_loss_curve(log_history: list[dict], path: Path) -> None:
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def model_card(name: str, base: str, task_yaml: str, metrics: dict, summary: dict) -> str:
    """A PEFT-style README: what this adapter is, how to load it, what it scored."""
    before, after = metrics["before"], metrics["after"]
    rows = "\n".join(f"| {k} | {cell(before, k)} | {cell(after, k)} |" for k in metric_names(before, after))
    facts = "\n".join(f"- {k}: {v}" for k, v in summary.items())
    return f"""---
library_name: peft
base_model: {base}
tags: [lmdiff, lmdiff-ft, lora]
---
# {name}

A LoRA adapter for the LM-Diff base `{base}`, trained with `lmdiff-ft`.

{facts}

## Evaluation (before → after training)

| metric | before | after |
|---|---|---|
{rows}

## Use

```python
import lmdiff_ft  # registers the lmdiff model type
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "<this directory>")
tokenizer = AutoTokenizer.from_pretrained("<this directory>")
```

## Task (resolved)

```yaml
{task_yaml.rstrip()}
```
"""


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
