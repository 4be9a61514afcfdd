"""Bases with a name (`base: tiny`, `base: smollm2-135m`, the schema's `NamedBase`): built on first use, cached."""

from pathlib import Path

from ..schema.task import NamedBase
from .smollm2 import smollm2_base_dir
from .tiny import tiny_base_dir


def named_base_dir(name: NamedBase, seed: int = 0) -> Path:
    """The local checkpoint of a named base; `seed` picks which tiny base."""
    if name == "tiny":
        return tiny_base_dir(seed)
    if name == "smollm2-135m":
        return smollm2_base_dir()
    raise ValueError(f"no named base {name!r}")
