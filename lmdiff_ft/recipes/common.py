"""The steps every training recipe shares (sft.py, dpo.py), in the order a recipe calls them:

1. `start_run`           the output directory (fresh, or a run to resume), the seed, the distributed setup
2. `load_model`          the base (quantized as the task says) with its adapters, and whether to recompute
3. `trainer_construction` around building the TRL trainer
4. `metrics_before`      evaluated once, read back on --resume
5. `train_and_publish`   train, evaluate after, print the table, publish the run (adapter_config.json last)
"""

import json
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import get_int_from_env
from rich.console import Console
from transformers import EarlyStoppingCallback, set_seed
from trl import SFTConfig

from ..adapters.known_base import base_info, load_adapter, write_base_info
from ..adapters.presets import attach_adapters, dead_branch_warning
from ..base.loading import LoadedBase, default_device, load_base
from ..errors import UserError
from ..evaluation.report import model_card, plot_loss_curve, print_metrics_table, write_json
from ..evaluation.retention import retention_kept
from ..integrations.accelerate import (
    fsdp_enabled,
    fsdp_on_cpu_too,
    fsdp_version,
)
from ..integrations.bitsandbytes import keep_4bit_layout_trainable
from ..integrations.transformers import tensorboard_logs_in
from ..integrations.trl import score_labelled_positions_only, trainable_parameters_frozen
from ..outputs import publish_run, push_run
from ..schema.task import Task
from .checkpoints import checkpoint_problem, checkpoints, disk_full_is_one_line, newest_loadable
from .preemption import stop_on_signal

BEFORE_FILE = "metrics_before.json"  # written at the start of a fresh run, read back on --resume


def is_main_process() -> bool:
    """Rank 0 of a distributed run (torchrun/accelerate set RANK; mpirun sets its own), or a single process."""
    return get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"], 0) == 0


def check_distributed_setup() -> None:
    """Refuse FSDP1 before any work: the evaluation before/after training calls the model outside FSDP1's
    forward, where its flattened, sharded parameters are unusable. FSDP2 (configs/accelerate/fsdp.yaml) gathers
    them in every module's own forward, so evaluation and generation work unchanged."""
    if fsdp_enabled() and fsdp_version() == 1:
        raise UserError("FSDP1 is not supported: set `fsdp_version: 2` in the accelerate config (configs/accelerate/)")


def run_directory(task: Task, resume: bool | str | None, report=print) -> tuple[Path, str | None]:
    """The output dir and the checkpoint to resume from. A finished run is never silently overwritten, an
    interrupted one is only continued when asked, and a checkpoint that would not load (cut short by a kill, a full
    disk, a damaged file) is skipped with one `report`ed line saying why."""
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
        checkpoint, skipped = newest_loadable(out)
        for line in skipped:
            report(line)
        if checkpoint is None:
            raise UserError(f"{out}: no complete checkpoint-N to resume from")
        return out, str(checkpoint)
    checkpoint = Path(resume)
    if problem := checkpoint_problem(checkpoint):
        raise UserError(f"{checkpoint}: not a complete checkpoint directory: {problem}")
    return out, str(checkpoint)


def start_run(
    task: Task, resume: bool | str | None, console: Console | None, dry_run: bool = False
) -> tuple[Console, Path, str | None]:
    """What every training command does first: one console (quiet on all but the main process under
    accelerate launch), a checked distributed setup, the output dir and checkpoint, the seed. A dry run
    writes nothing, so whatever the output dir holds does not stop it."""
    console = console or Console(quiet=not is_main_process())
    check_distributed_setup()
    report = partial(console.print, markup=False, highlight=False, soft_wrap=True)
    out, checkpoint = (Path(task.output_dir), None) if dry_run else run_directory(task, resume, report)
    set_seed(task.train.seed)
    return console, out, checkpoint


