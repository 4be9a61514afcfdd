"""bitsandbytes on CPU: its import-time notice, its CPU inference repacking, and reading its 4-bit codes.

Checked against bitsandbytes 0.50.2.
"""

import logging

import torch

CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"
HUB_KERNEL_NOTICE = "from kernels-community"
CPU_REPACKING_SWITCH = "support_avx512bf16_for_cpu"  # an attribute of every `Linear4bit`


class _WithoutHubKernelNotice(logging.Filter):
    """bitsandbytes warns on import, on CPUs with AVX512-BF16, that it could not fetch an optional 4-bit kernel
    from the Hub (the `kernels` package). Its built-in kernel is used instead, which is what we measure and test,
    so the notice only alarms users; other bitsandbytes messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return HUB_KERNEL_NOTICE not in record.getMessage()


def quiet_hub_kernel_notice() -> None:
    """Install the filter above on bitsandbytes' CPU ops logger (before bitsandbytes is first imported)."""
    logger = logging.getLogger(CPU_OPS_LOGGER)
    if not any(isinstance(f, _WithoutHubKernelNotice) for f in logger.filters):
        logger.addFilter(_WithoutHubKernelNotice())


def keep_4bit_layout_trainable(model: torch.nn.Module) -> None:
    """bitsandbytes repacks a CPU 4-bit weight into an inference-only layout the first time it runs in eval
    mode without gradients (as evaluation before training does), and training on it afterwards fails.
    Training runs keep the standard layout."""
    for module in model.modules():
        if hasattr(module, CPU_REPACKING_SWITCH):
            setattr(module, CPU_REPACKING_SWITCH, False)


def dense_weight(linear: torch.nn.Linear) -> torch.Tensor:
    """The weight as values: bitsandbytes' 4-bit weights are packed codes (zero is not code 0), so they are
    dequantized; its int8 weights are row-scaled, so a zero row is zero codes."""
    quant_state = getattr(linear.weight, "quant_state", None)
    if quant_state is None:
        return linear.weight
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(linear.weight.data, quant_state)
