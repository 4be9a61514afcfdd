"""Figures for the app's "why they differ" tab. Plain matplotlib `Figure`s (no pyplot state), so that they
are safe to draw from the server's worker threads."""

from matplotlib.figure import Figure

from .compare import Inspection

MAX_TICK_TOKENS = 40  # beyond this, token labels on the attention maps are unreadable


def per_layer_figure(title: str, ylabel: str, series: dict[str, list[float]]) -> Figure:
    """One line per model over the layers: λ, or the SE gate's mean activation."""
    figure = Figure(figsize=(5, 3.2), layout="constrained")
    axes = figure.add_subplot()
    for name, values in series.items():
        axes.plot(range(len(values)), values, "o-", label=name)
    axes.set_title(title)
    axes.set_xlabel("layer")
    axes.set_ylabel(ylabel)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.ticklabel_format(axis="y", useOffset=False)  # a gate at 1.00003 reads as that, not as "3 + 1e-5"
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def lambda_figure(base: Inspection, adapter: Inspection, adapter_label: str) -> Figure:
    return per_layer_figure("λ per layer", "λ", {"base": base.lambdas, adapter_label: adapter.lambdas})


def se_gate_figure(base: Inspection, adapter: Inspection, adapter_label: str) -> Figure:
    return per_layer_figure(
        "SE gate on this prompt", "mean 2·σ(fc2(…))", {"base": base.se_gate, adapter_label: adapter.se_gate}
    )


def attention_figure(maps: dict[str, Inspection]) -> Figure:
    """A row per model: the plain softmax map A1 next to the differential map A1 − λ·A2 (query × key).
    The differential map can be negative, so it gets a diverging scale centred on 0."""
    first = next(iter(maps.values()))
    size = 2.2 + 0.12 * min(len(first.tokens), MAX_TICK_TOKENS)
    figure = Figure(figsize=(2 * size + 1.5, size * len(maps)), layout="constrained")
    grid = figure.subplots(len(maps), 2, squeeze=False)
    for row, (name, inspection) in zip(grid, maps.items(), strict=True):
        bound = max(float(inspection.diff_map.abs().max()), 1e-6)
        panels = (
            (inspection.softmax_map, "A1 (softmax)", "viridis", 0.0, 1.0),
            (inspection.diff_map, "A1 − λ·A2 (differential)", "RdBu_r", -bound, bound),
        )
        for axes, (values, title, cmap, low, high) in zip(row, panels, strict=True):
            image = axes.imshow(values.numpy(), cmap=cmap, vmin=low, vmax=high)
            axes.set_title(f"{name}: {title}", fontsize="small")
            label_tokens(axes, inspection.tokens)
            figure.colorbar(image, ax=axes, shrink=0.8)
    figure.suptitle(f"layer {first.layer}, head {first.head}")
    return figure


def label_tokens(axes, tokens: list[str]) -> None:
    if len(tokens) > MAX_TICK_TOKENS:
        axes.set_xlabel("key position")
        axes.set_ylabel("query position")
        return
    shown = [repr(t)[1:-1] for t in tokens]  # newlines and spaces stay visible
    axes.set_xticks(range(len(tokens)), shown, rotation=90, fontsize=6)
    axes.set_yticks(range(len(tokens)), shown, fontsize=6)
