"""Training recipes: supervised fine-tuning through TRL's SFTTrainer, as a plain sequence of steps.

1. check the output directory (fresh, or a run to resume)
2. load and check the data           (fails on a bad row before any model is loaded)
3. load the base and attach adapters (quantized as the task says)
4. build the trainer                 (TRL tokenizes and masks here; we check and preview its labels)
5. evaluate before training
6. train                              (progress bar, TensorBoard logs, checkpoints)
7. evaluate after training
8. publish the run                    (adapter, tokenizer, metrics, card, curve; adapter_config.json last)
"""

import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import get_int_from_env
from datasets import Dataset
from rich.console import Console
from transformers import set_seed
from transformers.integrations.integration_utils import default_logdir
from trl import SFTConfig, SFTTrainer

from .adapters import attach_adapters, base_info, load_adapter, write_base_info
from .data import ROW_COLUMN, load_splits, source_name, to_sft_rows
from .errors import UserError
from .evaluate import generation_metrics, loss_metrics
from .integrations.trl import score_labelled_positions_only
from .loading import LoadedBase, default_device, load_base
from .outputs import publish_run
from .report import model_card, plot_loss_curve, print_label_preview, print_metrics_table, write_json
from .tasks import Task

BEFORE_FILE = "metrics_before.json"  # written at the start of a fresh run, read back on --resume


def is_main_process() -> bool:
    """Rank 0 of a distributed run (torchrun/accelerate set RANK; mpirun sets its own), or a single process."""
    return get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"], 0) == 0


def check_distributed_setup() -> None:
    """Refuse FSDP1 before any work: the evaluation before/after training calls the model outside FSDP1's
    forward, where its flattened, sharded parameters are unusable. FSDP2 (configs/accelerate/fsdp.yaml) gathers
    them in every module's own forward, so evaluation and generation work unchanged."""
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and os.environ.get("FSDP_VERSION", "1") == "1":
        raise UserError("FSDP1 is not supported: set `fsdp_version: 2` in the accelerate config (configs/accelerate/)")


