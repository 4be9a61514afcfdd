"""Base model + tokenizer loading: one function for every command, with the quantization and dtype rules.

Quantization goes through transformers' `BitsAndBytesConfig`. Only the big projections are quantized;
the small, sensitive tensors stay in full precision: λ vectors, norms and the token-mixing conv are not
`nn.Linear` and are never touched, biases stay in the compute dtype, and the SE gate (two small linears,
often starting at exactly zero) and `lm_head` are skipped explicitly. A quantized base is read tensor by tensor
without mapping the checkpoint (`streaming.py`), so its peak memory is that of the quantized model.
"""

import ctypes
import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from .chat_template import CHAT_TEMPLATE
from .errors import UserError
from .modeling import LmDiffConfig

QUANTIZATIONS = ("auto", "nf4", "fp4", "int8", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NOT_QUANTIZED = ["lm_head", r".*\.se_gate"]  # patterns in transformers' `llm_int8_skip_modules` syntax
# Config keys that describe how a source checkpoint was quantized, never how ours are
SOURCE_QUANTIZATION_KEYS = ("quantization_config",)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
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


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # an import-time failure of its native library counts as "not here"
        return False
    return True


def glibc() -> ctypes.CDLL | None:
    """This process's C library if it is glibc, whose malloc the two functions below tune; else None."""
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        return ctypes.CDLL("libc.so.6")
    return None


def pin_malloc_mmap_threshold() -> None:
    """Keep glibc's mmap threshold at its initial 128 KiB so that large freed buffers go back to the OS at once.

    After the first large free glibc raises the threshold (up to 32 MiB) and from then on serves the temporaries
    of a CPU training step (activations; in QLoRA every quantized weight, dequantized in every matmul) from its
    heap, where the small long-lived tensors allocated between them pin the freed pages: for a TinyLlama-sized
    nf4 base, load + one training step peaks at about twice the memory (bench/qlora_memory.py). The price is a
    page fault per page of each large allocation. A no-op off glibc.
    """
    if (libc := glibc()) is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def checkpoint_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


def trim_malloc_heap() -> None:
    """Hand the free pages that glibc keeps inside its heap back to the OS (a no-op off glibc)."""
    if (libc := glibc()) is not None:
        libc.malloc_trim(0)


def choose_quantization(requested: str) -> str:
    if requested not in QUANTIZATIONS:
        raise UserError(f"quantization: expected one of {', '.join(QUANTIZATIONS)}, got {requested!r}")
    if requested == "auto":
        return "nf4" if bitsandbytes_available() else "none"
    if requested != "none" and not bitsandbytes_available():
        raise UserError(f"quantization: {requested} needs bitsandbytes, which does not import here (use 'none')")
    return requested


def choose_dtype(requested: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 autocast is ~20x slower there), bf16 on GPUs that have it, else fp16."""
    if requested != "auto":
        if requested not in DTYPES:
            raise UserError(f"dtype: expected auto or one of {', '.join(DTYPES)}, got {requested!r}")
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def parameters_sharded() -> bool:
    """True under `accelerate launch` with FSDP or DeepSpeed ZeRO-3, which shard the base's own weights."""
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    zero3 = (
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    )
    return fsdp or zero3


def quantization_config(quantization: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if quantization == "none":
        return None
    if quantization == "int8":
        if parameters_sharded():
            raise UserError("quantization: int8 weights cannot be sharded by FSDP/ZeRO-3; use nf4, fp4 or none")
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=NOT_QUANTIZED)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True,
        # FSDP/ZeRO-3 shard tensors of one dtype: 4-bit weights packed into the compute dtype shard with the rest
        # (packed as uint8 they would stay whole on every GPU). It must equal the compute dtype, or the cast
        # while gathering would destroy the packed bits.
        bnb_4bit_quant_storage=dtype if parameters_sharded() else torch.uint8,
        llm_int8_skip_modules=NOT_QUANTIZED,
    )


def cache_dir() -> Path:
    """Where built and converted bases are kept: $LMDIFF_FT_CACHE, else ~/.cache/lmdiff-ft."""
    return Path(os.environ.get("LMDIFF_FT_CACHE", Path.home() / ".cache" / "lmdiff-ft"))


