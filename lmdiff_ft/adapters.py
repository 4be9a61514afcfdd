"""LoRA target presets for LM-Diff, PEFT config building, and adapters that know their base.

PEFT's LoRA cannot wrap 1-D parameters, so the λ vectors are trained and saved whole through
`modules_to_save` on their own small module (`self_attn.diff_lambda`). LoRA on a depthwise conv needs a
rank that is a multiple of its groups and cannot be merged, so the token-mixing conv is a saved module too.
Targets are resolved to explicit module names, so a preset that matches nothing is an error, a layer
selection is exact, and the adapter files stay plain PEFT.
"""

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors import safe_open

from .errors import UserError

BASE_INFO_FILE = "lmdiff_base.json"
BASE_DIMS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


@dataclass(frozen=True)
class Preset:
    description: str
    lora: tuple[str, ...] = ()  # module-name suffixes that get LoRA
    saved: tuple[str, ...] = ()  # module-name suffixes trained and saved whole (modules_to_save)


PRESETS = {
    "diff_attn": Preset(
        "LoRA on the differential-attention projections q, k, v, o, q2, k2",
        lora=tuple(f"self_attn.{p}_proj" for p in ("q", "k", "v", "o", "q2", "k2")),
    ),
    "lambda": Preset("the four λ vectors of every layer, trained and saved whole", saved=("self_attn.diff_lambda",)),
    "se_gate": Preset("LoRA on the SE gate's two linears", lora=("se_gate.fc1", "se_gate.fc2")),
    "mlp": Preset("LoRA on the SwiGLU MLP", lora=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
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
DEFAULT_PRESETS = ("diff_attn", "lambda", "se_gate")


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


def build_lora_config(
    targets: AdapterTargets,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    dora: bool = False,
    rslora: bool = False,
) -> LoraConfig:
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_dora=dora,
        use_rslora=rslora,
        target_modules=targets.lora,
        modules_to_save=targets.saved or None,
    )


def is_quantized(model: torch.nn.Module) -> bool:
    return getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)


def attach_adapters(
    model: torch.nn.Module,
    presets: list[str] = DEFAULT_PRESETS,
    layers: list[int] | None = None,
    gradient_checkpointing: bool = False,
    **lora_settings,
) -> PeftModel:
    """Wrap a base in a fresh LoRA adapter. On a 4/8-bit base, prepare it for k-bit training first."""
    targets = resolve_targets(model, list(presets), layers)
    if is_quantized(model):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return get_peft_model(model, build_lora_config(targets, **lora_settings))


def base_info(model: torch.nn.Module, base_path: str | Path, fingerprint: str) -> dict:
    config = model.config
    return {"base": str(base_path), "fingerprint": fingerprint, **{k: getattr(config, k) for k in BASE_DIMS}}


def write_base_info(adapter_dir: Path, info: dict) -> None:
    (Path(adapter_dir) / BASE_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def check_adapter_matches_base(model: torch.nn.Module, adapter_dir: Path, fingerprint: str | None) -> None:
    """Refuse an adapter made for another base with one line that names the mismatch (PEFT would raise a
    shape traceback, or worse, load silently onto a same-shaped but different base)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json (expected a PEFT adapter directory)")
    info_file = adapter_dir / BASE_INFO_FILE
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        for key in BASE_DIMS:
            ours = getattr(model.config, key, None)
            if key in info and info[key] != ours:
                raise UserError(
                    f"{adapter_dir}: adapter was made for a base with {key}={info[key]} ({info['base']}), "
                    f"this base has {key}={ours}"
                )
        if fingerprint is not None and info.get("fingerprint") not in (None, fingerprint):
            raise UserError(
                f"{adapter_dir}: adapter was made for base {info['base']} (fingerprint {info['fingerprint']}), "
                f"this base has fingerprint {fingerprint}: same shapes, different weights"
            )
    check_adapter_shapes(model, adapter_dir)


def plain_parameter_name(name: str) -> str:
    """The name a parameter has in the bare base, whatever PEFT wrappers hold it now."""
    name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
    return name.replace(".original_module.", ".").replace(".base_layer.", ".")


def check_adapter_shapes(model: torch.nn.Module, adapter_dir: Path) -> None:
    """Every tensor in the adapter file must land on a module of this base with matching dims."""
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{adapter_dir}: no adapter_model.safetensors (only safetensors adapters are loaded)")
    modules = dict(model.named_modules())
    # a base that already carries adapters names its weights ...base_layer / ...modules_to_save.<name>
    params = {plain_parameter_name(n): p for n, p in model.named_parameters() if ".lora_" not in n}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            name = key.removeprefix("base_model.model.")
            lora = re.match(r"(.+)\.lora_([AB])\.weight$", name)
            if lora:
                module = modules.get(lora.group(1))
                if module is None:
                    raise UserError(f"{adapter_dir}: adapter targets {lora.group(1)}, which this base does not have")
                wanted = (
                    getattr(module, "in_features", None)
                    if lora.group(2) == "A"
                    else getattr(module, "out_features", None)
                )
                got = shape[1] if lora.group(2) == "A" else shape[0]
                if wanted is not None and wanted != got:
                    raise UserError(
                        f"{adapter_dir}: {lora.group(1)} has {wanted} {'inputs' if lora.group(2) == 'A' else 'outputs'}"
                        f" in this base, the adapter expects {got}"
                    )
            elif name in params and tuple(params[name].shape) != shape:
                raise UserError(
                    f"{adapter_dir}: {name} has shape {tuple(params[name].shape)} in this base, the adapter has {shape}"
                )
            elif name not in params and not name.endswith(
                ("lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")
            ):
                raise UserError(f"{adapter_dir}: adapter holds {name}, which this base does not have")


def load_adapter(
    model: torch.nn.Module,
    adapter_dir: str | Path,
    fingerprint: str | None,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> PeftModel:
    """Load an adapter onto a base (or add it to a PeftModel under `adapter_name`) after checking it fits."""
    adapter_dir = Path(adapter_dir)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    check_adapter_matches_base(base, adapter_dir, fingerprint)
    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable)
        return model
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable)


def trainable_parameter_table(model: PeftModel, targets: AdapterTargets) -> list[tuple[str, int]]:
    """Trainable parameter count per preset (a module shared by two presets counts in both)."""
    counts = {}
    for preset, module_names in targets.by_preset.items():
        prefixes = tuple(f"base_model.model.{n}." for n in module_names)
        counts[preset] = sum(
            p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefixes)
        )
    return list(counts.items())
