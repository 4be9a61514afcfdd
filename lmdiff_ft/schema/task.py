"""The task file's schema: one dataclass per section, 1:1 with what training does.

A task names the base model, the adapter, the data and how its rows become prompts, and the training and
evaluation settings. These types are the one source of every choice and default: their type hints drive
validation (`schema/load.py`), their defaults are the documented defaults (docs/tasks.md), and the command line,
the base loader and the adapter presets take their lists of choices from the `Literal`s below.
`Task.to_yaml()` writes the fully resolved task back out.
"""

import dataclasses
import re
import string
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Quantization = Literal["auto", "nf4", "fp4", "int8", "none"]  # auto: nf4 where bitsandbytes runs, else none
Dtype = Literal["auto", "float32", "bfloat16", "float16"]  # auto: fp32 on CPU, bf16 (else fp16) on GPUs
# The adapter presets (lmdiff_ft/adapters/presets.py says what each one trains)
PresetName = Literal["diff_attn", "attn", "lambda", "se_gate", "mlp", "adaptive_norm", "token_mixing", "all"]
DataFormat = Literal["messages", "sharegpt", "prompt_completion", "alpaca", "text"]
Logger = Literal["tensorboard", "wandb", "mlflow"]  # train.report_to; each but tensorboard is an optional extra
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
Metric = Literal["loss", "perplexity", "exact_match", "f1", "rouge_l", "accuracy", "preference_accuracy"]
# train.metric_for_best_model: the eval loss (lower is better), or an answer metric (higher is better) scored on
# train.eval_generation_samples eval rows at each evaluation during training
BestMetric = Literal["loss", "exact_match", "f1", "rouge_l", "accuracy"]
# Every loss type TRL 1.16's DPOConfig accepts (trl/trainer/dpo_config.py, `loss_type`).
LossType = Literal[
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]  # fmt: skip

# Bases built locally on first use (lmdiff_ft/base/named.py)
NamedBase = Literal["tiny", "smollm2-135m", "smollm2-135m-llama"]
PLAIN_LLAMA_BASES = ("smollm2-135m-llama",)  # named bases that are Llamas, trained unconverted (the baseline)
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Canonical column names per data format; `data.fields` maps them to the dataset's own column names.
FORMAT_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "input", "output"),
    "text": ("text",),
}
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
ANSWER_FIELDS = ("completion", "output", "chosen", "rejected")
PROMPT_FIELDS = ("prompt", "instruction", "input")
# The TRL config arguments the task sets (recipes/common.py `trainer_arguments`), each with the key that owns it:
# `train.extra_args` may not set them (one source per setting).
OWNED_TRAINER_ARGUMENTS = {
    "output_dir": "output_dir", "num_train_epochs": "train.epochs", "max_steps": "train.max_steps",
    "learning_rate": "train.lr", "lr_scheduler_type": "train.lr_scheduler", "warmup_steps": "train.warmup_ratio",
    "weight_decay": "train.weight_decay", "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "max_length": "train.max_length", "seed": "train.seed", "data_seed": "train.seed",
    "logging_steps": "train.logging_steps", "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit", "eval_strategy": "train.eval_strategy",
    "eval_steps": "train.eval_steps", "save_strategy": "train.eval_strategy",
    "load_best_model_at_end": "train.load_best_model_at_end", "metric_for_best_model": "train.metric_for_best_model",
    "greater_is_better": "train.metric_for_best_model", "activation_checkpointing": "train.gradient_checkpointing",
    "gradient_checkpointing": "train.gradient_checkpointing", "optim": "train.optim", "bf16": "dtype",
    "fp16": "dtype", "report_to": "train.report_to", "run_name": "name", "packing": "train.packing",
    "assistant_only_loss": "train.train_on_inputs", "completion_only_loss": "train.train_on_inputs",
    "push_to_hub": "train.push_to_hub", "hub_model_id": "train.hub_model_id", "hub_private_repo": "train.hub_private",
    "beta": "preference.beta", "loss_type": "preference.loss_type", "loss_weights": "preference.loss_weights",
}  # fmt: skip
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _check(predicate: Callable[[Any], bool], expected: str) -> dict:
    """Field metadata: a value check, and the words that finish "expected <type> ..." when it fails."""
    return {"check": (predicate, expected)}


