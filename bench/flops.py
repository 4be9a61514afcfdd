"""Training FLOPs per token of each variant under LoRA, and the machine's measured GEMM rate.

Counting (per token of a forward + backward, the usual 2/4/6 rule):
  * a frozen weight matrix costs 4 FLOPs per parameter: 2 in the forward, 2 to back-propagate the
    activations through it (its own weight gradient is never formed);
  * a trainable one (the LoRA A and B matrices) costs 6: forward 2, activations 2, weight gradient 2;
  * attention costs, per map, 4·heads·head_dim·(T+1)/2 in the forward (QKᵀ and A·V over the causal
    half) and twice that in the backward; LM-Diff has 2 maps per layer, Llama 1.
The embedding (a lookup), norms, λ and the elementwise parts are not counted: they are bandwidth-bound
and small. The naive reference gets LM-Diff's count (model FLOPs, not the extra work it does).

    python -m bench.flops [--seq-lens 1024] [--device cuda --dtype bfloat16]
"""

import argparse

import torch
from torch import nn

from .common import (
    VARIANT_LABELS,
    VARIANTS,
    Dims,
    add_common_args,
    build_lora_model,
    dims_from_args,
    gemm_flops,
    gemm_seconds,
    median,
    print_table,
    setup,
    write_json,
)


def weight_flops_per_token(model: nn.Module) -> dict[str, float]:
    """FLOPs per token of every Linear/Conv1d weight, frozen (4/param) and trainable (6/param)."""
    frozen = trainable = 0
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv1d):
            if module.weight.requires_grad:
                trainable += module.weight.numel()
            else:
                frozen += module.weight.numel()
    return {"frozen_params": frozen, "trainable_params": trainable, "weights": 4.0 * frozen + 6.0 * trainable}


def attention_maps(variant: str) -> int:
    return 1 if variant == "llama" else 2


def attention_flops_per_token(dims: Dims, seq_len: int, maps: int) -> float:
    head_dim = dims.hidden // dims.heads
    forward = maps * 4.0 * dims.heads * head_dim * (seq_len + 1) / 2
    return 3.0 * forward * dims.layers


def training_flops_per_token(model: nn.Module, variant: str, dims: Dims, seq_len: int) -> dict[str, float]:
    counts = weight_flops_per_token(model)
    counts["attention"] = attention_flops_per_token(dims, seq_len, attention_maps(variant))
    counts["total"] = counts["weights"] + counts["attention"]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 2048])
    args = parser.parse_args()
    device, dtype = setup(args)
    dims = dims_from_args(args)

    rows = []
    for variant in VARIANTS:
        model = build_lora_model(variant, dims, torch.device("meta"), dtype)  # shapes only, no memory
        for seq_len in args.seq_lens:
            counts = training_flops_per_token(model, variant, dims, seq_len)
            rows.append({"variant": VARIANT_LABELS[variant], "seq_len": seq_len, **counts})
    print(f"Training FLOPs per token under LoRA, dims {dims}")
    print_table(
        [{**row, **{k: row[k] / 1e9 for k in ("weights", "attention", "total")}} for row in rows],
        [
            ("variant", "variant"),
            ("seq_len", "seq"),
            ("frozen_params", "frozen params"),
            ("trainable_params", "LoRA params"),
            ("weights", "weights GFLOP"),
            ("attention", "attention GFLOP"),
            ("total", "total GFLOP/token"),
        ],
    )

    timer = gemm_seconds(device, dtype)
    rate = gemm_flops() / median([timer() for _ in range(args.repeats)])
    print(f"\nmeasured GEMM rate ({args.dtype} 4096x4096 torch.mm on {device}): {rate / 1e9:.1f} GFLOP/s")
    path = write_json("flops", args, device, {"gemm_flops_per_s": rate, "flops_per_token": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
