"""Trained tokens per second of `lmdiff-ft sft` on the real base against stock TRL on the same weights as a Llama.

    python -m bench.sft_throughput [--task tasks/nasa_qa.yaml] [--steps 3] [--repeats 3] [--quantizations nf4 none]
    python -m bench.sft_throughput --base tiny --steps 2 --repeats 1 --quantizations none   # seconds (the test)

Both sides fine-tune LoRA on the task's rows, template, batch size, gradient accumulation, max length, rank,
alpha, dropout, learning rate and optimizer:
  * lmdiff: the real command, `lmdiff-ft sft TASK quantization=Q train.max_steps=N eval.num_samples=0
    eval.train_samples=0 output_dir=TMP`, through `lmdiff_ft.cli.main`: the base converted to LM-Diff, the task's
    presets, lmdiff-ft's loader and trainer settings.
  * stock: the same weights as a plain `LlamaForCausalLM`, trained by a TRL script as TRL's docs write one:
    `from_pretrained` (bitsandbytes nf4 for 4-bit, else full precision), `SFTTrainer` with a `peft.LoraConfig` on
    q/k/v/o (and the MLP when the task's presets include it), TRL's defaults for the rest (gradient checkpointing
    on, ...). One exception: mixed precision follows the compute dtype lmdiff-ft picks (fp32 on a CPU, bf16 on a
    recent GPU): TRL's default is bf16 autocast everywhere, which on a CPU measures bf16 emulation instead.
Both run on the device lmdiff-ft picks (the GPU when torch sees one) and in the dtype it picks.

Timing is one hook, the same in both: transformers' `Trainer.training_step` counts each micro-batch's tokens
(trained: label != -100; total: attention mask) and `CallbackHandler.on_step_end` stamps the clock after every
optimizer step. The first optimizer step is warm-up; tokens/s = the tokens of the later steps / their time. Each
run is a fresh process (its own peak RSS, VmHWM; its own patches: lmdiff-ft patches TRL's LM head), and the rounds
interleave the runs (round k: lmdiff nf4, stock nf4, lmdiff none, stock none); the median over rounds is reported,
ratios are taken within a round.

`--base smollm2-135m` (default): lmdiff-ft's own converted SmolLM2-135M-Instruct; the stock side loads the same
GGUF file as a plain Llama, written once as fp32 safetensors to the lmdiff-ft cache. `--base tiny`: a small random
Llama at the tiny base's dims, which lmdiff-ft converts itself (`base.convert_from_llama`).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, Trainer
from transformers.trainer_callback import CallbackHandler

from lmdiff_ft.base.cache import cache_dir
from lmdiff_ft.base.loading import converted_llama_dir, default_device, resolve_base_path
from lmdiff_ft.outputs import atomic_output_dir
from lmdiff_ft.schema.load import load_task
from lmdiff_ft.schema.task import Task

from .common import MIB, REPO_ROOT, load_average, median, peak_rss, print_table, run_worker, write_json

DEFAULT_TASK = REPO_ROOT / "tasks" / "nasa_qa.yaml"
BASES = ("smollm2-135m", "tiny")
ARMS = ("lmdiff", "stock")
ARM_LABELS = {"lmdiff": "lmdiff-ft sft (LM-Diff)", "stock": "stock TRL (Llama)"}
QUANTIZATIONS = ("nf4", "none")
STOCK_ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
STOCK_MLP_TARGETS = ["gate_proj", "up_proj", "down_proj"]
TRL_COLUMNS = ("messages", "prompt", "completion", "text")  # prepare_rows adds a reference answer and a row number
MEDIAN_KEYS = ("trained_tokens_per_s", "total_tokens_per_s", "step_s", "peak_rss_mib")
SETUP_KEYS = ("trainable_params", "trainable_dtypes", "autocast", "recompute")
RATIO_KEYS = ("trained_tokens_per_s", "total_tokens_per_s")


# --- the bases --------------------------------------------------------------------------------------------


def save_llama(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, out: Path) -> Path:
    with atomic_output_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def smollm2_llama_dir() -> Path:
    """SmolLM2-135M-Instruct from the GGUF file lmdiff-ft converts, as a plain Llama in fp32 safetensors; built once.
    The weights go into a fresh model whose config lacks the GGUF's quantization_config, which would otherwise be
    saved with them and make `from_pretrained` treat the fp32 checkpoint as a GGUF one."""
    from lmdiff_ft.base.smollm2 import NAME, gguf_path, source_tag

    source = gguf_path()
    directory = cache_dir() / f"{NAME}-llama-{source_tag(source)}"
    if (directory / "config.json").is_file():
        return directory
    print(f"writing {NAME} as a plain Llama to {directory} (once)", flush=True)
    from_gguf = LlamaForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = from_gguf.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = LlamaForCausalLM(config)
    model.load_state_dict(from_gguf.state_dict())
    return save_llama(model, AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name), directory)


def tiny_llama_dir() -> Path:
    """A random Llama at the tiny base's dims with its tokenizer (seconds). Rebuilt identically on every run, so
    lmdiff-ft's conversion of it, cached by content, is reused."""
    from lmdiff_ft.base.tiny import TINY_DIMS, build_tokenizer, corpus_lines

    tokenizer = build_tokenizer(corpus_lines())
    config = LlamaConfig(
        **TINY_DIMS,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return save_llama(model, tokenizer, cache_dir() / "bench-tiny-llama")


def prepare_bases(base: str) -> tuple[Path, list[str]]:
    """Build both sides' bases before the first timed run. Returns the plain-Llama directory the stock side loads
    and the task overrides that point lmdiff-ft at the same weights."""
    if base == "tiny":
        llama_dir = tiny_llama_dir()
        converted_llama_dir(llama_dir)
        return llama_dir, [f"base.path={llama_dir}", "base.convert_from_llama=true"]
    resolve_base_path(base)
    return smollm2_llama_dir(), [f"base.path={base}"]


# --- one run, in a worker process -------------------------------------------------------------------------


class StepClock:
    """The end time and the token counts of every optimizer step, recorded identically for both sides by patching
    transformers' Trainer: `training_step` runs once per micro-batch, `on_step_end` once per optimizer step."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.trained: list[int] = []  # tokens with a label (label != -100), per optimizer step
        self.total: list[int] = []  # tokens that are not padding, per optimizer step
        self.setup: dict = {}
        self._trained = self._total = 0

    def install(self) -> None:
        training_step, on_step_end = Trainer.training_step, CallbackHandler.on_step_end

        def counted_training_step(trainer: Trainer, model: torch.nn.Module, inputs: dict, *args, **kwargs):
            self.count(trainer, model, inputs)
            return training_step(trainer, model, inputs, *args, **kwargs)

        def stamped_on_step_end(handler: CallbackHandler, *args, **kwargs):
            self.stamp()
            return on_step_end(handler, *args, **kwargs)

        Trainer.training_step = counted_training_step
        CallbackHandler.on_step_end = stamped_on_step_end

    def count(self, trainer: Trainer, model: torch.nn.Module, inputs: dict) -> None:
        if not self.setup:
            self.setup = describe_training(trainer, model)
        self._trained += int((inputs["labels"] != -100).sum())
        mask = inputs.get("attention_mask")
        self._total += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()

    def stamp(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.trained.append(self._trained)
        self.total.append(self._total)
        self._trained = self._total = 0

    def summary(self) -> dict:
        """Tokens/s over every optimizer step but the first (warm-up)."""
        if len(self.ends) < 2:
            raise RuntimeError(
                f"{len(self.ends)} optimizer steps recorded; at least 2 are needed (the first is warm-up)"
            )
        seconds = self.ends[-1] - self.ends[0]
        trained, total = sum(self.trained[1:]), sum(self.total[1:])
        return {
            "steps": len(self.ends),
            "timed_s": seconds,
            "step_s": seconds / (len(self.ends) - 1),
            "trained_tokens": trained,
            "total_tokens": total,
            "trained_tokens_per_s": trained / seconds,
            "total_tokens_per_s": total / seconds,
            "trained_tokens_per_step": self.trained,
            **self.setup,
        }


def describe_training(trainer: Trainer, model: torch.nn.Module) -> dict:
    """What each side trains and how, as its trainer sees it at the first micro-batch."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    args = trainer.args
    return {
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_dtypes": ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in trainable})),
        "autocast": "bf16" if args.bf16 else "fp16" if args.fp16 else "none",
        # transformers' own test (PreTrainedModel.is_activation_checkpointing), through any wrapper
        "recompute": any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()),
    }


