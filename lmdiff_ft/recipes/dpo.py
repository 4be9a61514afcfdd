"""Preference tuning through TRL's DPOTrainer, with no second copy of the base in memory.

The reference model is an adapter on the same base: starting from an SFT adapter (`init_adapter`), the
policy continues training that adapter and TRL keeps a frozen copy of it as the "ref" adapter; starting
from the base, the reference is the base itself (a fresh LoRA starts at B = 0, so the frozen copy equals
the base). Either way one base serves both models, quantized or not.

    1. check the output directory      2. load and check the preference pairs
    3. load the base + adapter         4. build the trainer (TRL adds the frozen "ref" adapter)
    5. evaluate before                 6. train   7. evaluate after   8. publish
"""

from pathlib import Path

import torch
import yaml
from datasets import Dataset
from rich.console import Console
from trl import DPOConfig, DPOTrainer

from ..data.rows import prepare_pairs, prepare_rows
from ..data.sources import source_name
from ..errors import UserError
from ..evaluation.generation import generation_metrics
from ..evaluation.likelihood import loss_metrics, preference_logprobs, preference_metrics
from ..evaluation.retention import retention_metrics
from ..integrations.trl import reference_model
from ..schema.load import load_task
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
from .preview import print_pair_preview


def run_dpo(task: Task, dry_run: bool = False, resume: bool | str | None = None, console: Console | None = None):
    if task.preference is None:
        raise UserError(
            f"{task.source_path or task.name}: no `preference` section, so not a DPO task "
            "(add `preference:` for preference pairs, or train it with lmdiff-ft sft)"
        )
    # 1-2. the output directory; the pairs, checked before any model is loaded
    console, out, checkpoint = start_run(task, resume, console, dry_run)
    train_pairs, eval_pairs = prepare_pairs(task)
    console.print(f"data: {len(train_pairs)} train pairs, {len(eval_pairs)} eval pairs")
    sft_task = sft_task_of(task)

    # 3. the base and the adapter (a fresh one, or the SFT adapter continued)
    base, model, checkpointing = load_model(task, console, sequences_per_row=2)  # chosen and rejected
    tokenizer = base.tokenizer
    if is_main_process():
        print_pair_preview(train_pairs, tokenizer, console)
    if dry_run:
        return None

    # 4. the trainer (TRL adds the frozen "ref" adapter when the model starts from one)
    args = training_arguments(
        task,
        out,
        base,
        checkpointing,
        config_class=DPOConfig,
        beta=task.preference.beta,
        loss_type=task.preference.loss_type,
        loss_weights=task.preference.loss_weights,
    )
    with trainer_construction(model, out):
        trainer = DPOTrainer(
            model=model,
            ref_model=None,
            args=args,
            train_dataset=train_pairs,
            eval_dataset=eval_pairs,
            processing_class=tokenizer,
        )
    add_training_callbacks(trainer, task)

    # 5-8. evaluate before, train, evaluate after, publish
    def evaluate():
        # train() leaves the model's forward inside accelerate's mixed-precision autocast (bf16 on GPUs): the
        # same autocast before training keeps before and after comparable (the reference check above all)
        with trainer.accelerator.autocast():
            return evaluate_dpo(trainer.model, tokenizer, eval_pairs, task, sft_task)

    summary = {
        "data": f"{len(train_pairs)} preference pairs from {source_name(task, 'train')}, {len(eval_pairs)} held out",
        "DPO": f"beta {task.preference.beta}, loss {' + '.join(task.preference.loss_type)}, reference: "
        + ("the starting adapter, frozen" if task.adapter.init_adapter else "the base (adapter disabled)"),
    }
    with tracking_run(task):
        before = metrics_before(trainer, out, checkpoint, lambda: evaluate()[0])

        def evaluate_after():
            after, samples = evaluate()
            change = reference_change(before["reference_logprob_sum"], after["reference_logprob_sum"], base.dtype)
            console.print(f"reference model unchanged by training: yes ({change:.1g} relative)")
            return after, samples

        return train_and_publish(trainer, task, base, checkpoint, before, evaluate_after, summary, console)