# What one micro-batch keeps for the backward pass without recomputation, per token and decoder layer, in
# values per unit of hidden size: measured 116 KB per token and layer for SmolLM2-135M as LM-Diff (hidden 576,
# fp32, presets diff_attn, lambda and se_gate; peak RSS at 4 x 147 and 16 x 147 tokens per micro-batch).
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
    return attach_adapters(base.model, a, gradient_checkpointing=gradient_checkpointing)


def training_arguments(
    task: Task, out: Path, base: LoadedBase, gradient_checkpointing: bool, config_class=SFTConfig, **extra
):
    """The task's `train` section, 1:1, as TRL/transformers arguments, with `train.extra_args` (names the task
    does not set: schema/load.py refuses the others) and the recipe's own (`extra`)."""
    arguments = trainer_arguments(task, out, base, gradient_checkpointing)
    return config_class(**arguments, **task.train.extra_args, **extra)


def trainer_arguments(task: Task, out: Path, base: LoadedBase, gradient_checkpointing: bool) -> dict:
    """The arguments the task sets (schema/task.py OWNED_TRAINER_ARGUMENTS names each one's key)."""
    t = task.train
    strategy = t.evaluation_strategy()
    return dict(
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
        eval_strategy=strategy,
        eval_steps=t.eval_steps,
        # the best checkpoint needs one saved at each evaluation (load.py: save_steps a multiple of eval_steps)
        save_strategy="epoch" if strategy == "epoch" and t.load_best_model_at_end else "steps",
        load_best_model_at_end=t.load_best_model_at_end,
        metric_for_best_model=f"eval_{t.metric_for_best_model}",
        greater_is_better=t.metric_for_best_model != "loss",
        activation_checkpointing=gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        optim=t.optim,
        bf16=base.dtype == torch.bfloat16,
        fp16=base.dtype == torch.float16,
        report_to=list(t.report_to),
        run_name=task.name,  # the MLflow / W&B run's name
        dataloader_num_workers=0,
        # train where the base was loaded. On a machine without GPUs accelerate starts a (gloo) process group only
        # for a CPU run: without this, `accelerate launch --multi_gpu`/torchrun ranks would each train on all data
        use_cpu=default_device().type == "cpu",
    )


def add_training_callbacks(trainer, task: Task) -> None:
    """Early stopping: after `early_stopping_patience` evaluations without a better `metric_for_best_model`."""
    if task.train.early_stopping_patience:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=task.train.early_stopping_patience))


def best_checkpoint(state) -> dict:
    """Which checkpoint the published adapter is, when `train.load_best_model_at_end` picked the best one."""
    if state.best_model_checkpoint is None:
        return {}
    step = int(Path(state.best_model_checkpoint).name.split("-")[-1])
    return {"best_checkpoint": {"step": step, "metric": state.best_metric}}


def load_model(task: Task, console: Console, sequences_per_row: int = 1) -> tuple[LoadedBase, torch.nn.Module, bool]:
    """The base, the model with its adapters, and whether training recomputes activations."""
    b = task.base
    base = load_base(b.path, task.quantization, task.dtype, b.convert_from_llama, b.seed, plain_llama=b.plain_llama)
    console.print(base.describe())
    if task.template.chat_template:
        base.tokenizer.chat_template = task.template.chat_template
    checkpointing, why = use_gradient_checkpointing(task, base, sequences_per_row)
    console.print(f"gradient checkpointing {'on' if checkpointing else 'off'} ({why})")
    # the adapter's initial weights depend on the seed alone, not on whether loading the base drew random
    # numbers (building the tiny base on first use, converting a Llama): the same command, the same adapter
    set_seed(task.train.seed)
    if not task.adapter.init_adapter and (
        warning := dead_branch_warning(base.model, task.adapter.presets, task.adapter.layers)
    ):
        console.print(f"warning: {warning}", markup=False, highlight=False)
    return base, model_with_adapters(base, task, checkpointing), checkpointing


