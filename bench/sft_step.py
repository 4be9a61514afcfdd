"""Where one optimizer step of `lmdiff-ft sft` on the real base spends its time, today and as it was before the
speed work, on the task's own rows.

    python -m bench.sft_step                      # tasks/nasa_qa.yaml as shipped: nf4, its batch and accumulation
    python -m bench.sft_step --baseline           # the same rows with the settings of before the speed work
    python -m bench.sft_step --task T --overrides quantization=none

One optimizer step = `grad_accum` micro-batches of the task's first training rows, each through TRL's own
`compute_loss` and a backward pass, as `SFTTrainer` runs them (the optimizer update of a LoRA adapter is
negligible and left out). A warm-up step, then `--repeats` timed steps (median), then one step under
torch.profiler, whose operators are grouped: matrix products (mm/addmm/bmm and bitsandbytes' 4-bit GEMM), attention
(SDPA forward and backward), nf4 dequantisation, and everything else. Peak RSS is the process's VmHWM.

How near the step's matrix products run to what this machine gives: their FLOPs (counted from the profiled
operators' shapes) and the rate they ran at, beside the time the same products take as plain `torch.mm` calls,
each shape timed on its own inputs (median of 3) times how often the step ran it.

`--baseline` undoes each change measured in the README, all at once: gradient checkpointing on (TRL's default
and ours before `auto`), one micro-batch of 16 rows, TRL's LM head projecting every position on CPU (before
`integrations/trl.py`), fc_gamma computed although it is exactly zero.
"""

import argparse
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import torch
from rich.console import Console
from torch.profiler import ProfilerActivity, profile
from trl import SFTTrainer
from trl.kernels import chunked_logprob
from trl.trainer import utils as trl_utils

from lmdiff_ft.data.rows import prepare_rows
from lmdiff_ft.model.modeling_lmdiff import LmDiffAdaptiveRMSNorm
from lmdiff_ft.recipes import common
from lmdiff_ft.recipes.common import load_model, trainer_construction, training_arguments
from lmdiff_ft.schema.load import load_task

from .common import REPO_ROOT, load_average, peak_rss, write_json

DEFAULT_TASK = REPO_ROOT / "tasks" / "nasa_qa.yaml"
BASELINE_OVERRIDES = ["train.gradient_checkpointing=true", "train.batch_size=16", "train.grad_accum=1"]
GROUPS = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::addmm_", "bitsandbytes::gemm_4bit"),
    "attention (SDPA)": ("aten::_scaled_dot_product_flash_attention_for_cpu", "flash_attention"),
    "nf4 dequantisation": ("bitsandbytes::dequantize_4bit", "bitsandbytes::dequantize_blockwise"),
}


@contextmanager
def code_paths(baseline: bool) -> Iterator[None]:
    """Today's code, or (baseline) the code paths of before the speed work (see the module docstring)."""
    with ExitStack() as patches:
        if baseline:
            patches.enter_context(mock.patch.object(common, "score_labelled_positions_only", lambda: None))
            patches.enter_context(mock.patch.object(trl_utils, "_use_triton", chunked_logprob._use_triton))
            patches.enter_context(mock.patch.object(LmDiffAdaptiveRMSNorm, "_gamma_is_frozen_zero", lambda self: False))
        yield


def build_trainer(task_path: Path, overrides: list[str]) -> tuple[SFTTrainer, int]:
    task = load_task(task_path, overrides)
    train_rows, eval_rows = prepare_rows(task)
    base, model, checkpointing = load_model(task, Console())
    out = Path(tempfile.mkdtemp(prefix="sft-step-"))
    with trainer_construction(model, out):
        trainer = SFTTrainer(
            model=model,
            args=training_arguments(task, out, base, checkpointing, packing=task.train.packing),
            train_dataset=train_rows,
            eval_dataset=eval_rows,
            processing_class=base.tokenizer,
        )
    trainer.model.train()
    if checkpointing:  # what Trainer.train() does before the first step
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return trainer, task.train.grad_accum


def operator_groups(prof) -> dict[str, float]:
    """Self CPU seconds per operator group, and the total."""
    seconds = {name: 0.0 for name in GROUPS} | {"other": 0.0}
    for event in prof.key_averages():
        group = next((g for g, keys in GROUPS.items() if any(k in event.key for k in keys)), "other")
        seconds[group] += event.self_cpu_time_total / 1e6
    seconds["total"] = sum(seconds.values())
    return seconds


Shape = tuple[int, int, int, int]  # (batch, rows, inner, columns) of a matrix product


