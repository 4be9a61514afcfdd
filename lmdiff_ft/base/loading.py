"""Loading a base: one function for every command, with the dtype rules and the quantization of `quantization.py`.

A base is a named base (`named.py`), an LM-Diff checkpoint directory, a Llama checkpoint converted once into the
cache, or a Hub id. A quantized base is read tensor by tensor without mapping the checkpoint (`streaming.py`), so
its peak memory is that of the quantized model.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ..errors import UserError
from ..integrations.glibc import pin_malloc_mmap_threshold
from ..model import LmDiffConfig
from ..model.chat_template import CHAT_TEMPLATE
from ..model.checkpoint import checked_base_config, checkpoint_bytes, checkpoint_fingerprint, hub_snapshot
from ..model.convert import convert_checkpoint
from ..schema.task import PLAIN_LLAMA_BASES, Dtype, NamedBase
from .cache import cache_dir
from .named import named_base_dir
from .quantization import choose_quantization
from .streaming import load_quantized_streaming

DTYPES = {name: getattr(torch, name) for name in get_args(Dtype) if name != "auto"}
LARGE_CHECKPOINT_BYTES = 1 << 30  # above this, peak memory matters more than the allocator's page faults


@dataclass
class LoadedBase:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase | None  # None when loaded for inspection only
    path: Path
    quantization: str
    dtype: torch.dtype
    fingerprint: str

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"base {self.path} | quantization {self.quantization} | compute dtype {dtype} | device {self.model.device}"
        )


def default_device() -> torch.device:
    """This process's device: its local rank's GPU under `accelerate launch`, else cuda:0, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def choose_dtype(requested: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 autocast is ~20x slower there), bf16 on GPUs that have it, else fp16."""
    if requested != "auto":
        if requested not in DTYPES:
            raise UserError(f"dtype: expected auto or one of {', '.join(DTYPES)}, got {requested!r}")
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_base_path(base: str, seed: int = 0) -> Path:
    """A named base (`tiny`, `smollm2-135m`) → its locally built checkpoint; a directory → itself;
    `org/name` → a Hub snapshot."""
    if base in get_args(NamedBase):
        return named_base_dir(base, seed)
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
            made_for = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            hint = f"; it was made for {made_for}" if made_for not in (None, "None") else ""
            raise UserError(f"base: {base} is a PEFT adapter (adapter_config.json), not a base model{hint}")
        if not (path / "config.json").is_file():
            raise UserError(f"base: {base} has no config.json (expected a model checkpoint directory)")
        return path
    if base.startswith((".", "/", "~")) or base.count("/") != 1:
        named = ", ".join(repr(name) for name in get_args(NamedBase))
        raise UserError(f"base: {base}: no such directory (expected {named}, a checkpoint directory or a Hub id)")
    return hub_snapshot(base, "base: ")


def converted_llama_dir(llama_dir: Path) -> Path:
    """Convert a Llama checkpoint once and keep it in the cache, keyed by the source's fingerprint."""
    out = cache_dir() / "converted" / f"{llama_dir.name}-{checkpoint_fingerprint(llama_dir)}"
    if not (out / "config.json").exists():
        print(f"converting Llama checkpoint {llama_dir} -> {out}")
        convert_checkpoint(str(llama_dir), out)
    return out


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_base(
    base: str,
    quantization: str = "auto",
    dtype: str = "auto",
    convert_from_llama: bool = False,
    seed: int = 0,
    device: torch.device | None = None,
    with_tokenizer: bool = True,
    plain_llama: bool = False,
) -> LoadedBase:
    """Load an LM-Diff base (quantized as asked) and its tokenizer. Used by every command. A Llama checkpoint is
    converted (`convert_from_llama`), or trained as it is (`plain_llama`, and the named Llama bases): the baseline."""
    path = resolve_base_path(base, seed)
    config = checked_base_config(path)
    model_type = config.model_type
    plain_llama = plain_llama or base in PLAIN_LLAMA_BASES
    if model_type == "llama" and not plain_llama:
        if not convert_from_llama:
            raise UserError(
                f"base: {base} is a Llama checkpoint; set `base: {{path: {base}, convert_from_llama: true}}` "
                "or run `lmdiff-ft convert` first (or `plain_llama: true` to train it unconverted, as a baseline)"
            )
        path = converted_llama_dir(path)
        config = checked_base_config(path)
    elif plain_llama and model_type != "llama":
        raise UserError(f"base: {base} has model_type {model_type!r}; `plain_llama: true` takes a Llama checkpoint")
    elif model_type not in ("llama", LmDiffConfig.model_type):
        raise UserError(f"base: {base} has model_type {model_type!r}, expected 'lmdiff' (or 'llama' to convert)")

    device = device or default_device()
    chosen = choose_quantization(quantization)
    compute_dtype = choose_dtype(dtype, device)
    if device.type == "cpu" and checkpoint_bytes(path) > LARGE_CHECKPOINT_BYTES:
        pin_malloc_mmap_threshold()  # halves the peak of a TinyLlama-sized QLoRA step; costs time on small models
    if chosen == "none":
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=compute_dtype, device_map={"": device})
    else:
        model = load_quantized_streaming(path, chosen, compute_dtype, device, config)
    tokenizer = load_tokenizer(path) if with_tokenizer else None
    return LoadedBase(model, tokenizer, path, chosen, compute_dtype, checkpoint_fingerprint(path))
