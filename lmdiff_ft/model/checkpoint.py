"""Checkpoints on disk or on the Hub: fetching one (safetensors only), reading its config, fingerprinting it."""

import hashlib
import json
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from ..errors import UserError

# Config keys that describe how a source checkpoint was quantized, never how ours are
SOURCE_QUANTIZATION_KEYS = ("quantization_config",)


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


def checkpoint_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


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