def matrix_products(prof) -> Counter[Shape]:
    """How many matrix products of each shape the profiled step ran (aten mm/bmm/addmm, from their input shapes)."""
    shapes: Counter[Shape] = Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        inputs = [shape for shape in event.input_shapes if len(shape) >= 2]
        if event.key in ("aten::mm", "aten::bmm") and len(inputs) == 2:
            first, second = inputs
        elif event.key in ("aten::addmm", "aten::addmm_") and len(inputs) >= 2:
            first, second = inputs[-2:]
        else:
            continue
        batch = first[0] if len(first) == 3 else 1
        shapes[batch, first[-2], first[-1], second[-1]] += event.count
    return shapes


def flops_of(shapes: Counter[Shape]) -> float:
    return sum(count * 2.0 * batch * rows * inner * columns for (batch, rows, inner, columns), count in shapes.items())


def plain_product_seconds(shapes: Counter[Shape], dtype: torch.dtype) -> float:
    """The step's matrix products as plain calls: each shape timed as one `torch.mm` (`bmm`) on its own inputs (median
    of 3), times how often the step ran it."""
    seconds = 0.0
    for (batch, rows, inner, columns), count in shapes.items():
        product = torch.mm if batch == 1 else torch.bmm  # as the step ran them (bf16 mm and bmm take other kernels)
        left = torch.randn(batch, rows, inner, dtype=dtype).squeeze(0)
        right = torch.randn(batch, inner, columns, dtype=dtype).squeeze(0)
        product(left, right)  # warm-up
        times = []
        for _ in range(3):
            started = time.perf_counter()
            product(left, right)
            times.append(time.perf_counter() - started)
        seconds += count * statistics.median(times)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", type=Path, default=DEFAULT_TASK)
    parser.add_argument("--overrides", nargs="*", default=[])
    parser.add_argument("--baseline", action="store_true", help="the settings and code paths of before")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    overrides = (BASELINE_OVERRIDES if args.baseline else []) + list(args.overrides)
    load_before = load_average()
    with code_paths(args.baseline):
        measure(args, overrides, load_before)


def measure(args: argparse.Namespace, overrides: list[str], load_before: float | None) -> None:
    trainer, accumulation = build_trainer(args.task, overrides)
    batches = trainer.get_train_dataloader()
    micro_batches = [batch for _, batch in zip(range(accumulation), batches, strict=False)]
    tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
    trained = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)

    def step() -> float:
        started = time.perf_counter()
        for batch in micro_batches:
            loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=trained)
            loss.backward()
        trainer.model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    step()  # warm-up
    seconds = statistics.median(step() for _ in range(args.repeats))
    peak = peak_rss()  # before the profiler, whose records take memory of their own
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    groups = operator_groups(prof)
    shapes = matrix_products(prof)
    flops = flops_of(shapes)
    plain_seconds = plain_product_seconds(shapes, trainer.model.dtype)
    result = {
        "task": str(args.task),
        "overrides": overrides,
        "baseline": args.baseline,
        "rows": sum(len(b["input_ids"]) for b in micro_batches),
        "micro_batches": accumulation,
        "padded_tokens": sum(b["input_ids"].numel() for b in micro_batches),
        "tokens": tokens,
        "trained_tokens": trained,
        "step_s": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "peak_rss_gib": round(peak / 2**30, 2),
        "profile_s": {name: round(value, 4) for name, value in groups.items()},
        "matrix_products": {
            "flops": int(flops),
            "shapes": len(shapes),
            "gflop_per_s_in_step": round(flops / groups["matrix products"] / 1e9, 1),
            "seconds_as_plain_products": plain_seconds,
            "gflop_per_s_as_plain_products": round(flops / plain_seconds / 1e9, 1),
        },
        "load_average": [load_before, load_average()],
        "threads": torch.get_num_threads(),
    }
    print(
        f"{'baseline' if args.baseline else 'current'}: {result['rows']} rows in {accumulation} micro-batch(es), "
        f"{tokens} tokens ({result['padded_tokens']} with padding, {trained} trained): step {seconds:.1f} s, "
        f"{result['tokens_per_s']} tokens/s, peak RSS {result['peak_rss_gib']} GiB"
    )
    for name, value in groups.items():
        print(f"  {name:20s} {value:6.2f} s  {100 * value / groups['total']:5.1f}%")
    products = result["matrix_products"]
    print(
        f"matrix products: {flops / 1e12:.3f} TFLOP in {len(shapes)} shapes, {products['gflop_per_s_in_step']} GFLOP/s "
        f"in the step; as plain torch.mm calls of the same shapes {plain_seconds:.1f} s "
        f"({products['gflop_per_s_as_plain_products']} GFLOP/s)"
    )
    write_json("sft_step_baseline" if args.baseline else "sft_step", args, trainer.model.device, result)


if __name__ == "__main__":
    main()
