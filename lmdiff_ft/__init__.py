"""lmdiff-ft: LoRA/QLoRA fine-tuning of the LM-Diff architecture. Importing it registers `lmdiff`
with transformers' Auto classes."""

import logging


class _WithoutHubKernelNotice(logging.Filter):
    """bitsandbytes warns on import, on CPUs with AVX512-BF16, that it could not fetch an optional 4-bit
    kernel from the Hub (the `kernels` package). Its built-in kernel is used instead, which is what we
    measure and test, so the notice only alarms users; other bitsandbytes messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "from kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_WithoutHubKernelNotice())

from .modeling import LmDiffCache, LmDiffConfig, LmDiffForCausalLM, LmDiffModel  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LmDiffCache", "LmDiffConfig", "LmDiffForCausalLM", "LmDiffModel", "__version__"]
