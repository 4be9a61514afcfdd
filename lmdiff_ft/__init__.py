"""lmdiff-ft: LoRA/QLoRA fine-tuning of the LM-Diff architecture. Importing it registers `lmdiff`
with transformers' Auto classes."""

from .integrations.bitsandbytes import quiet_hub_kernel_notice

quiet_hub_kernel_notice()  # before anything imports bitsandbytes

from .model import LmDiffConfig, LmDiffForCausalLM, LmDiffModel  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LmDiffConfig", "LmDiffForCausalLM", "LmDiffModel", "__version__"]