@contextmanager
def trainer_construction(model: torch.nn.Module, out: Path) -> Iterator[None]:
    """Around building a TRL trainer: keep the adapters' dtypes, pin the TensorBoard directory, and let its LM head
    score only the positions that carry a label."""
    score_labelled_positions_only()
    with trainable_parameters_frozen(model), tensorboard_logs_in(out):
        yield


@contextmanager
def tracking_run(task: Task) -> Iterator[None]:
    """One MLflow run for the evaluation before training, training and the evaluation after. transformers' MLflow
    callback ends the run it started when training ends (the evaluation after would open a second run, left
    unfinished); a run already active when training starts is used and left to its owner, so it is started here. It
    honours MLflow's own variables (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, MLFLOW_RUN_ID to continue a run)."""
    if "mlflow" not in task.train.report_to or not is_main_process():
        yield
        return
    import mlflow  # an optional extra

    with mlflow.start_run(run_name=task.name):
        yield


def metrics_before(trainer, out: Path, checkpoint: str | None, compute) -> dict:
    """Evaluated once, at the start of a fresh run; a resumed run reads the same numbers back. It runs the model
    directly, before `train()` prepares (and under FSDP2 shards) it."""
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


def eval_curve(before: dict, log_history: list[dict]) -> list[dict]:
    """The eval loss before training (step 0) and at every `train.eval_steps`: how fast a run converges. The
    evaluation after training logs at the last step too: the same model, or the best checkpoint's when
    `load_best_model_at_end` loaded it, so the first value logged at a step is the one that step's model had."""
    losses = {0: before["eval_loss"]} if "eval_loss" in before else {}
    for entry in log_history:
        if "eval_loss" in entry:
            losses.setdefault(entry["step"], entry["eval_loss"])
    return [{"step": step, "eval_loss": loss} for step, loss in losses.items()]


def train_and_publish(
    trainer, task: Task, base: LoadedBase, checkpoint, before: dict, evaluate, summary: dict, console: Console
) -> dict | None:
    """Steps 6-8 of every recipe: train, evaluate after, print the table, publish the run.

    Under `accelerate launch` every rank trains, evaluates (the same rows: under FSDP2/ZeRO-3 a forward is a
    collective, so all ranks must run the same ones) and takes part in gathering the weights; rank 0 alone
    prints and writes. No collective follows the gather, so the other ranks may leave while rank 0 writes.
    """
    # PEFT's count, before training shards the parameters (it reads a ZeRO-3 parameter's size where DeepSpeed keeps it)
    trainable, _ = trainer.model.get_nb_trainable_parameters()
    fsdp_on_cpu_too(trainer)  # FSDP2 shards in train() on CPU processes as on GPUs
    started = time.time()
    with stop_on_signal(trainer), disk_full_is_one_line(trainer, trainable):
        trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.time() - started
    after, samples = evaluate()
    after |= retention_kept(before, after)
    state_dict = gathered_state_dict(trainer)
    if not is_main_process():
        return None
    print_metrics_table(before, after, console, title=f"{task.name}: before → after")
    model = trainer.accelerator.unwrap_model(trainer.model)
    adapter = model.peft_config["default"]  # the task's settings, or those of the adapter it continues
    metrics = {
        "before": before,
        "after": after,
        "train_seconds": round(train_seconds, 1),
        "global_step": trainer.state.global_step,
        "trainable_parameters": trainable,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
        "eval_curve": eval_curve(before, trainer.state.log_history),
        **(best_checkpoint(trainer.state) if task.train.load_best_model_at_end else {}),
        "samples": samples,
    }
    summary = {
        "adapter": ", ".join(task.adapter.presets)
        if not task.adapter.init_adapter
        else f"from {task.adapter.init_adapter}",
        "rank / alpha": f"{adapter.r} / {adapter.lora_alpha}",
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
    if task.train.push_to_hub:
        console.print(push_run(out, task.train.hub_model_id, task.train.hub_private))
    return metrics
