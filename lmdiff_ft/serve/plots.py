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


def attention_figure(base: Inspection, adapter: Inspection, adapter_label: str) -> Figure:
    """The differential map A1 − λ·A2 (query × key) of the base and of the adapter on one diverging scale centred on 0
    (the maps can be negative), and their difference on a scale of its own: where the adapter moved attention,
    which is small next to the maps themselves."""
    maps = {"base": base.diff_map, adapter_label: adapter.diff_map}
    shared = max(max(float(values.abs().max()) for values in maps.values()), 1e-6)
    difference = adapter.diff_map - base.diff_map
    panels = [(title, values, shared) for title, values in maps.items()]
    panels.append((f"{adapter_label} − base", difference, max(float(difference.abs().max()), 1e-6)))
    size = 2.2 + 0.12 * min(len(base.tokens), MAX_TICK_TOKENS)
    figure = Figure(figsize=(3 * size + 2.5, size), layout="constrained")
    for axes, (title, values, bound) in zip(figure.subplots(1, 3), panels, strict=True):
        image = axes.imshow(values.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound)
        axes.set_title(title, fontsize="small")
        label_tokens(axes, base.tokens)
        figure.colorbar(image, ax=axes, shrink=0.8)
    figure.suptitle(f"A1 − λ·A2, layer {base.layer}, head {base.head}")
    return figure


def label_tokens(axes, tokens: list[str]) -> None:
    if len(tokens) > MAX_TICK_TOKENS:
        axes.set_xlabel("key position")
        axes.set_ylabel("query position")
        return
    shown = [repr(t)[1:-1] for t in tokens]  # newlines and spaces stay visible
    axes.set_xticks(range(len(tokens)), shown, rotation=90, fontsize=6)
    axes.set_yticks(range(len(tokens)), shown, fontsize=6)
