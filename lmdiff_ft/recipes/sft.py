"""Supervised fine-tuning through TRL's SFTTrainer, as a plain sequence of steps.

1. check the output directory (fresh, or a run to resume)
2. load and check the data           (fails on a bad row before any model is loaded)
3. load the base and attach adapters (quantized as the task says)
4. build the trainer                 (TRL tokenizes and masks here; we check and preview its labels)
5. evaluate before training
6. train                              (progress bar, TensorBoard logs, checkpoints)
7. evaluate after training
8. publish the run                    (adapter, tokenizer, metrics, card, curve; adapter_config.json last)
"""

import dataclasses
import itertools
import shutil
import tempfile
from pathlib import Path

from datasets import Dataset
from rich.console import Console
from trl import SFTTrainer

from ..data.rows import prepare_rows
from ..data.sources import ROW_COLUMN, SOURCE_COLUMN, source_name
from ..errors import UserError
from ..evaluation.generation import generation_metrics
from ..evaluation.likelihood import loss_metrics
from ..evaluation.retention import retention_metrics
from ..integrations.transformers import evaluate_with
from ..schema.load import used_formats
from ..schema.task import Task
from .common import (
    add_training_callbacks,
    is_main_process,
    load_model,
    metrics_before,
    start_run,
    tracking_run,
    train_and_publish,
    trainer_construction,
    training_arguments,
)
from .preview import packed_examples, print_label_preview, print_mix


def run_sft(task: Task, dry_run: bool = False, resume: bool | str | None = None, console: Console | None = None):
    # 1-2. the output directory; the data, checked before any model is loaded
    console, out, checkpoint = start_run(task, resume, console, dry_run)
    train_rows, eval_rows = prepare_rows(task)
    formats = " + ".join(sorted(used_formats(task)))
    console.print(f"data: {len(train_rows)} train rows, {len(eval_rows)} eval rows ({formats})")
    print_mix(train_rows, eval_rows, console)

    # 3. the base and its adapters
    base, model, checkpointing = load_model(task, console)
    tokenizer = base.tokenizer

    # 4. the trainer: TRL tokenizes and masks; we check and show what it will train on
    trainer_dir = Path(tempfile.mkdtemp(prefix="lmdiff-ft-dry-run-")) if dry_run else out  # a dry run writes nothing
    with trainer_construction(model, trainer_dir):
        trainer = SFTTrainer(
            model=model,
            args=training_arguments(
                task,
                trainer_dir,
                base,
                checkpointing,
                # train on the answers (assistant turns, completions) only, unless train_on_inputs
                assistant_only_loss="messages" in train_rows.column_names and not task.train.train_on_inputs,
                completion_only_loss=False if task.train.train_on_inputs else None,
                # best-fit packing, padding-free: one row of whole examples whose position_ids restart at 0,
                # which LM-Diff's attention, means and conv all honour (no example sees another)
                packing=task.train.packing,
            ),
            train_dataset=train_rows,
            eval_dataset=eval_rows,
            processing_class=tokenizer,
        )
    add_training_callbacks(trainer, task)
    evaluate_with(trainer, lambda: evaluate_during_training(trainer, model, tokenizer, eval_rows, task))
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

    # 5-8. evaluate before, train, evaluate after, publish
    def evaluate():
        return evaluate_all(trainer, model, tokenizer, train_rows, eval_rows, task)

    summary = {"data": f"{len(train_rows)} train rows from {source_name(task, 'train')}, {len(eval_rows)} eval rows"}
    with tracking_run(task):
        before = metrics_before(trainer, out, checkpoint, lambda: evaluate()[0])
        return train_and_publish(trainer, task, base, checkpoint, before, evaluate, summary, console)


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
    several = SOURCE_COLUMN in rows.column_names  # rows from several sources: name each row's source
    sources = (lambda d: list(d[SOURCE_COLUMN])) if several else (lambda d: [source_name(task, role)] * len(d))
    kept = set(zip(sources(prepared), prepared[ROW_COLUMN], strict=True))
    lost = list(dict.fromkeys(r for r in zip(sources(rows), rows[ROW_COLUMN], strict=True) if r not in kept))
    if lost:
        where = lost[0][0]
        shown = ", ".join(str(n) for s, n in lost[:10] if s == where) + (" …" if len(lost) > 10 else "")
        raise UserError(
            f"{where}: row {shown}: no answer token left to train on after truncation to "
            f"train.max_length={task.train.max_length} ({len(lost)} of {len(rows)} rows); raise max_length"
        )


def evaluate_during_training(trainer, model, tokenizer, eval_rows: Dataset, task: Task) -> dict[str, float]:
    """At each `train.eval_steps`: the eval loss as before and after training, and the task's answer metrics on
    `train.eval_generation_samples` eval rows (for `metric_for_best_model: exact_match` and the like)."""
    settings = dataclasses.replace(task.eval, num_samples=task.train.eval_generation_samples)
    with trainer.accelerator.autocast():  # the precision the trainer's forward runs in
        return (
            loss_metrics(model, tokenizer, eval_rows)
            | generation_metrics(model, tokenizer, eval_rows, settings, "eval")[0]
        )


def evaluate_all(trainer, model, tokenizer, train_rows: Dataset, eval_rows: Dataset, task: Task) -> tuple[dict, list]:
    with trainer.accelerator.autocast():  # the precision the trainer's forward runs in (bf16 on GPUs)
        metrics = loss_metrics(model, tokenizer, eval_rows)
    trainer.log(dict(metrics))  # into the log history: TensorBoard's eval/loss and the loss curve's eval points
    samples = []
    for rows, split in ((eval_rows, "eval"), (train_rows, "train")):
        values, split_samples = generation_metrics(model, tokenizer, rows, task.eval, split)
        metrics.update(values)
        samples += [{"split": split, **s} for s in split_samples]
    retention, retention_samples = retention_metrics(model, tokenizer, task.eval)
    return metrics | retention, samples + retention_samples
