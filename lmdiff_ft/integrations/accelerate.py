"""accelerate: what `accelerate launch` tells a process through its environment, FSDP2 on CPU processes, and
evaluating before training without losing the DDP wrapper or FSDP2's sharding.

Checked against accelerate 1.15.0 and 1.16.0 (and transformers 5.24.0's Trainer, which calls it). What each
workaround is needed for:
- `fsdp_on_cpu_too`: 1.15 and 1.16 (both set the FSDP state only for GPU-like devices).
- `evaluation_before_sharding`: 1.15 only. 1.15's `Accelerator.prepare` refuses an FSDP2 model without its
  optimizer; 1.16 prepares it alone (for evaluation) and shards it again, with the optimizer, in `train()` (both
  checked with the FSDP state on before `trainer.evaluate()`). Since the evaluation before training computes its
  loss without the Trainer (evaluation/likelihood.py), it no longer prepares the model either way.
- `unprepare_after_evaluation`: 1.15 and 1.16 (both mark a model prepared by `evaluate()` as prepared).
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import accelerate
import torch
from packaging.version import Version

# accelerate before 1.16 refuses to prepare an FSDP2 model without its optimizer (what `evaluate()` asks for)
FSDP2_NEEDS_OPTIMIZER_TO_PREPARE = Version(accelerate.__version__) < Version("1.16")


def fsdp_enabled() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_version() -> int:
    """1 unless the accelerate config says `fsdp_version: 2`."""
    return int(os.environ.get("FSDP_VERSION", "1"))


def parameters_sharded() -> bool:
    """True under `accelerate launch` with FSDP or DeepSpeed ZeRO-3, which shard the base's own weights."""
    zero3 = (
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    )
    return fsdp_enabled() or zero3


def default_config_file() -> Path:
    """Where `accelerate config` writes, and where `accelerate launch` without --config_file looks (whether or not
    the file exists); accelerate keeps the path in a module of its command line."""
    from accelerate.commands.config.config_args import default_config_file as path

    return Path(path)


def fsdp_on_cpu_too(trainer) -> None:
    """Shard with FSDP2 where the launcher asked for it, also across CPU processes.

    accelerate turns `ACCELERATE_USE_FSDP` into FSDP only for GPU-like devices; with CPU processes its state stays
    `MULTI_CPU` and the run silently becomes DDP, every rank holding the whole model. PyTorch's FSDP2 shards on CPU
    too (gloo), so the trainer's accelerator gets the FSDP state and the launcher's plugin, as it would on GPUs.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if not fsdp_enabled() or state.distributed_type != DistributedType.MULTI_CPU:
        return
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    trainer.accelerator.get_state_dict = _full_state_dict  # checkpoints, and the adapter at the end


def _full_state_dict(model: torch.nn.Module, unwrap: bool = True) -> dict[str, torch.Tensor]:
    """Every rank gathers each sharded tensor whole. accelerate's FSDP2 path (torch's `get_model_state_dict` with
    `cpu_offload`) returns, on CPU processes, tensors whose storage FSDP has already freed (torch 2.13)."""
    from torch.distributed.tensor import DTensor

    return {
        name: (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()
        for name, tensor in model.state_dict().items()
    }


@contextmanager
def evaluation_before_sharding(trainer) -> Iterator[None]:
    """`evaluate()` before `train()` with FSDP2 on accelerate < 1.16, which shards model and optimizer in one
    `prepare` and refuses the model alone, which is what evaluation asks for. Before training every rank still holds
    the whole model, so evaluation runs it unsharded, prepared for evaluation only as without FSDP;
    `unprepare_after_evaluation` then leaves the sharding to `train()`. Newer accelerate needs nothing here."""
    if not FSDP2_NEEDS_OPTIMIZER_TO_PREPARE:
        yield
        return
    sharded = trainer.is_fsdp_enabled
    trainer.is_fsdp_enabled = False
    try:
        yield
    finally:
        trainer.is_fsdp_enabled = sharded


def unprepare_after_evaluation(trainer) -> None:
    """Let `train()` wrap the model for DDP, or shard it with FSDP2, although `evaluate()` ran before it.

    The first `evaluate()` prepares the model for evaluation only (no DDP wrapper, no sharding: see
    `evaluation_before_sharding`) and accelerate marks it as prepared, so `train()` then skips the wrapper: every
    rank would train its own copy on its shard of the data and nothing would average the gradients. Undoing the
    mark (and the autocast wrapper evaluation added) leaves the model as if never prepared. DeepSpeed prepares
    fully in `evaluate()`, so it is left alone.
    """
    model, accelerator = trainer.model, trainer.accelerator
    if trainer.is_deepspeed_enabled or not getattr(model, "_is_accelerate_prepared", False):
        return
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # restores model.forward in place
    del model._is_accelerate_prepared
    accelerator._models = [m for m in accelerator._models if m is not model]