def is_complete_checkpoint(directory: Path) -> bool:
    """The Trainer writes trainer_state.json last, so a checkpoint cut short by a kill lacks a readable one."""
    try:
        json.loads((directory / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def checkpoints(out: Path) -> list[Path]:
    """checkpoint-N directories, newest first."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def run_directory(task: Task, resume: bool | str | None) -> tuple[Path, str | None]:
    """The output dir and the checkpoint to resume from. A finished run is never silently overwritten, an
    interrupted one is only continued when asked, and a checkpoint cut short by the interruption is skipped."""
    out = Path(task.output_dir)
    if (out / "adapter_config.json").is_file():
        raise UserError(f"{out}: holds a finished run (adapter_config.json); delete it or set output_dir")
    found = checkpoints(out)
    if resume is None or resume is False:
        if found:
            raise UserError(
                f"{out}: holds an interrupted run ({found[0].name}); continue it with --resume or delete it"
            )
        return out, None
    if resume is True:
        complete = [c for c in found if is_complete_checkpoint(c)]
        if not complete:
            raise UserError(f"{out}: no complete checkpoint-N to resume from")
        return out, str(complete[0])
    checkpoint = Path(resume)
    if not is_complete_checkpoint(checkpoint):
        raise UserError(f"{checkpoint}: not a complete checkpoint directory (no readable trainer_state.json)")
    return out, str(checkpoint)


def start_run(
    task: Task, resume: bool | str | None, console: Console | None, dry_run: bool = False
) -> tuple[Console, Path, str | None]:
    """What every training command does first: one console (quiet on all but the main process under
    accelerate launch), a checked distributed setup, the output dir and checkpoint, the seed. A dry run
    writes nothing, so whatever the output dir holds does not stop it."""
    console = console or Console(quiet=not is_main_process())
    check_distributed_setup()
    out, checkpoint = (Path(task.output_dir), None) if dry_run else run_directory(task, resume)
    set_seed(task.train.seed)
    return console, out, checkpoint


def prepare_rows(task: Task) -> tuple[Dataset, Dataset]:
    """TRL-ready train/eval rows; each keeps its source row number for error messages."""
    train_raw, eval_raw = load_splits(task)
    rows = []
    for raw, role in ((train_raw, "train"), (eval_raw, "eval")):
        converted = to_sft_rows(raw, task, source_name(task, role))
        rows.append(converted.add_column(ROW_COLUMN, raw[ROW_COLUMN]))
    return rows[0], rows[1]


def keep_4bit_layout_trainable(model: torch.nn.Module) -> None:
    """bitsandbytes repacks a CPU 4-bit weight into an inference-only layout the first time it runs in eval
    mode without gradients (as evaluation before training does), and training on it afterwards fails.
    Training runs keep the standard layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# What one micro-batch keeps for the backward pass without recomputation, per token and decoder layer, in
# values per unit of hidden size: measured 116 KB per token and layer for SmolLM2-135M as LM-Diff (hidden 576,
# fp32, default presets; peak RSS at 4 x 147 and 16 x 147 tokens per micro-batch).
ACTIVATION_VALUES_PER_HIDDEN_UNIT = 50
ACTIVATION_MEMORY_SHARE = 0.5  # recompute when one micro-batch's activations would take more of what is free


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil  # accelerate's dependency

    return psutil.virtual_memory().available


def use_gradient_checkpointing(task: Task, base: LoadedBase, sequences_per_row: int = 1) -> tuple[bool, str]:
    """`train.gradient_checkpointing: auto` recomputes activations only when memory needs it: when the largest
    micro-batch's activations (batch_size x max_length tokens, twice that for DPO's chosen + rejected) would take
    more than half of the free memory of the device. Recomputation costs a third more compute per step."""
    setting = task.train.gradient_checkpointing
    if setting != "auto":
        return setting, "set in the task"
    config = base.model.config
    tokens = task.train.batch_size * task.train.max_length * sequences_per_row
    value_bytes = torch.finfo(base.dtype).bits // 8
    needed = tokens * config.num_hidden_layers * ACTIVATION_VALUES_PER_HIDDEN_UNIT * config.hidden_size * value_bytes
    free = available_memory(base.model.device)
    on = needed > ACTIVATION_MEMORY_SHARE * free
    return on, f"auto: activations up to {needed / 2**30:.1f} GiB per micro-batch, {free / 2**30:.1f} GiB free"


def model_with_adapters(base: LoadedBase, task: Task, gradient_checkpointing: bool) -> torch.nn.Module:
    """A fresh adapter from the task's presets, or the task's `init_adapter` continued (trainable)."""
    keep_4bit_layout_trainable(base.model)
    a = task.adapter
    if a.init_adapter:
        model = load_adapter(base.model, a.init_adapter, base.fingerprint, is_trainable=True)
        if gradient_checkpointing:
            model.enable_input_require_grads()
        return model
    return attach_adapters(
        base.model,
        a.presets,
        a.layers,
        gradient_checkpointing=gradient_checkpointing,
        r=a.r,
        alpha=a.alpha,
        dropout=a.dropout,
        dora=a.dora,
        rslora=a.rslora,
    )


def training_arguments(
    task: Task, out: Path, base: LoadedBase, gradient_checkpointing: bool, config_class=SFTConfig, **extra
):
    """The task's `train` section, 1:1, as TRL/transformers arguments."""
    t = task.train
    return config_class(
        output_dir=str(out),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        max_length=t.max_length,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        activation_checkpointing=gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        optim=t.optim,
        bf16=base.dtype == torch.bfloat16,
        fp16=base.dtype == torch.float16,
        report_to=["tensorboard"],
        dataloader_num_workers=0,
        # train where the base was loaded. On a machine without GPUs accelerate starts a (gloo) process group only
        # for a CPU run: without this, `accelerate launch --multi_gpu`/torchrun ranks would each train on all data
        use_cpu=default_device().type == "cpu",
        **extra,
    )


def packed_examples(prepared: Dataset) -> Iterator[dict]:
    """The examples inside TRL's packed rows, cut apart at their `seq_lengths`; unpacked rows as they are."""
    for row in prepared:
        if "seq_lengths" not in row:
            yield row
            continue
        start = 0
        for length in row["seq_lengths"]:
            yield {key: row[key][start : start + length] for key in ("input_ids", "labels")}
            start += length


def check_trained_tokens(prepared: Dataset, rows: Dataset, role: str, task: Task) -> None:
    """TRL silently drops examples left with no trained token (e.g. a long prompt truncated to max_length),
    or, when packing, keeps them truncated and never learns them. Here either is an error, naming the rows
    where the prepared data still says which they were."""
    if "seq_lengths" in prepared.column_names:  # packed rows no longer say which source row each example was
        empty = sum(all(label == -100 for label in ex["labels"]) for ex in packed_examples(prepared))
        if empty:
            raise UserError(
                f"{source_name(task, role)}: {empty} of {len(rows)} rows have no answer token left to train on "
                f"after truncation to train.max_length={task.train.max_length}; raise max_length "
                "(the same command with train.packing=false --dry-run names the rows)"
            )
        return
    kept = set(prepared[ROW_COLUMN])
    lost = [r for r in rows[ROW_COLUMN] if r not in kept]
    if lost:
        shown = ", ".join(map(str, lost[:10])) + (" …" if len(lost) > 10 else "")
        raise UserError(
            f"{source_name(task, role)}: row {shown}: no answer token left to train on after truncation to "
            f"train.max_length={task.train.max_length} ({len(lost)} of {len(rows)} rows); raise max_length"
        )


def evaluate_all(trainer, model, tokenizer, train_rows: Dataset, eval_rows: Dataset, task: Task) -> tuple[dict, list]:
    metrics = loss_metrics(trainer)
    samples = []
    for rows, split in ((eval_rows, "eval"), (train_rows, "train")):
        values, split_samples = generation_metrics(model, tokenizer, rows, task.eval, split)
        metrics.update(values)
        samples += [{"split": split, **s} for s in split_samples]
    return metrics, samples


@contextmanager
def trainer_construction(model: torch.nn.Module, out: Path) -> Iterator[None]:
    """Around building a TRL trainer: keep the adapters' dtypes, pin the TensorBoard directory, and let its LM head
    score only the positions that carry a label."""
    score_labelled_positions_only()
    with adapter_dtypes_kept(model), tensorboard_logs_in(out):
        yield


@contextmanager
def tensorboard_logs_in(out: Path) -> Iterator[None]:
    """transformers' TensorBoard callback picks `out/runs/<date>` only when training begins; our evaluation
    before training logs first, which made it open its writer in ./runs of the working directory and keep
    it for the whole run. Its documented TENSORBOARD_LOGGING_DIR, read when the callback is created, pins
    the directory; it is restored afterwards so that no later trainer in this process inherits it."""
    previous = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / default_logdir())  # runs/<date>_<host>, as transformers names it
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TENSORBOARD_LOGGING_DIR")
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = previous


@contextmanager
def adapter_dtypes_kept(model: torch.nn.Module) -> Iterator[None]:
    """Build a TRL trainer without its QLoRA bf16 cast of every trainable parameter.

    On a quantized base TRL casts all trainable parameters to bf16 (the QLoRA paper's GPU recipe). Here
    that would round the λ vectors and saved modules, and on CPU make every LoRA matmul a bf16 one (about
    20x slower). The cast only touches parameters that require grad, so they are frozen while it runs.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in trainable:
            param.requires_grad_(True)


def load_model(task: Task, console: Console, sequences_per_row: int = 1) -> tuple[LoadedBase, torch.nn.Module, bool]:
    """The base, the model with its adapters, and whether training recomputes activations."""
    base = load_base(task.base.path, task.quantization, task.dtype, task.base.convert_from_llama, task.base.seed)
    console.print(base.describe())
    if task.template.chat_template:
        base.tokenizer.chat_template = task.template.chat_template
    checkpointing, why = use_gradient_checkpointing(task, base, sequences_per_row)
    console.print(f"gradient checkpointing {'on' if checkpointing else 'off'} ({why})")
    # the adapter's initial weights depend on the seed alone, not on whether loading the base drew random
    # numbers (building the tiny base on first use, converting a Llama): the same command, the same adapter
    set_seed(task.train.seed)
    return base, model_with_adapters(base, task, checkpointing), checkpointing


def metrics_before(out: Path, checkpoint: str | None, compute) -> dict:
    """Evaluated once, at the start of a fresh run; a resumed run reads the same numbers back."""
    before_file = out / BEFORE_FILE
    if checkpoint and before_file.is_file():
        return json.loads(before_file.read_text())
    before = compute()
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        write_json(before_file, before)
    return before


def gathered_state_dict(trainer) -> dict | None:
    """The full weights where FSDP or ZeRO-3 split them across ranks: a collective (every rank calls it, rank 0
    gets the tensors). None elsewhere: every rank holds the whole model and PEFT reads it directly."""
    state = trainer.accelerator.state
    zero3 = trainer.is_deepspeed_enabled and state.deepspeed_plugin.zero_stage == 3
    if trainer.is_fsdp_enabled or zero3:
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return None


def unprepare_after_evaluation(trainer) -> None:
    """Let `train()` wrap the model for DDP although `evaluate()` ran before it.

    The first `evaluate()` prepares the model for evaluation only (no DDP wrapper) and accelerate marks it as
    prepared, so `train()` then skips the wrapper: every rank would train its own copy on its shard of the data
    and nothing would average the gradients. Undoing the mark (and the autocast wrapper evaluation added) leaves
    the model as if never prepared. FSDP and DeepSpeed prepare fully in `evaluate()`, so they are left alone.
    """
    model, accelerator = trainer.model, trainer.accelerator
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled or not getattr(model, "_is_accelerate_prepared", False):
        return
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # restores model.forward in place
    del model._is_accelerate_prepared
    accelerator._models = [m for m in accelerator._models if m is not model]


def train_and_publish(
    trainer, task: Task, base: LoadedBase, checkpoint, before: dict, evaluate, summary: dict, console: Console
) -> dict | None:
    """Steps 6-8 of every recipe: train, evaluate after, print the table, publish the run.

    Under `accelerate launch` every rank trains, evaluates (the same rows: under FSDP2/ZeRO-3 a forward is a
    collective, so all ranks must run the same ones) and takes part in gathering the weights; rank 0 alone
    prints and writes. No collective follows the gather, so the other ranks may leave while rank 0 writes.
    """
    # counted before training shards the parameters (ZeRO-3 leaves each rank an empty tensor, its size in ds_numel)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters() if p.requires_grad)
    unprepare_after_evaluation(trainer)
    started = time.time()
    trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.time() - started
    after, samples = evaluate()
    state_dict = gathered_state_dict(trainer)
    if not is_main_process():
        return None
    print_metrics_table(before, after, console, title=f"{task.name}: before → after")
    model = trainer.accelerator.unwrap_model(trainer.model)
    metrics = {
        "before": before,
        "after": after,
        "train_seconds": round(train_seconds, 1),
        "global_step": trainer.state.global_step,
        "trainable_parameters": trainable,
        "samples": samples,
    }
    summary = {
        "adapter": ", ".join(task.adapter.presets)
        if not task.adapter.init_adapter
        else f"from {task.adapter.init_adapter}",
        "rank / alpha": f"{task.adapter.r} / {task.adapter.alpha}",
        "quantization": base.quantization,
        **summary,
        "steps": metrics["global_step"],
        "training time (s)": metrics["train_seconds"],
        "trainable parameters": f"{metrics['trainable_parameters']:,}",
    }

    def write(directory: Path) -> None:
        model.save_pretrained(directory, selected_adapters=["default"], state_dict=state_dict)
        trainer.processing_class.save_pretrained(directory)
        write_base_info(directory, base_info(model.get_base_model(), base.path, base.fingerprint))
        write_json(directory / "metrics.json", metrics)
        (directory / "resolved_task.yaml").write_text(task.to_yaml())
        trainer.state.save_to_json(str(directory / "trainer_state.json"))
        plot_loss_curve(trainer.state.log_history, directory / "loss_curve.png")
        (directory / "README.md").write_text(model_card(task.name, str(base.path), task.to_yaml(), metrics, summary))

    out = Path(task.output_dir)
    publish_run(out, write)
    console.print(f"wrote {out}")
    return metrics


def run_sft(task: Task, dry_run: bool = False, resume: bool | str | None = None, console: Console | None = None):
    console, out, checkpoint = start_run(task, resume, console, dry_run)
    train_rows, eval_rows = prepare_rows(task)
    console.print(f"data: {len(train_rows)} train rows, {len(eval_rows)} eval rows ({task.data.format})")

    base, model, checkpointing = load_model(task, console)
    tokenizer = base.tokenizer
    trainer_dir = Path(tempfile.mkdtemp(prefix="lmdiff-ft-dry-run-")) if dry_run else out  # a dry run writes nothing
    with trainer_construction(model, trainer_dir):
        trainer = SFTTrainer(
            model=model,
            args=training_arguments(
                task,
                trainer_dir,
                base,
                checkpointing,
                assistant_only_loss=task.data.format == "messages",
                # best-fit packing, padding-free: one row of whole examples whose position_ids restart at 0,
                # which LM-Diff's attention, means and conv all honour (no example sees another)
                packing=task.train.packing,
            ),
            train_dataset=train_rows,
            eval_dataset=eval_rows,
            processing_class=tokenizer,
        )
    check_trained_tokens(trainer.train_dataset, train_rows, "train", task)
    check_trained_tokens(trainer.eval_dataset, eval_rows, "eval", task)
    if is_main_process():
        print_label_preview(list(itertools.islice(packed_examples(trainer.train_dataset), 2)), tokenizer, console)
        trained = sum(sum(label != -100 for label in ex) for ex in trainer.train_dataset["labels"])
        total = sum(len(ex) for ex in trainer.train_dataset["input_ids"])
        console.print(f"train split: {trained:,} trained tokens of {total:,} ({100 * trained / total:.1f}%)")
        if task.train.packing:
            rows, size = len(trainer.train_dataset), task.train.max_length
            console.print(f"packed into {rows} rows of up to {size} tokens ({100 * total / (rows * size):.0f}% full)")
    if dry_run:
        shutil.rmtree(trainer_dir, ignore_errors=True)
        return trainer.train_dataset  # tokenized, with the labels TRL trains on: what the preview showed

    def evaluate():
        return evaluate_all(trainer, model, tokenizer, train_rows, eval_rows, task)

    before = metrics_before(out, checkpoint, lambda: evaluate()[0])
    summary = {"data": f"{len(train_rows)} train rows from {source_name(task, 'train')}, {len(eval_rows)} eval rows"}
    return train_and_publish(trainer, task, base, checkpoint, before, evaluate, summary, console)
