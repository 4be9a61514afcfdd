"""Training FLOPs per token of each variant under LoRA, and the machine's measured GEMM rate.

Counting, per token of a forward + backward:
  * matrix products with weights (frozen ones, LoRA A/B, lm_head) are counted by torch's FlopCounterMode
    on a shapes-only (meta device) copy of the model running one real forward + backward: exactly the
    products autograd runs. That is the usual 2/4/6 rule (a frozen matrix 2 in the forward and 2 to pass
    the gradient back, a trainable one 2 more for its weight gradient) with what autograd skips left out:
    the first layer's projections read the frozen embeddings, whose gradient nobody needs.
  * attention costs, per map, 4·heads·head_dim·(T+1)/2 in the forward (QKᵀ and A·V over the causal
    half) and twice that in the backward; LM-Diff (both variants) has 2 maps per layer, Llama 1. DiffLlama
    also runs 2: two SDPA calls over all heads, sharing Q and K, one per half of V.
The embedding (a lookup), norms, λ and the elementwise parts are not counted: they are bandwidth-bound
and small. The naive reference runs the same weight products as LM-Diff and is credited LM-Diff's
attention (model FLOPs, not the extra work it does).

The GEMM rate is that of one product of each sequence length's probe shape (`common.gemm_shape`: the MLP's
up projection of that many tokens), the denominator of MFU in bench/train_step.py.

    python -m bench.flops [--seq-lens 1024] [--device cuda --dtype bfloat16]
"""

import argparse

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lmdiff_ft.model.modeling_lmdiff import LmDiffAdaptiveRMSNorm

from .common import (
    VARIANT_LABELS,
    VARIANTS,
    Dims,
    add_common_args,
    build_lora_model,
    dims_from_args,
    gemm_flops,
    gemm_seconds,
    gemm_shape,
    median,
    print_table,
    setup,
    write_json,
)

COUNTED_TOKENS = 16  # weight products scale with the token count; attention is added analytically
WEIGHT_PRODUCTS = ("aten.mm", "aten.addmm")  # attention shows up as bmm / SDPA and is left out here


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Weights of the Linear/Conv1d layers (what the products multiply by), frozen and trainable."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear | nn.Conv1d)]
    return {
        "frozen_params": sum(w.numel() for w in weights if not w.requires_grad),
        "trainable_params": sum(w.numel() for w in weights if w.requires_grad),
    }


def weight_flops_per_token(variant: str, dims: Dims) -> dict[str, float]:
    """FLOPs per token of the weight products in one LoRA training step, counted as autograd runs them."""
    model = build_lora_model(variant, dims, torch.device("meta"), torch.float32).train()
    for norm in model.modules():
        if isinstance(norm, LmDiffAdaptiveRMSNorm) and norm.fc_gamma is not None:
            if not any(p.requires_grad for p in norm.fc_gamma.parameters()):
                # frozen at its zero init: the real step skips it (LmDiffAdaptiveRMSNorm._gamma_is_frozen_zero)
                norm.fc_gamma = None
    tokens = torch.zeros(1, COUNTED_TOKENS, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(input_ids=tokens, labels=tokens).loss.backward()
    by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    weights = sum(by_op.get(op, 0) for op in WEIGHT_PRODUCTS) / COUNTED_TOKENS
    return {**parameter_counts(model), "weights": weights}


def attention_maps(variant: str) -> int:
    """Attention maps per layer: Llama 1; LM-Diff 2 (q1k1ᵀ and q2k2ᵀ); DiffLlama 2 SDPA calls over all heads."""
    return 1 if variant == "llama" else 2


def attention_flops_per_token(dims: Dims, seq_len: int, maps: int) -> float:
    head_dim = dims.hidden // dims.heads
    forward = maps * 4.0 * dims.heads * head_dim * (seq_len + 1) / 2
    return 3.0 * forward * dims.layers


def training_flops_per_token(variant: str, dims: Dims, seq_len: int) -> dict[str, float]:
    # the naive reference is credited the products LM-Diff needs: it also runs the all-zero fc_gamma LM-Diff skips
    counts = weight_flops_per_token("lmdiff" if variant == "naive" else variant, dims)
    counts["attention"] = attention_flops_per_token(dims, seq_len, attention_maps(variant))
    counts["total"] = counts["weights"] + counts["attention"]
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 2048])
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    dims = dims_from_args(args)

    rows = []
    for variant in VARIANTS:
        for seq_len in args.seq_lens:
            counts = training_flops_per_token(variant, dims, seq_len)
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

    gemm = []
    print(f"\nmeasured GEMM rate ({args.dtype} torch.mm on {device}), median of {args.repeats}:")
    for seq_len in args.seq_lens:
        shape = gemm_shape(dims, seq_len)
        timer = gemm_seconds(device, dtype, shape)
        rate = gemm_flops(shape) / median([timer() for _ in range(args.repeats)])
        gemm.append({"seq_len": seq_len, "shape": shape, "flops_per_s": rate})
        print(f"  seq {seq_len}: {' x '.join(map(str, shape))} product, {rate / 1e9:.1f} GFLOP/s")
    path = write_json("flops", args, device, {"gemm": gemm, "flops_per_token": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
