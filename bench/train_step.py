"""Tokens/s, peak memory and MFU of one LoRA training step (forward + backward + AdamW step), for our
LM-Diff (every component on, and differential attention alone), transformers' DiffLlama and Llama (sdpa)
with the same dims, and the naive LM-Diff reference, side by side.

    python -m bench.train_step [--seq-lens 256 1024 2048] [--variants lmdiff lmdiff-attn difflama llama naive]
    python -m bench.train_step --device cuda --dtype bfloat16

Each round times one GEMM of the step's own shape (`common.gemm_shape`) and one step of every variant,
back to back; ratios and MFU are taken within a round (so a burst of load elsewhere on the machine hits
both sides of a ratio) and the median over rounds is reported.
"""

import argparse
from collections.abc import Callable

import torch

from .common import (
    GEMM_MAX_TOKENS,
    MEMORY_NOTE,
    MIB,
    VARIANT_LABELS,
    VARIANTS,
    add_common_args,
    build_lora_model,
    dims_from_args,
    gemm_flops,
    gemm_seconds,
    gemm_shape,
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

# (numerator, denominator) pairs whose tokens/s ratio is printed and saved: the whole LM-Diff against each yardstick,
# and LM-Diff's differential attention alone against DiffLlama's, the same architecture implemented twice
SPEED_RATIOS = (
    ("lmdiff", "llama"),
    ("lmdiff", "difflama"),
    ("lmdiff-attn", "difflama"),
    ("lmdiff", "lmdiff-attn"),
    ("lmdiff", "naive"),
)


def make_step(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """One training step on `tokens` (labels = inputs), and its AdamW over the trainable weights. The fused
    AdamW is one kernel for all LoRA tensors, so the optimizer does not weigh on LM-Diff's twice as many."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def speed_ratio(rounds: list[dict], variant: str, other: str) -> float:
    """`variant`'s tokens/s ÷ `other`'s: the median over rounds of the ratio within each round."""
    return median([r[other] / r[variant] for r in rounds])


def measure_seq_len(
    models: dict[str, torch.nn.Module], seq_len: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[list[dict], list[dict]]:
    """The rows of one sequence length, and the SPEED_RATIOS among the variants measured."""
    dims = dims_from_args(args)
    tokens = torch.randint(3, dims.vocab, (args.batch, seq_len), device=device)
    tokens_per_step = args.batch * seq_len
    shape = gemm_shape(dims, tokens_per_step)
    gemm_timer = gemm_seconds(device, dtype, shape)
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
            "gemm_shape": shape,
            "gemm_flops_per_s": gemm_flops(shape) / median([r["gemm"] for r in rounds]),
            "mfu": median(
                [flops[variant] * tokens_per_step / r[variant] * r["gemm"] / gemm_flops(shape) for r in rounds]
            ),
        }
        if variant != "lmdiff" and "lmdiff" in models:
            row["lmdiff_speed_ratio"] = speed_ratio(rounds, "lmdiff", variant)
            # the ratio an LM-Diff step would reach if its matrix products ran at the full GEMM rate and
            # everything else were free: no implementation of the architecture can beat this on this machine
            lmdiff_floor = flops["lmdiff"] * tokens_per_step / gemm_flops(shape)
            row["lmdiff_speed_ratio_ceiling"] = median([r[variant] / (lmdiff_floor * r["gemm"]) for r in rounds])
        rows.append(row)
    ratios = [
        {"seq_len": seq_len, "variant": variant, "over": other, "ratio": speed_ratio(rounds, variant, other)}
        for variant, other in SPEED_RATIOS
        if variant in models and other in models
    ]
    return rows, ratios


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    dims = dims_from_args(args)

    load_before = load_average()
    models = {variant: build_lora_model(variant, dims, device, dtype).train() for variant in args.variants}
    rows, ratios = [], []
    for seq_len in args.seq_lens:
        seq_rows, seq_ratios = measure_seq_len(models, seq_len, args, device, dtype)
        rows += seq_rows
        ratios += seq_ratios

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
        f"= one torch.mm in {args.dtype} of the step's MLP up projection (tokens x hidden x intermediate, at most\n"
        f"{GEMM_MAX_TOKENS} rows), median:"
    )
    for row in {row["seq_len"]: row for row in rows}.values():  # one probe per sequence length
        shape = " x ".join(map(str, row["gemm_shape"]))
        print(f"  seq {row['seq_len']}: {shape}, {row['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s")
    if ratios:
        print("\ntokens/s ratios (median of per-round ratios):")
        print_table(
            [{**r, "pair": f"{VARIANT_LABELS[r['variant']]} / {VARIANT_LABELS[r['over']]}"} for r in ratios],
            [("pair", "ratio of tokens/s"), ("seq_len", "seq"), ("ratio", "x")],
        )
    print(f"1-minute load average before/after: {load_before} / {load_average()} (other work slows small ops most).")
    payload = {"load_average": {"before": load_before, "after": load_average()}, "rows": rows, "ratios": ratios}
    print(f"wrote {write_json('train_step', args, device, payload)}")


if __name__ == "__main__":
    main()
