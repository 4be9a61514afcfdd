"""Quantized loading that never holds the checkpoint in memory: each tensor is read, quantized and freed.

transformers 5.24 already quantizes tensor by tensor while it loads (no loading option changes what follows), but
it reads the safetensors files through mmap, and the full-precision tensors it keeps (embeddings, `lm_head`, norms,
λ, biases, the SE gate) are zero-copy views into those mappings. So every page it read to quantize stays mapped and
resident in the process as long as the model lives: a 4-bit load of a fp32 checkpoint holds the whole file in RSS
on top of the 4-bit weights, more than the unquantized load, which maps the same file (bench/qlora_memory.py).
`disable_mmap=True` is no way out: it reads every file whole into memory before loading.

Here the same lazy safetensors slices transformers would make are opened with safetensors' `pread` backend instead,
and handed to the stock `from_pretrained(state_dict=...)`: each tensor is read into a private buffer, quantized by
transformers' own bitsandbytes ops and freed, and nothing stays mapped. Everything else (module replacement, skip
patterns, fp32 modules, `hf_quantizer`, `is_loaded_in_4bit`) is transformers' code path, so the result is the stock
quantized model, bit for bit.
"""

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, GenerationConfig, PretrainedConfig, PreTrainedModel

from ..errors import UserError
from ..integrations.glibc import trim_malloc_heap
from ..integrations.transformers import causal_lm_from_state_dict
from .quantization import quantization_config

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, sharded (with an index) or single."""
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        return [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (path / SAFETENSORS_SINGLE).is_file():
        return [path / SAFETENSORS_SINGLE]
    raise UserError(f"{path}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} (quantized bases load from safetensors)")


def load_quantized_streaming(
    path: str | Path,
    quantization: str,
    dtype: torch.dtype,
    device: torch.device | str,
    config: PretrainedConfig | None = None,
) -> PreTrainedModel:
    """What `AutoModelForCausalLM.from_pretrained(path, quantization_config=..., device_map={"": device})` returns,
    loaded one tensor at a time from private reads instead of a mapping of the whole checkpoint."""
    path = Path(path)
    config = config or AutoConfig.from_pretrained(path)
    generation_config = GenerationConfig.from_pretrained(path) if (path / "generation_config.json").is_file() else None
    with ExitStack() as files:
        state_dict = {}
        for file in checkpoint_files(path):
            reader = files.enter_context(safe_open(file, framework="pt", device="cpu", backend="pread"))
            state_dict.update((key, reader.get_slice(key)) for key in reader.keys())
        model = causal_lm_from_state_dict(
            config,
            state_dict,
            generation_config=generation_config,
            dtype=dtype,
            quantization_config=quantization_config(quantization, dtype),
            device_map={"": device},
        )
    # as from_pretrained(path) records it: PEFT copies the instance attribute into adapter_config.json
    model.config.name_or_path = model.name_or_path = str(path)
    # the freed full-precision reads lie between the small quantized tensors that stay, which pins their pages
    trim_malloc_heap()
    return model