POSITIVE = _check(lambda v: v > 0, "> 0")
NON_NEGATIVE = _check(lambda v: v >= 0, ">= 0")
FRACTION = _check(lambda v: 0 <= v < 1, "in [0, 1)")
NOT_EMPTY = _check(lambda v: len(v) > 0, "that is not empty")
SHORTHAND_PATH = {"shorthand": "path"}  # a plain string stands for {path: <string>}
SOURCES = SHORTHAND_PATH | _check(lambda v: not isinstance(v, list) or len(v) > 0, "that is not empty")


def parse_layers(spec: str | int | list[int] | None) -> list[int] | None:
    """'12-21', '0,2,5-7', 3 or [0, 2] → sorted unique layer indices; None → None (every layer).

    Raises ValueError with a message that starts with "expected", for the validator to prefix with the key.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        layers = [layer for part in spec.split(",") for layer in _layer_range(part, spec)]
    elif isinstance(spec, list):
        layers = spec
    else:
        layers = [spec]
    if not layers or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in layers):
        raise ValueError(f"expected layer indices like '12-21', '0,2,5-7' or a list of integers >= 0, got {spec!r}")
    return sorted(set(layers))


def _layer_range(part: str, spec: str) -> range:
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
    if not match:
        raise ValueError(f"expected layer indices like '12-21' or '0,2,5-7', got {spec!r}")
    start, end = int(match[1]), int(match[2] or match[1])
    if end < start:
        raise ValueError(f"expected ascending ranges, got {part.strip()!r} in {spec!r}")
    return range(start, end + 1)


def template_fields(template: str) -> list[str]:
    """The `{column}` placeholders of a format string. ValueError for bad braces, `{}`, `{0}` or `{a.b}`."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"not a valid format string ({exc}); write literal braces as {{{{ and }}}}") from None
    names = [name for _, name, _, _ in parsed if name is not None]
    for name in names:
        if not name or name.isdigit() or "." in name or "[" in name:
            raise ValueError(f"placeholder {{{name}}} must name a column, like {{question}}")
    return names


def canonical_fields(data_format: str) -> tuple[str, ...]:
    """The names `data.fields` may map for a format; prompt_completion also serves preference (DPO) data."""
    names = FORMAT_FIELDS[data_format]
    if data_format == "prompt_completion":
        names += tuple(n for n in PREFERENCE_FIELDS if n not in names)
    return names


@dataclass(kw_only=True)
class BaseConfig:
    """The model to fine-tune: a named base (`tiny`, `smollm2-135m`), a checkpoint directory, or a Hub id."""

    path: str = field(metadata=NOT_EMPTY)
    convert_from_llama: bool = False
    plain_llama: bool = False  # train a Llama checkpoint as it is, unconverted: the baseline for LM-Diff's adapters
    seed: int = 0  # only for `tiny`: which tiny base


@dataclass(kw_only=True)
class AdapterConfig:
    presets: list[PresetName] = field(default_factory=lambda: ["diff_attn", "lambda"], metadata=NOT_EMPTY)  # README
    r: int = field(default=16, metadata=POSITIVE)
    alpha: int = field(default=32, metadata=POSITIVE)
    dropout: float = field(default=0.05, metadata=FRACTION)
    dora: bool = False
    rslora: bool = False
    layers: list[int] | None = field(default=None, metadata={"parse": parse_layers})
    init_adapter: str | None = None  # an adapter directory to continue from