# How far the reference's summed log-probabilities on the eval pairs may move, relative, between the evaluations
# before and after training: the same weights and rows, so only the order of reductions differs (a few ulps of the
# compute dtype). A reference that trained moves by far more.
REFERENCE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def reference_change(before: float, after: float, dtype: torch.dtype) -> float:
    """The relative change of the reference's log-probabilities; a UserError (the run is not published) beyond the
    compute dtype's tolerance: DPO's loss measures the policy against a reference that must stay fixed."""
    tolerance = REFERENCE_TOLERANCE.get(dtype, REFERENCE_TOLERANCE[torch.float32])
    change = abs(after - before) / max(abs(before), torch.finfo(torch.float32).tiny)
    if not change <= tolerance:  # NaN fails too
        allowed = f"{tolerance:g} allowed in {str(dtype).removeprefix('torch.')}"
        raise UserError(
            f"the reference model moved during training: its log-probabilities on the eval pairs sum to {after:.6g}, "
            f"{before:.6g} before ({change:.2g} relative, {allowed}); the run is not published"
        )
    return change


def sft_task_of(task: Task) -> Task | None:
    """The SFT task the starting adapter was trained on (from its resolved_task.yaml), to score DPO on it."""
    if not task.adapter.init_adapter:
        return None
    resolved = Path(task.adapter.init_adapter) / "resolved_task.yaml"
    return load_task(resolved) if resolved.is_file() else None


def evaluate_dpo(model, tokenizer, eval_pairs: Dataset, task: Task, sft_task: Task | None) -> tuple[dict, list]:
    """Held-out preference accuracy (policy and reference), reward margins, and the SFT task's own metrics."""
    policy = preference_logprobs(model, tokenizer, eval_pairs)
    with reference_model(model):
        reference = preference_logprobs(model, tokenizer, eval_pairs)
    metrics = preference_metrics(policy, reference, task.preference.beta)
    metrics["reference_logprob_sum"] = (reference["chosen"].sum() + reference["rejected"].sum()).item()
    samples = []
    if sft_task is not None:
        sft_train, sft_eval = prepare_rows(sft_task)
        metrics.update({f"sft_{k}": v for k, v in loss_metrics(model, tokenizer, sft_eval).items()})
        for rows, split in ((sft_eval, "eval"), (sft_train, "train")):
            values, split_samples = generation_metrics(model, tokenizer, rows, sft_task.eval, split)
            metrics.update({f"sft_{k}": v for k, v in values.items()})
            samples += [{"split": f"sft_{split}", **s} for s in split_samples]
    retention, retention_samples = retention_metrics(model, tokenizer, task.eval)
    return metrics | retention, samples + retention_samples


def finished_sft_runs(runs: Path = Path("runs")) -> list[tuple[Path, dict]]:
    """Finished SFT runs under `runs` (a run dir whose resolved task has no `preference`), newest first, with
    their resolved tasks."""
    found = []
    for marker in runs.glob("*/adapter_config.json"):
        resolved = marker.parent / "resolved_task.yaml"
        task = yaml.safe_load(resolved.read_text()) if resolved.is_file() else None
        if isinstance(task, dict) and task.get("preference") is None:
            found.append((marker.stat().st_mtime, marker.parent, task))
    return [(run, task) for _, run, task in sorted(found, key=lambda f: f[0], reverse=True)]


def continuation_task(overrides: list[str], runs: Path = Path("runs")) -> Task:
    """`lmdiff-ft dpo` with no task: the DPO task that the newest finished SFT run naming one
    (`preference_task`) names, starting from that run's adapter on its base."""
    finished = finished_sft_runs(runs)
    if not finished:
        raise UserError(
            f"no finished SFT run under {runs}/ to continue; run `lmdiff-ft sft tasks/nasa_qa.yaml` first, "
            "or name a DPO task: lmdiff-ft dpo TASK"
        )
    named = [(run, sft) for run, sft in finished if sft.get("preference_task")]
    if not named:
        shown = ", ".join(str(run) for run, _ in finished[:3])
        raise UserError(
            f"no finished SFT run under {runs}/ names a `preference_task` (its DPO task): {shown}; "
            "name a DPO task instead: lmdiff-ft dpo TASK"
        )
    run, sft = named[0]
    base = sft["base"]
    start = [f"adapter.init_adapter={run}", f"base.path={base['path']}", f"base.seed={base['seed']}"]
    for switch in ("convert_from_llama", "plain_llama"):
        start.append(f"base.{switch}={str(base.get(switch, False)).lower()}")
    return load_task(sft["preference_task"], start + list(overrides))
