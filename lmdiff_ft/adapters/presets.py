"""LoRA target presets for LM-Diff, and fresh adapters built from them.

PEFT's LoRA cannot wrap 1-D parameters, so the λ vectors are trained and saved whole through
`modules_to_save` on their own small module (`self_attn.diff_lambda`). LoRA on a depthwise conv needs a
rank that is a multiple of its groups and cannot be merged, so the token-mixing conv is a saved module too.
Targets are resolved to explicit module names, so a preset that matches nothing is an error, a layer
selection is exact, and the adapter files stay plain PEFT. The preset names are the schema's `PresetName`.
"""

import difflib
import re
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

from ..base.quantization import is_quantized
from ..errors import UserError
from ..schema.task import AdapterConfig, PresetName


@dataclass(frozen=True)
class Preset:
    description: str
    lora: tuple[str, ...] = ()  # module-name suffixes that get LoRA
    saved: tuple[str, ...] = ()  # module-name suffixes trained and saved whole (modules_to_save)
    llama_too: bool = False  # also for a plain Llama base (`plain_llama`): the baseline's presets


PRESETS: dict[PresetName, Preset] = {
    "diff_attn": Preset(
        "LoRA on the differential-attention projections q, k, v, o, q2, k2",
        lora=tuple(f"self_attn.{p}_proj" for p in ("q", "k", "v", "o", "q2", "k2")),
    ),
    "attn": Preset(
        "LoRA on the attention projections q, k, v, o alone (what plain LoRA trains on a Llama)",
        lora=tuple(f"self_attn.{p}_proj" for p in ("q", "k", "v", "o")),
        llama_too=True,
    ),
    "lambda": Preset("the four λ vectors of every layer, trained and saved whole", saved=("self_attn.diff_lambda",)),
    "se_gate": Preset("LoRA on the SE gate's two linears", lora=("se_gate.fc1", "se_gate.fc2")),
    "mlp": Preset("LoRA on the SwiGLU MLP", lora=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), llama_too=True),
    "adaptive_norm": Preset(
        "LoRA on the adaptive-norm projections fc_gamma",
        lora=("layernorm.fc_gamma", "layernorm.fc_gamma.0", "layernorm.fc_gamma.1"),
    ),
    "token_mixing": Preset("the causal depthwise conv, trained and saved whole", saved=("token_mixing",)),
}
PRESETS["all"] = Preset(
    "every preset above",
    lora=tuple(s for p in PRESETS.values() for s in p.lora),
    saved=tuple(s for p in PRESETS.values() for s in p.saved),
)


@dataclass
class AdapterTargets:
    lora: list[str] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    by_preset: dict[str, list[str]] = field(default_factory=dict)


def layer_index(module_name: str) -> int | None:
    match = re.search(r"\blayers\.(\d+)\.", module_name)
    return int(match.group(1)) if match else None


def unknown_preset_error(name: str) -> UserError:
    close = difflib.get_close_matches(name, PRESETS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UserError(f"adapter.presets: unknown preset {name!r}{hint}; known: {', '.join(PRESETS)}")


def resolve_targets(model: torch.nn.Module, presets: list[str], layers: list[int] | None = None) -> AdapterTargets:
    """Explicit module names for each preset, restricted to `layers`. Matching nothing is an error."""
    num_layers = model.config.num_hidden_layers
    if layers is not None:
        outside = [i for i in layers if not 0 <= i < num_layers]
        if outside:
            raise UserError(f"adapter.layers: {outside} outside this base's layers 0-{num_layers - 1}")
    modules = dict(model.named_modules())
    targets = AdapterTargets()
    for preset_name in presets:
        if preset_name not in PRESETS:
            raise unknown_preset_error(preset_name)
        preset = PRESETS[preset_name]
        if model.config.model_type == "llama" and not preset.llama_too:
            llama_presets = ", ".join(name for name, p in PRESETS.items() if p.llama_too)
            raise UserError(f"adapter.presets: {preset_name!r} is LM-Diff's; a plain Llama base takes {llama_presets}")

        def matches(suffixes: tuple[str, ...], linear_only: bool) -> list[str]:
            return [
                name
                for name, module in modules.items()
                if any(name.endswith("." + s) for s in suffixes)
                and (layers is None or layer_index(name) in layers)
                and (not linear_only or isinstance(module, torch.nn.Linear))
            ]

        lora, saved = matches(preset.lora, linear_only=True), matches(preset.saved, linear_only=False)
        if not lora and not saved:
            raise UserError(
                f"adapter.presets: {preset_name!r} matches no module in this base"
                f"{' within the selected layers' if layers is not None else ''} (is that component switched off?)"
            )
        targets.by_preset[preset_name] = lora + saved
        targets.lora += [n for n in lora if n not in targets.lora]
        targets.saved += [n for n in saved if n not in targets.saved]
    return targets


def dead_branch_warning(model: torch.nn.Module, presets: list[str], layers: list[int] | None = None) -> str | None:
    """q2/k2 act only through λ·A2·v. On a base whose λ is exactly 0 (a Llama just converted), LoRA on them gets no
    gradient unless λ trains too: `diff_attn` alone would train q/k/v/o and carry q2/k2 weights that never move."""
    if model.config.model_type != "lmdiff" or "diff_attn" not in presets or {"lambda", "all"} & set(presets):
        return None
    chosen = [layer for i, layer in enumerate(model.model.layers) if layers is None or i in layers]
    with torch.no_grad():
        if any(float(layer.self_attn.diff_lambda()) != 0.0 for layer in chosen):
            return None
    return (
        "adapter.presets: diff_attn without lambda on a base whose λ is 0 (a converted Llama): q2/k2 get no gradient "
        "and their LoRA stays zero; add lambda to train the second attention branch"
    )


def build_lora_config(targets: AdapterTargets, settings: AdapterConfig) -> LoraConfig:
    """The task's `adapter` section as PEFT's config, on the resolved module names."""
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        use_dora=settings.dora,
        use_rslora=settings.rslora,
        target_modules=targets.lora,
        modules_to_save=targets.saved or None,
    )


def attach_adapters(model: torch.nn.Module, settings: AdapterConfig, gradient_checkpointing: bool = False) -> PeftModel:
    """Wrap a base in a fresh LoRA adapter as the task's `adapter` section says (its presets on its layers).
    On a 4/8-bit base, prepare it for k-bit training first."""
    targets = resolve_targets(model, list(settings.presets), settings.layers)
    if is_quantized(model):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return get_peft_model(model, build_lora_config(targets, settings))


def trainable_parameter_table(model: PeftModel, targets: AdapterTargets) -> list[tuple[str, int]]:
    """Trainable parameter count per preset (a module shared by two presets counts in both)."""
    counts = {}
    for preset, module_names in targets.by_preset.items():
        prefixes = tuple(f"base_model.model.{n}." for n in module_names)
        counts[preset] = sum(
            p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefixes)
        )
    return list(counts.items())
