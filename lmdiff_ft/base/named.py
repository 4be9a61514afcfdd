"""Bases with a name (`tiny`, `smollm2-135m`, `smollm2-135m-llama`: the schema's `NamedBase`): built on first use,
cached. Named Llama bases (`PLAIN_LLAMA_BASES`) train as they are, unconverted."""

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
    if name == "smollm2-135m-llama":
        return smollm2_base_dir(plain_llama=True)
    raise ValueError(f"no named base {name!r}")
