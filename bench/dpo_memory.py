"""Peak process memory and step time of DPO vs SFT on the same base, quantization and sequence length.

    python -m bench.dpo_memory [--layers 2] [--quantization nf4] [--seq-len 256]
    python -m bench.dpo_memory --checkpoint DIR    # train on DIR; built there at the dims flags if missing

Each trainer runs in a fresh process: load the base, attach the presets diff_attn, lambda and se_gate, build
TRL's trainer exactly as `lmdiff-ft sft` / `lmdiff-ft dpo` do, and train two steps on rows of `--seq-len` tokens
(a DPO row is a prompt with two answers of that total length, so it costs two sequences). DPO's
reference is the frozen copy of the adapter on the same base, so no second model is loaded. Peak is
the process's VmHWM. The base is a random LM-Diff at the dims flags (default: TinyLlama's layer shape,
2 layers to fit the time), written by bench/qlora_memory.py's builder to runs/bench/ on first use (the
checkpoint `python -m bench.qlora_memory --layers 2` uses); the tokenizer is the tiny base's.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from lmdiff_ft.base.loading import default_device

from .common import add_dims_args, dims_from_args, peak_rss, run_worker, write_json
from .qlora_memory import build_checkpoint, checkpoint_dir

TRAINERS = ("sft", "dpo")
PRESETS = ("diff_attn", "lambda", "se_gate")  # what the committed results were measured with


def rows(kind: str, seq_len: int, n: int = 8) -> list[dict]:
    """~seq_len tokens per example with the tiny tokenizer (one word ≈ one token for these words)."""
    words = ("apollo mars voyager orbit rocket lunar probe saturn " * (seq_len // 8 + 1)).split()
    prompt, answer = " ".join(words[: seq_len // 2]), " ".join(words[: seq_len // 2])
    if kind == "sft":
        return [{"prompt": prompt, "completion": answer} for _ in range(n)]
    return [{"prompt": prompt, "chosen": answer, "rejected": answer + " wrong"} for _ in range(n)]


def worker(kind: str, checkpoint: str, quantization: str, seq_len: int) -> dict:
    import tempfile

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from lmdiff_ft.adapters.presets import attach_adapters
    from lmdiff_ft.base.loading import load_base, load_tokenizer
    from lmdiff_ft.base.tiny import tiny_base_dir
    from lmdiff_ft.integrations.trl import trainable_parameters_frozen
    from lmdiff_ft.schema.task import AdapterConfig

    started = time.perf_counter()
    base = load_base(checkpoint, quantization=quantization, with_tokenizer=False)
    load_s = time.perf_counter() - started
    tokenizer = load_tokenizer(tiny_base_dir())
    adapter = AdapterConfig(presets=list(PRESETS), r=16, alpha=32)
    model = attach_adapters(base.model, adapter, gradient_checkpointing=True)
    common = dict(
        output_dir=tempfile.mkdtemp(),
        max_steps=2,
        per_device_train_batch_size=1,
        max_length=seq_len + 8,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        report_to=[],
        save_strategy="no",
        bf16=base.dtype == torch.bfloat16,
        use_cpu=base.model.device.type == "cpu",
        logging_steps=1,
        learning_rate=1e-4,
        dataloader_num_workers=0,
    )
    data = Dataset.from_list(rows(kind, seq_len))
    with trainable_parameters_frozen(model):
        if kind == "sft":
            trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=data, processing_class=tokenizer)
        else:
            trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=data, processing_class=tokenizer)
    started = time.perf_counter()
    trainer.train()
    step_s = (time.perf_counter() - started) / 2
    return {
        "trainer": kind,
        "load_s": round(load_s, 1),
        "step_s": round(step_s, 1),
        "peak_rss_gb": round(peak_rss() / 1e9, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dims_args(parser)
    parser.add_argument(
        "--checkpoint", type=Path, help="LM-Diff checkpoint dir (default: runs/bench/ by dims; built if missing)"
    )
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "fp4", "int8", "none"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/dpo_memory.json)")
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, str(args.checkpoint), args.quantization, args.seq_len)))
        return

    dims = dims_from_args(args)
    checkpoint = (args.checkpoint or checkpoint_dir(dims)).resolve()
    if not (checkpoint / "config.json").is_file():
        print(f"writing a random LM-Diff checkpoint ({dims}) to {checkpoint}")
        build_checkpoint(checkpoint, dims)
    results = []
    for kind in TRAINERS:
        flags = ["--worker", kind, "--checkpoint", str(checkpoint), "--quantization", args.quantization]
        results.append(run_worker("bench.dpo_memory", [*flags, "--seq-len", str(args.seq_len)], f"{kind} worker"))
        print(results[-1], flush=True)
    ratio = results[1]["peak_rss_gb"] / results[0]["peak_rss_gb"]
    summary = {
        "command": "python -m bench.dpo_memory",
        "checkpoint": str(checkpoint),
        "quantization": args.quantization,
        "seq_len": args.seq_len,
        "rows": results,
        "dpo_over_sft_peak": round(ratio, 3),
    }
    path = write_json("dpo_memory", args, default_device(), summary)
    print(f"DPO peak / SFT peak = {ratio:.2f}; wrote {path}")


if __name__ == "__main__":
    main()
