"""Where a LoRA training step spends its time: torch.profiler's operator table for one variant.

python -m bench.profile_step [--variant lmdiff] [--seq-len 1024] [--rows 30] [--trace trace.json]
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from .common import VARIANTS, add_common_args, build_lora_model, dims_from_args, setup
from .train_step import make_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--variant", choices=VARIANTS, default="lmdiff")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--trace", default=None, help="also write a Chrome trace here")
    args = parser.parse_args()
    device, dtype = setup(args)
    dims = dims_from_args(args)

    model = build_lora_model(args.variant, dims, device, dtype).train()
    tokens = torch.randint(3, dims.vocab, (1, args.seq_len), device=device)
    step, _ = make_step(model, tokens)
    step()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort_by, row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
