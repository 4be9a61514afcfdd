"""Run by `torchrun --nproc_per_node 2` (tests/test_distributed.py): every rank loads the checkpoint with
transformers' tensor parallelism (the model's own plan, gloo on CPU), runs one forward pass on a padded batch, a
short greedy generation and a backward pass of the LM loss. Rank 0 writes the logits, the generated ids, its
gradients (its own shard of a sharded parameter) and, for every parameter, its local shape next to its full one."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM
from transformers.distributed.configuration_utils import DistributedConfig

import lmdiff_ft.model  # noqa: F401  (registers LM-Diff with the Auto classes)


def main(checkpoint: str, inputs: str, out: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, distributed_config=DistributedConfig(tp_plan="auto"))
    batch = torch.load(inputs)
    with torch.no_grad():
        logits = model.eval()(**batch).logits
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.train()(**batch, labels=batch["input_ids"]).loss.backward()
    gradients = {
        name: (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).clone()
        for name, p in model.named_parameters()
        if p.grad is not None
    }
    shapes = {
        name: {"local": list(p.to_local().shape if isinstance(p, DTensor) else p.shape), "full": list(p.shape)}
        for name, p in model.named_parameters()
    }
    if dist.get_rank() == 0:
        torch.save({"logits": logits, "generated": generated, "gradients": gradients}, out + ".pt")
        with open(out + ".shapes.json", "w") as f:
            json.dump(shapes, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
