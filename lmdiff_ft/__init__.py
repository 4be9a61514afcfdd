"""lmdiff-ft: LoRA/QLoRA fine-tuning of the LM-Diff architecture. Importing it registers `lmdiff`
with transformers' Auto classes."""

from .modeling import LmDiffCache, LmDiffConfig, LmDiffForCausalLM, LmDiffModel

__version__ = "0.1.0"
__all__ = ["LmDiffCache", "LmDiffConfig", "LmDiffForCausalLM", "LmDiffModel", "__version__"]
