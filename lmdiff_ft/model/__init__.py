"""The LM-Diff model (config + one modeling file), registered with the transformers Auto classes (no
`trust_remote_code` needed), its conversion from Llama checkpoints, and checkpoint helpers."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_lmdiff import LmDiffConfig
from .modeling_lmdiff import (
    LmDiffForCausalLM,
    LmDiffForQuestionAnswering,
    LmDiffForSequenceClassification,
    LmDiffForTokenClassification,
    LmDiffModel,
    LmDiffPreTrainedModel,
)

AutoConfig.register(LmDiffConfig.model_type, LmDiffConfig, exist_ok=True)
AutoModel.register(LmDiffConfig, LmDiffModel, exist_ok=True)
AutoModelForCausalLM.register(LmDiffConfig, LmDiffForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(LmDiffConfig, LmDiffForSequenceClassification, exist_ok=True)
AutoModelForQuestionAnswering.register(LmDiffConfig, LmDiffForQuestionAnswering, exist_ok=True)
AutoModelForTokenClassification.register(LmDiffConfig, LmDiffForTokenClassification, exist_ok=True)

__all__ = [
    "LmDiffConfig",
    "LmDiffForCausalLM",
    "LmDiffForQuestionAnswering",
    "LmDiffForSequenceClassification",
    "LmDiffForTokenClassification",
    "LmDiffModel",
    "LmDiffPreTrainedModel",
]
