"""Tokens/s, peak memory and MFU of one LoRA training step (forward + backward + AdamW step), for our
LM-Diff, transformers' Llama (sdpa) with the same dims, and the naive LM-Diff reference, side by side.

    python -m bench.train_step [--seq-lens 256 1024 2048] [--variants lmdiff llama naive] [--layers 2]
    python -m bench.train_step --device cuda --dtype bfloat16

Each round times one 4096³ GEMM and one step of every variant, back to back; ratios and MFU are taken
within a round (so a burst of load elsewhere on the machine hits both sides of a ratio) and the median
over rounds is reported.
"""

import argparse
from collections.abc import Callable

import torch

from .common import (
    MEMORY_NOTE,
    MIB,
    VARIANT_LABELS,
    VARIANTS,
    add_common_args,
    build_lora_model,
    dims_from_args,
    gemm_flops,
    gemm_seconds,
    held_bytes,
    load_average,
    median,
    print_table,
    setup,
    step_peak_bytes,
    time_call,
    write_json,
)
from .flops import training_flops_per_token


def make_step(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """One training step on `tokens` (labels = inputs), and its AdamW over the trainable weights. The fused
    AdamW is one kernel for all LoRA tensors, so the optimizer does not weigh on LM-Diff's twice as many."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def measure_seq_len(
    models: dict[str, torch.nn.Module], seq_len: int, args: argparse.Namespace, device: torch.device, gemm_timer
) -> list[dict]:
    dims = dims_from_args(args)
    tokens = torch.randint(3, dims.vocab, (args.batch, seq_len), device=device)
    steps, peaks, held = {}, {}, {}
    for variant, model in models.items():
        steps[variant], optimizer = make_step(model, tokens)
        steps[variant]()  # warm-up; creates the optimizer state
        peaks[variant] = step_peak_bytes(steps[variant], device)
        held[variant] = held_bytes(model, optimizer)

    rounds = []  # per round: {"gemm": s, variant: s, ...}
    for _ in range(args.repeats):
        timings = {"gemm": gemm_timer()}
        for variant, step in steps.items():
            timings[variant] = time_call(step, device)
        rounds.append(timings)

    rows = []
    tokens_per_step = args.batch * seq_len
    flops = {variant: training_flops_per_token(variant, dims, seq_len)["total"] for variant in models}
    for variant in models:
        row = {
            "variant": variant,
            "label": VARIANT_LABELS[variant],
            "seq_len": seq_len,
            "step_s": median([r[variant] for r in rounds]),
            "step_s_all": [r[variant] for r in rounds],
            "tokens_per_s": tokens_per_step / median([r[variant] for r in rounds]),
            "step_peak_mib": peaks[variant] / MIB,
            "held_mib": held[variant] / MIB,
            "flops_per_token": flops[variant],
            "gemm_flops_per_s": gemm_flops() / median([r["gemm"] for r in rounds]),
            "mfu": median([flops[variant] * tokens_per_step / r[variant] * r["gemm"] / gemm_flops() for r in rounds]),
        }
        if variant != "lmdiff" and "lmdiff" in models:
            row["lmdiff_speed_ratio"] = median([r[variant] / r["lmdiff"] for r in rounds])
            # the ratio an LM-Diff step would reach if its matrix products ran at the full GEMM rate and
            # everything else were free: no implementation of the architecture can beat this on this machine
            lmdiff_floor = flops["lmdiff"] * tokens_per_step / gemm_flops()
            row["lmdiff_speed_ratio_ceiling"] = median([r[variant] / (lmdiff_floor * r["gemm"]) for r in rounds])
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    device, dtype = setup(args)
    dims = dims_from_args(args)

    load_before = load_average()
    models = {variant: build_lora_model(variant, dims, device, dtype).train() for variant in args.variants}
    gemm_timer = gemm_seconds(device, dtype)
    rows = [row for seq_len in args.seq_lens for row in measure_seq_len(models, seq_len, args, device, gemm_timer)]

    print(f"LoRA training step, {args.dtype} on {device}, batch {args.batch}, {dims}")
    print_table(
        rows,
        [
            ("label", "variant"),
            ("seq_len", "seq"),
            ("step_s", "step s"),
            ("tokens_per_s", "tokens/s"),
            ("lmdiff_speed_ratio", "LM-Diff speed x"),
            ("lmdiff_speed_ratio_ceiling", "x at 100% GEMM"),
            ("step_peak_mib", "step peak MiB"),
            ("held_mib", "held MiB"),
            ("mfu", "MFU"),
        ],
    )
    print(
        "\nLM-Diff speed x: LM-Diff tokens/s / this row's, median of the per-round ratios (same seq).\n"
        "x at 100% GEMM: the most LM-Diff speed x any LM-Diff implementation could reach here, its model FLOPs\n"
        "run at the measured GEMM rate with nothing else costing time (this row's step time / that floor).\n"
        f"{MEMORY_NOTE[device.type]}; held = parameters, buffers, grads and AdamW state.\n"
        "MFU = model training FLOPs/token (bench/flops.py) x tokens/s / GEMM rate, per round, median; GEMM rate\n"
        f"= one 4096^3 torch.mm in {args.dtype} (median {rows[0]['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s)."
    )
    print(f"1-minute load average before/after: {load_before} / {load_average()} (other work slows small ops most).")
    payload = {"load_average": {"before": load_before, "after": load_average()}, "rows": rows}
    print(f"wrote {write_json('train_step', args, device, payload)}")


if __name__ == "__main__":
    main()
