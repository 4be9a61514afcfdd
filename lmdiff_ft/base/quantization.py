"""How a base is quantized: the task's `quantization` resolved to what runs here, and bitsandbytes' config for it.

Only the big projections are quantized; the small, sensitive tensors stay in full precision: λ vectors, norms and
the token-mixing conv are not `nn.Linear` and are never touched, biases stay in the compute dtype, and the SE gate
(two small linears, often starting at exactly zero) and `lm_head` are skipped explicitly.
"""

from typing import get_args

import torch
from transformers import BitsAndBytesConfig

from ..errors import UserError
from ..integrations.accelerate import parameters_sharded
from ..schema.task import Quantization

QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
NOT_QUANTIZED = ["lm_head", r".*\.se_gate"]  # patterns in transformers' `llm_int8_skip_modules` syntax


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # an import-time failure of its native library counts as "not here"
        return False
    return True


def choose_quantization(requested: str) -> str:
    """The task's `quantization` as it runs here: `auto` is nf4 where bitsandbytes imports, else none."""
    if requested not in QUANTIZATIONS:
        raise UserError(f"quantization: expected one of {', '.join(QUANTIZATIONS)}, got {requested!r}")
    if requested == "auto":
        return "nf4" if bitsandbytes_available() else "none"
    if requested != "none" and not bitsandbytes_available():
        raise UserError(f"quantization: {requested} needs bitsandbytes, which does not import here (use 'none')")
    return requested


def quantization_config(quantization: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """bitsandbytes' settings for a chosen quantization (nf4, fp4, int8), None for none."""
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


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether a loaded model's weights are 4- or 8-bit (transformers marks the model when it quantized it)."""
    return getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