def train_lmdiff(task_file: Path, overrides: list[str], quantization: str, steps: int, out: Path) -> None:
    """The real command, through the CLI's entry point."""
    from lmdiff_ft.cli import main as lmdiff_ft

    argv = ["sft", str(task_file), *overrides, f"quantization={quantization}", f"train.max_steps={steps}"]
    argv += ["eval.num_samples=0", "eval.train_samples=0", f"output_dir={out}"]
    if (status := lmdiff_ft(argv)) != 0:
        raise SystemExit(f"lmdiff-ft {' '.join(argv)}: exit status {status}")


def train_stock(task: Task, llama_dir: Path, quantization: str, steps: int, out: Path) -> None:
    """A plain TRL script on the Llama, with the task's settings where it has them."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from lmdiff_ft.base.loading import choose_dtype
    from lmdiff_ft.data.rows import prepare_rows

    device = default_device()
    dtype = choose_dtype(task.dtype, device)  # lmdiff-ft's compute dtype: fp32 on a CPU
    rows, _ = prepare_rows(task)
    quantization_config = None
    if quantization == "nf4":
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForCausalLM.from_pretrained(
        llama_dir, dtype=dtype, quantization_config=quantization_config, device_map={"": device}
    )
    t, a = task.train, task.adapter
    targets = STOCK_ATTENTION_TARGETS + (STOCK_MLP_TARGETS if {"mlp", "all"} & set(a.presets) else [])
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(out),
            max_steps=steps,
            per_device_train_batch_size=t.batch_size,
            gradient_accumulation_steps=t.grad_accum,
            max_length=t.max_length,
            learning_rate=t.lr,
            optim=t.optim,
            seed=t.seed,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
        ),
        train_dataset=rows.select_columns([c for c in rows.column_names if c in TRL_COLUMNS]),
        processing_class=AutoTokenizer.from_pretrained(llama_dir),
        peft_config=LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=targets),
    )
    trainer.train()


def worker(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    clock = StepClock()
    clock.install()
    with tempfile.TemporaryDirectory(prefix="sft-throughput-") as out:
        if args.worker == "lmdiff":
            train_lmdiff(args.task, args.overrides, args.quantization, args.steps, Path(out) / "run")
        else:
            task = load_task(args.task, args.overrides)
            train_stock(task, args.llama_dir, args.quantization, args.steps, Path(out))
    result = {"arm": args.worker, "quantization": args.quantization, **clock.summary()}
    result["peak_rss_mib"] = peak_rss() / MIB
    if torch.cuda.is_available():
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / MIB
    result["worker_s"] = time.perf_counter() - started
    return result


# --- the interleaved rounds -------------------------------------------------------------------------------


def summarize(runs: list[dict], quantizations: list[str]) -> tuple[list[dict], list[dict]]:
    """One row per side and quantization (medians over rounds), and lmdiff ÷ stock per quantization (the median
    of the ratios within each round)."""
    rows, ratios = [], []
    for quantization in quantizations:
        by_arm = {arm: [r for r in runs if r["arm"] == arm and r["quantization"] == quantization] for arm in ARMS}
        for arm, arm_runs in by_arm.items():
            row = {"arm": arm, "label": ARM_LABELS[arm], "quantization": quantization}
            row.update({key: median([r[key] for r in arm_runs]) for key in MEDIAN_KEYS})
            row.update({key: arm_runs[0][key] for key in SETUP_KEYS})
            rows.append(row)
        pairs = list(zip(by_arm["lmdiff"], by_arm["stock"], strict=True))  # both in round order
        ratio = {"quantization": quantization}
        ratio.update({key: median([ours[key] / stock[key] for ours, stock in pairs]) for key in RATIO_KEYS})
        ratios.append(ratio)
    return rows, ratios


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", choices=BASES, default=BASES[0])
    parser.add_argument("--task", type=Path, default=DEFAULT_TASK, help="task file (default tasks/nasa_qa.yaml)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run; the first is warm-up")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--quantizations", nargs="+", choices=QUANTIZATIONS, default=list(QUANTIZATIONS))
    parser.add_argument("--overrides", nargs="*", default=[], help="task overrides for both sides: train.batch_size=4")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/sft_throughput.json)")
    parser.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--quantization", choices=QUANTIZATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--llama-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps: at least 2 (the first optimizer step is warm-up)")
    if args.worker:
        print(json.dumps(worker(args)))
        return

    task_file = args.task.resolve()
    llama_dir, base_overrides = prepare_bases(args.base)
    overrides = [*base_overrides, *args.overrides]
    task = load_task(task_file, overrides)
    load_before = load_average()
    runs = []
    for round_index in range(args.repeats):
        for quantization in args.quantizations:
            for arm in ARMS:
                flags = ["--worker", arm, "--quantization", quantization, "--task", str(task_file)]
                flags += ["--steps", str(args.steps), "--llama-dir", str(llama_dir), "--overrides", *overrides]
                what = f"{arm} ({quantization}), round {round_index + 1}"
                runs.append({"round": round_index, **run_worker("bench.sft_throughput", flags, what)})
                print(f"{what}: {runs[-1]['trained_tokens_per_s']:.1f} trained tokens/s", flush=True)
    load_after = load_average()
    rows, ratios = summarize(runs, args.quantizations)

    t, a = task.train, task.adapter
    print(
        f"\nLoRA SFT on {args.base}, {task_file.name}: batch {t.batch_size} x {t.grad_accum} accumulation, max length "
        f"{t.max_length}, r={a.r}, {t.optim}; {args.steps} optimizer steps per run (the first is warm-up), "
        f"median of {args.repeats} rounds, on {default_device()}"
    )
    print_table(
        rows,
        [
            ("label", "trainer"),
            ("quantization", "quant."),
            ("trained_tokens_per_s", "trained tok/s"),
            ("total_tokens_per_s", "total tok/s"),
            ("step_s", "s/step"),
            ("peak_rss_mib", "peak RSS MiB"),
            ("trainable_params", "trainable"),
            ("trainable_dtypes", "LoRA dtype"),
            ("autocast", "autocast"),
            ("recompute", "grad. ckpt"),
        ],
    )
    for ratio in ratios:
        print(
            f"lmdiff-ft / stock TRL, {ratio['quantization']}: trained tokens/s x{ratio['trained_tokens_per_s']:.2f}, "
            f"total tokens/s x{ratio['total_tokens_per_s']:.2f} (median of per-round ratios)"
        )
    print(f"1-minute load average before/after: {load_before} / {load_after}")
    resolved = task.to_dict()
    payload = {
        "load_average": {"before": load_before, "after": load_after},
        "task": {
            "file": str(task_file),
            "overrides": overrides,
            "train": resolved["train"],
            "adapter": resolved["adapter"],
        },
        "stock_llama_dir": str(llama_dir),
        "rows": rows,
        "ratios": ratios,
        "runs": runs,
    }
    print(f"wrote {write_json('sft_throughput', args, default_device(), payload)}")


if __name__ == "__main__":
    main()