@dataclass(kw_only=True)
class DataSource:
    """A local file, a saved `datasets` directory, or a Hub dataset id (with its split and config name)."""

    path: str = field(metadata=NOT_EMPTY)
    split: str = "train"
    name: str | None = None
    # one of several sources (data.train as a list) may differ from data.format / data.fields; null: theirs
    format: DataFormat | None = None
    fields: dict[str, str] | None = None
    weight: float | None = field(default=None, metadata=POSITIVE)  # share of the mixed train rows, relative
    max_samples: int | None = field(default=None, metadata=POSITIVE)  # this source's rows, before the mix


@dataclass(kw_only=True)
class ShareGPTRoles:
    """ShareGPT's `from` values → chat roles; datasets differ (`human`/`user`, `gpt`/`assistant`/`bot`)."""

    system: list[str] = field(default_factory=lambda: ["system"], metadata=NOT_EMPTY)
    user: list[str] = field(default_factory=lambda: ["human", "user"], metadata=NOT_EMPTY)
    assistant: list[str] = field(default_factory=lambda: ["gpt", "assistant"], metadata=NOT_EMPTY)


@dataclass(kw_only=True)
class DataConfig:
    # one source, or several mixed (each may be a plain path too)
    train: DataSource | list[DataSource] = field(metadata=SOURCES)
    eval: DataSource | list[DataSource] | None = field(default=None, metadata=SOURCES)
    eval_fraction: float = field(default=0.1, metadata=_check(lambda v: 0 < v < 1, "in (0, 1)"))
    format: DataFormat = "prompt_completion"
    fields: dict[str, str] = field(default_factory=dict)  # canonical name → column name
    max_samples: int | None = field(default=None, metadata=POSITIVE)
    sharegpt_roles: ShareGPTRoles = field(default_factory=ShareGPTRoles)

    def column(self, canonical: str) -> str:
        """The dataset column that holds a canonical field (unmapped names are their own column)."""
        return self.fields.get(canonical, canonical)

    def sources(self, role: str) -> list[DataSource]:
        """`data.train` or `data.eval` as a list (empty for no eval source)."""
        value = getattr(self, role)
        return [] if value is None else value if isinstance(value, list) else [value]


@dataclass(kw_only=True)
class TemplateConfig:
    system: str | None = None
    prompt: str | None = None  # format string over the row's columns, e.g. "Question: {question}"
    completion: str | None = None  # format string for the answer, e.g. " {label}"
    chat: bool = True
    chat_template: str | None = None  # Jinja, overrides the tokenizer's


@dataclass(kw_only=True)
class TrainConfig:
    epochs: float = field(default=3.0, metadata=POSITIVE)
    max_steps: int = field(default=-1, metadata=_check(lambda v: v == -1 or v > 0, "> 0, or -1 (no limit)"))
    lr: float = field(default=2e-4, metadata=POSITIVE)
    lr_scheduler: Scheduler = "cosine"
    warmup_ratio: float = field(default=0.03, metadata=FRACTION)
    weight_decay: float = field(default=0.0, metadata=NON_NEGATIVE)
    batch_size: int = field(default=8, metadata=POSITIVE)
    grad_accum: int = field(default=1, metadata=POSITIVE)
    max_length: int = field(default=512, metadata=POSITIVE)
    packing: bool = False
    seed: int = 42
    logging_steps: int = field(default=10, metadata=POSITIVE)
    save_steps: int = field(default=100, metadata=POSITIVE)
    eval_steps: int | None = field(default=None, metadata=POSITIVE)
    eval_strategy: Literal["no", "steps", "epoch"] | None = None  # null: steps when eval_steps is set, else no
    load_best_model_at_end: bool = False  # publish the checkpoint with the best metric_for_best_model
    metric_for_best_model: BestMetric = "loss"
    eval_generation_samples: int = field(default=0, metadata=NON_NEGATIVE)  # eval rows answered at each evaluation
    early_stopping_patience: int | None = field(default=None, metadata=POSITIVE)  # evaluations without improvement
    save_total_limit: int | None = field(default=2, metadata=POSITIVE)
    gradient_checkpointing: bool | Literal["auto"] = "auto"  # auto: on when a micro-batch's activations need it
    optim: str = "adamw_torch"
    report_to: list[Logger] = field(default_factory=lambda: ["tensorboard"])
    train_on_inputs: bool = False  # SFT: train on the prompt tokens too, not only on the answer
    # any other SFTConfig/DPOConfig argument, e.g. {max_grad_norm: 0.3, neftune_noise_alpha: 5}
    extra_args: dict[str, Any] = field(default_factory=dict)
    push_to_hub: bool = False  # upload the published run (adapter, card, metrics) to hub_model_id
    hub_model_id: str | None = None  # 'org/name'
    hub_private: bool = True

    def evaluation_strategy(self) -> str:
        """`eval_strategy`, or by default: every `eval_steps` when set, else no evaluation during training."""
        return self.eval_strategy or ("steps" if self.eval_steps else "no")


