"""`lmdiff-ft inspect`: what an adapter configuration would train on a base, and what the base costs."""

import re
from collections import Counter

from rich.console import Console
from rich.table import Table

from ..adapters.presets import attach_adapters, resolve_targets, trainable_parameter_table
from ..base.loading import load_base
from ..schema.task import AdapterConfig


def module_kind(parameter_name: str) -> str:
    """'base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight' -> 'self_attn.q_proj'."""
    name = re.sub(r"^.*?layers\.\d+\.", "", parameter_name)
    return re.sub(r"\.(lora_[AB]|lora_magnitude_vector|modules_to_save)\..*$", "", name)


def inspect_base(base: str, presets: list[str], layers: list[int] | None, quantization: str, r: int) -> dict:
    loaded = load_base(base, quantization=quantization, with_tokenizer=False)
    total_base = loaded.model.num_parameters()  # counts 4-bit weights unpacked
    footprint = loaded.model.get_memory_footprint()
    settings = AdapterConfig(presets=presets, layers=layers, r=r, alpha=2 * r)
    targets = resolve_targets(loaded.model, presets, layers)
    model = attach_adapters(loaded.model, settings)
    by_kind = Counter()
    for name, param in model.named_parameters():
        if param.requires_grad:
            by_kind[module_kind(name)] += param.numel()
    trainable = sum(by_kind.values())
    return {
        "base": loaded.describe(),
        "base_parameters": total_base,
        "footprint_bytes": footprint,
        "by_preset": trainable_parameter_table(model, targets),
        "by_kind": sorted(by_kind.items()),
        "trainable": trainable,
    }


def print_report(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(report["base"])
    footprint = report["footprint_bytes"] / 2**20
    console.print(f"base parameters {report['base_parameters']:,} | memory footprint {footprint:,.1f} MiB")
    total = report["trainable"]
    for title, rows in (("per preset", report["by_preset"]), ("per module type", report["by_kind"])):
        table = Table(title=f"trainable parameters {title}")
        table.add_column(title.removeprefix("per ").capitalize())
        table.add_column("parameters", justify="right")
        table.add_column("% of trainable", justify="right")
        for name, count in rows:
            table.add_row(name, f"{count:,}", f"{100 * count / total:.1f}")
        console.print(table)
    console.print(
        f"trainable total {total:,} = {100 * total / report['base_parameters']:.3f}% of the base's parameters"
    )
