"""Adapters that know their base: each adapter directory records the base it was trained on (dims and a
fingerprint of the weights), and loading one onto another base is refused with one line."""

import json
import re
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open

from ..errors import UserError

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