@dataclass(kw_only=True)
class EvalConfig:
    metrics: list[Metric] = field(default_factory=lambda: ["exact_match", "rouge_l"])
    num_samples: int = field(default=50, metadata=NON_NEGATIVE)
    train_samples: int = field(default=50, metadata=NON_NEGATIVE)
    max_new_tokens: int = field(default=32, metadata=POSITIVE)
    do_sample: bool = False
    temperature: float = field(default=1.0, metadata=POSITIVE)
    top_p: float = field(default=1.0, metadata=_check(lambda v: 0 < v <= 1, "in (0, 1]"))
    labels: list[str] | None = field(default=None, metadata=NOT_EMPTY)
    # JSONL of general questions the base answers correctly (`question`, `answers`), asked before and after
    # training: what the adapter breaks (evaluation/retention.py). Relative to the task file.
    retention: str | None = None
    retention_max_new_tokens: int = field(default=24, metadata=POSITIVE)


@dataclass(kw_only=True)
class PreferenceConfig:
    beta: float = field(default=0.1, metadata=POSITIVE)
    # one loss or several summed, e.g. [sigmoid, sft]: DPO plus the chosen answers' NLL (RPO), which keeps the
    # policy producing the chosen answers (and their end-of-turn token) while it learns to prefer them
    loss_type: list[LossType] = field(default_factory=lambda: ["sigmoid"], metadata=NOT_EMPTY)
    loss_weights: list[float] | None = None  # one per loss_type; null: all 1


@dataclass(kw_only=True)
class Task:
    name: str = field(metadata=_check(NAME.fullmatch, "made of letters, digits, '.', '_' or '-'"))
    base: BaseConfig = field(metadata=SHORTHAND_PATH)
    quantization: Quantization = "auto"
    dtype: Dtype = "auto"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig
    template: TemplateConfig = field(default_factory=TemplateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    preference: PreferenceConfig | None = None
    preference_task: str | None = None  # SFT: the DPO task that `lmdiff-ft dpo` (no task) continues this run with
    output_dir: str | None = None  # null → runs/<name>, relative to the working directory
    source_path: Path | None = field(default=None, compare=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = f"runs/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved task (every default filled, local paths absolute), as plain YAML-able data."""
        resolved = dataclasses.asdict(self)
        del resolved["source_path"]
        return resolved

    def to_yaml(self) -> str:
        """What training writes to `resolved_task.yaml`; `load_task` on it gives an equal Task."""
        return yaml.dump(self.to_dict(), Dumper=TaskDumper, sort_keys=False, allow_unicode=True)


# YAML 1.1 reads `2e-4` (no dot) as a string; task files and overrides mean a number, so resolve it as one
# (and quote such strings when dumping, so the resolved task reads back the same).
EXPONENT_FLOAT = re.compile(r"[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class TaskLoader(yaml.SafeLoader):
    """YAML as task files mean it: exponent floats are numbers, a duplicate key is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """Refuse duplicate keys: PyYAML would silently keep the last one."""
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class TaskDumper(yaml.SafeDumper):
    """Writes exponent-float-looking strings quoted, so that `TaskLoader` reads them back as strings."""


for _cls in (TaskLoader, TaskDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789"))
