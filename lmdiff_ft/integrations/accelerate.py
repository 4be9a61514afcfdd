"""accelerate: what `accelerate launch` tells a process through its environment, and FSDP2 on CPU processes.

Checked against accelerate 1.15.0 and 1.16.0 (and transformers 5.24.0's Trainer, which calls it): both set the
FSDP state only for GPU-like devices, which `fsdp_on_cpu_too` works around. The evaluation before training computes
its loss without the Trainer (evaluation/likelihood.py), so it never asks accelerate to prepare the model alone,
which 1.15 refuses under FSDP2 and 1.16 allows.
"""

import os
from pathlib import Path

import torch


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
