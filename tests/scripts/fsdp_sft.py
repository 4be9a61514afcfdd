"""Run by `accelerate launch` (tests/test_distributed.py): `lmdiff-ft sft` as the command line runs it, with a look,
at the first training step, at how each rank holds the decoder layers' parameters. Each rank writes
`<report>.rank<N>.json`: per decoder-layer parameter, whether it is a DTensor and its local and full sizes.

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 tests/scripts/fsdp_sft.py \\
        REPORT sft TASK [overrides]
"""

import json
import sys

import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import Trainer

from lmdiff_ft.cli import main

training_step = Trainer.training_step


def report_then_train(self, model, inputs, *args, **kwargs):
    if self.state.global_step == 0 and not getattr(self, "_reported", False):
        self._reported = True
        layers = {
            name: {
                "dtensor": isinstance(p, DTensor),
                "local": (p.to_local() if isinstance(p, DTensor) else p).numel(),
                "full": p.numel(),
            }
            for name, p in model.named_parameters()
            if ".layers." in name
        }
        with open(f"{sys.argv[1]}.rank{dist.get_rank()}.json", "w") as f:
            json.dump({"world_size": dist.get_world_size(), "parameters": layers}, f)
    return training_step(self, model, inputs, *args, **kwargs)


if __name__ == "__main__":
    Trainer.training_step = report_then_train
    sys.exit(main(sys.argv[2:]))