def resolve_base_path(base: str, seed: int = 0) -> Path:
    """A named base (`tiny`, `smollm2-135m`) → its locally built checkpoint; a directory → itself;
    `org/name` → a Hub snapshot."""
    if base == "tiny":
        from .tiny import tiny_base_dir

        return tiny_base_dir(seed)
    if base == "smollm2-135m":
        from .smollm2 import smollm2_base_dir

        return smollm2_base_dir()
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
        raise UserError(
            f"base: {base}: no such directory (expected 'tiny', 'smollm2-135m', a checkpoint directory or a Hub id)"
        )
    return hub_snapshot(base, "base: ")


def hub_snapshot(repo_id: str, key: str = "") -> Path:
    """A Hub checkpoint's safetensors, config and tokenizer files (never pickles), downloaded or cached."""
    try:
        from huggingface_hub import snapshot_download

        allow = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.jinja"]
        return Path(snapshot_download(repo_id, allow_patterns=allow))
    except Exception as exc:  # offline, unknown repo, auth: the user's to fix
        reason = exc.__class__.__name__
        raise UserError(f"{key}{repo_id}: not a local directory and not downloadable ({reason})") from exc


def checked_base_config(path: Path) -> PretrainedConfig:
    """A checkpoint's config, refusing one that is already quantized: lmdiff-ft quantizes full-precision bases
    itself. A `gguf` block is dropped instead: it is left behind when a GGUF-loaded model's state dict was saved
    as safetensors, whose tensors are then full precision (transformers would refuse any other quantization)."""
    config = AutoConfig.from_pretrained(path)
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return config
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
    if str(method) == "gguf":
        for key in SOURCE_QUANTIZATION_KEYS:
            delattr(config, key)
        return config
    raise UserError(
        f"base: {path} is already quantized (config.json: quantization_config.quant_method {str(method)!r}); "
        "point base at its full-precision checkpoint, lmdiff-ft quantizes it as the task's `quantization` says"
    )


def converted_llama_dir(llama_dir: Path) -> Path:
    """Convert a Llama checkpoint once and keep it in the cache, keyed by the source's fingerprint."""
    from .convert import convert_checkpoint

    out = cache_dir() / "converted" / f"{llama_dir.name}-{checkpoint_fingerprint(llama_dir)}"
    if not (out / "config.json").exists():
        print(f"converting Llama checkpoint {llama_dir} -> {out}")
        convert_checkpoint(str(llama_dir), out)
    return out


def checkpoint_fingerprint(directory: Path) -> str:
    """A short hash of a checkpoint's config and weights, cheap even for GBs: every safetensors header plus
    64 KiB samples at 16 evenly spaced offsets of each file. Two different trainings never collide."""
    digest = hashlib.sha256()
    config = json.loads((directory / "config.json").read_text())
    for key in sorted(config):
        if key not in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
            digest.update(f"{key}={config[key]}".encode())
    for file in sorted(directory.glob("*.safetensors")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            digest.update(f.read(header_length))
            for i in range(16):
                f.seek(8 + header_length + (size - 8 - header_length) * i // 16)
                digest.update(f.read(65536))
    return digest.hexdigest()[:16]


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
) -> LoadedBase:
    """Load an LM-Diff base (quantized as asked) and its tokenizer. Used by every command."""
    path = resolve_base_path(base, seed)
    config = checked_base_config(path)
    model_type = config.model_type
    if model_type == "llama":
        if not convert_from_llama:
            raise UserError(
                f"base: {base} is a Llama checkpoint; set `base: {{path: {base}, convert_from_llama: true}}` "
                "or run `lmdiff-ft convert` first"
            )
        path = converted_llama_dir(path)
        config = checked_base_config(path)
    elif model_type != LmDiffConfig.model_type:
        raise UserError(f"base: {base} has model_type {model_type!r}, expected 'lmdiff' (or 'llama' to convert)")

    device = device or default_device()
    chosen = choose_quantization(quantization)
    compute_dtype = choose_dtype(dtype, device)
    if device.type == "cpu" and checkpoint_bytes(path) > LARGE_CHECKPOINT_BYTES:
        pin_malloc_mmap_threshold()  # halves the peak of a TinyLlama-sized QLoRA step; costs time on small models
    if chosen == "none":
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=compute_dtype, device_map={"": device})
    else:
        from .streaming import load_quantized_streaming  # it imports this module

        model = load_quantized_streaming(path, chosen, compute_dtype, device, config)
    tokenizer = load_tokenizer(path) if with_tokenizer else None
    return LoadedBase(model, tokenizer, path, chosen, compute_dtype, checkpoint_fingerprint(path))
