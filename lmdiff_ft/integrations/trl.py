"""TRL: score only the positions that carry a label on every device.

Checked against trl 1.16.0. TRL's SFT and DPO trainers patch the model with a fused LM head
(`trl.trainer.utils.add_fused_lm_head`) that projects hidden states through `lm_head` in tiles and returns
per-token log-probabilities. On CUDA/XPU it first gathers the positions whose label is not -100 ("compact");
everywhere else it projects every position, because on Neuron-style compilers a varying number of rows would
recompile every step. On a CPU nothing recompiles, and SFT trains on a few percent of the tokens (the answers),
so projecting all of them through a 49,152-word head costs more than a third of a small model's step. The choice
is the module-level `_use_triton(device)` that `_fused_forward` looks up at each call; making it true for CPU
devices makes the head compact there too. The per-token kernels themselves read their own `_use_triton` from
`trl.kernels.chunked_logprob`, which is left alone, so on CPU they still run their torch code.
"""

import torch
import trl.trainer.utils as trl_utils

_original_use_triton = trl_utils._use_triton


def _compact_on_cpu(device: torch.device) -> bool:
    return device.type == "cpu" or _original_use_triton(device)


def score_labelled_positions_only() -> None:
    """Make TRL's fused LM head project only labelled positions on CPU as well (idempotent)."""
    trl_utils._use_triton = _compact_on_cpu
