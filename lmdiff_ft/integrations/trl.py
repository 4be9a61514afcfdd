"""TRL: its fused LM head on CPU, its QLoRA cast of trainable parameters, and its DPO reference adapter.

Checked against trl 1.16.0 (with peft 0.21.2).
"""

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import trl.trainer.utils as trl_utils
from trl.trainer.utils import use_adapter

REFERENCE_ADAPTER = "ref"  # the name DPOTrainer gives the frozen copy of a PeftModel's starting adapter

_original_use_triton = trl_utils._use_triton


def _compact_on_cpu(device: torch.device) -> bool:
    return device.type == "cpu" or _original_use_triton(device)


def score_labelled_positions_only() -> None:
    """Make TRL's fused LM head project only labelled positions on CPU as well (idempotent).

    TRL's SFT and DPO trainers patch the model with a fused LM head (`trl.trainer.utils.add_fused_lm_head`) that
    projects hidden states through `lm_head` in tiles and returns per-token log-probabilities. On CUDA/XPU it first
    gathers the positions whose label is not -100 ("compact"); everywhere else it projects every position, because
    on Neuron-style compilers a varying number of rows would recompile every step. On a CPU nothing recompiles, and
    SFT trains on a few percent of the tokens (the answers), so projecting all of them through a 49,152-word head
    costs more than a third of a small model's step. The choice is the module-level `_use_triton(device)` that
    `_fused_forward` looks up at each call; making it true for CPU devices makes the head compact there too. The
    per-token kernels read their own `_use_triton` from `trl.kernels.chunked_logprob`, which is left alone, so on
    CPU they still run their torch code.
    """
    trl_utils._use_triton = _compact_on_cpu


@contextmanager
def trainable_parameters_frozen(model: torch.nn.Module) -> Iterator[None]:
    """Build a TRL trainer without its QLoRA bf16 cast of every trainable parameter.

    On a quantized base TRL casts all trainable parameters to bf16 (the QLoRA paper's GPU recipe). Here that would
    round the λ vectors and saved modules, and on CPU make every LoRA matmul a bf16 one (about 20x slower). The cast
    only touches parameters that require grad, so they are frozen while the trainer is built.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in trainable:
            param.requires_grad_(True)


def reference_model(model) -> AbstractContextManager:
    """The model as DPOTrainer's reference: its frozen "ref" adapter when it started from an adapter, else the
    base with adapters disabled (TRL's own choice, in `DPOTrainer.compute_ref_log_probs`)."""
    return use_adapter(model, REFERENCE_ADAPTER if REFERENCE_ADAPTER in model.peft_config else None)
