"""accelerate: what `accelerate launch` tells a process through its environment, and evaluating before training
without losing the DDP wrapper.

Checked against accelerate 1.15.0 (and transformers 5.24.0's Trainer, which calls it).
"""

import os
from pathlib import Path


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


def unprepare_after_evaluation(trainer) -> None:
    """Let `train()` wrap the model for DDP although `evaluate()` ran before it.

    The first `evaluate()` prepares the model for evaluation only (no DDP wrapper) and accelerate marks it as
    prepared, so `train()` then skips the wrapper: every rank would train its own copy on its shard of the data
    and nothing would average the gradients. Undoing the mark (and the autocast wrapper evaluation added) leaves
    the model as if never prepared. FSDP and DeepSpeed prepare fully in `evaluate()`, so they are left alone.
    """
    model, accelerator = trainer.model, trainer.accelerator
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled or not getattr(model, "_is_accelerate_prepared", False):
        return
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # restores model.forward in place
    del model._is_accelerate_prepared
    accelerator._models = [m for m in accelerator._models if m is not model]
