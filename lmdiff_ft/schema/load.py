"""Task files: YAML → a validated `Task` (schema/task.py), with dotted overrides and paths resolved.

Every mistake in a task file or an override raises `UserError` with one line naming the file, the dotted key and
what was expected, so a typo fails before any model is loaded.
"""

import contextlib
import dataclasses
import difflib
import functools
import importlib.util
import os
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from ..errors import UserError
from .task import (
    ANSWER_FIELDS,
    DATA_SUFFIXES,
    HUB_ID,
    OWNED_TRAINER_ARGUMENTS,
    PROMPT_FIELDS,
    BaseConfig,
    DataConfig,
    NamedBase,
    Task,
    TaskLoader,
    canonical_fields,
    template_fields,
)


class _Invalid(Exception):
    """A mistake found while validating; `load_task` prefixes the file name and raises UserError."""


def load_task(path: str | Path, overrides: Sequence[str] = ()) -> Task:
    """Read, override (`train.lr=1e-4`), validate and resolve a task file. Paths resolve against its directory."""
    path = Path(path)
    raw = _read_yaml(path)
    with _errors_in(path):
        for item in overrides:
            _apply_override(raw, item)
        task = _build(Task, raw, "")
        task.source_path = path
        _resolve_paths(task, path.resolve().parent)
        _check_task(task)
    return task


def check_preference(task: Task) -> None:
    """The extra rules for preference (DPO) data; `load_task` applies them when the task has `preference`."""
    with _errors_in(task.source_path or "task"):
        _check_preference(task)


@contextlib.contextmanager
def _errors_in(path: str | Path) -> Iterator[None]:
    try:
        yield
    except _Invalid as exc:
        raise UserError(f"{path}: {exc}") from None


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: task file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: expected a task YAML file, got a directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the task file ({exc})") from None
    try:
        raw = yaml.load(text, Loader=TaskLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise UserError(
            f"{path}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
        ) from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else _show(raw)
        raise UserError(f"{path}: expected a mapping of task keys (name, base, data, ...), got {got}")
    return raw


# --- building dataclasses from YAML data ---------------------------------------------------------------


@functools.cache
def _schema(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """The user-visible fields of a section and their type hints."""
    hints = get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _build(cls: type, raw: Any, key: str) -> Any:
    """Build section `cls` from the mapping `raw` found at dotted `key` ("" for the top level)."""
    schema = _schema(cls)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _Invalid(f"{key}: expected a mapping with keys {', '.join(schema)}, got {_show(raw)}")
    for name in raw:
        if name not in schema:
            dotted = [_join(key, n) for n in schema]
            raise _Invalid(f"unknown key '{_join(key, name)}'{_suggest(_join(key, str(name)), dotted)}")
    values = {}
    for name, (spec, hint) in schema.items():
        dotted = _join(key, name)
        if _required(spec) and raw.get(name) is None:
            if not dataclasses.is_dataclass(hint) or "shorthand" in spec.metadata:
                raise _Invalid(f"missing required key '{dotted}'")
            values[name] = _build(hint, {}, dotted)  # names the missing key inside the section (data.train)
        elif name in raw:
            values[name] = _convert(raw[name], hint, spec.metadata, dotted)
    return cls(**values)


def _required(spec: dataclasses.Field) -> bool:
    return spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING


def _convert(value: Any, hint: Any, metadata: typing.Mapping, key: str) -> Any:
    if "parse" in metadata:
        try:
            value = metadata["parse"](value)
        except ValueError as exc:
            raise _Invalid(f"{key}: {exc}") from None
    if "shorthand" in metadata:
        value = _expand_shorthand(
            value, metadata["shorthand"], key, many=any(get_origin(m) is list for m in get_args(hint))
        )
    value = _coerce(value, hint, key)
    if "check" in metadata and value is not None:
        predicate, expected = metadata["check"]
        if not predicate(value):
            raise _Invalid(f"{key}: expected {_describe(_non_null(hint))} {expected}, got {_show(value)}")
    return value


def _expand_shorthand(value: Any, name: str, key: str, many: bool) -> Any:
    """A plain string stands for {name: string}; where the key also takes a list, so does each list item."""
    if isinstance(value, str):
        return {name: value}
    if many and isinstance(value, list):
        return [_expand_shorthand(item, name, f"{key}[{i}]", many=False) for i, item in enumerate(value)]
    if value is not None and not isinstance(value, dict):
        expected = f"a string or a mapping with '{name}'" + (", or a list of them" if many else "")
        raise _Invalid(f"{key}: expected {expected}, got {_show(value)}")
    return value


def _coerce(value: Any, hint: Any, key: str, nullable: bool = False) -> Any:
    """Check `value` against a type hint; ints are accepted as floats, bools are not accepted as numbers."""
    origin = get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        members = [a for a in get_args(hint) if a is not type(None)]
        if value is None and len(members) < len(get_args(hint)):
            return None
        if len(members) == 1:
            return _coerce(value, members[0], key, nullable=True)
        lists = [m for m in members if get_origin(m) is list]
        if isinstance(value, list) and lists:  # `Source | list[Source]`: a list's own errors name its item
            return _coerce(value, lists[0], key)
        for member in members:  # `bool | Literal["auto"]`: the first member that takes the value
            with contextlib.suppress(_Invalid):
                return _coerce(value, member, key)
        raise _Invalid(f"{key}: expected {_describe(hint)}, got {_show(value)}")
    if hint is Any:  # train.extra_args: checked against the trainer's config (_check_extra_args)
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is list:
        (item,) = get_args(hint)
        if isinstance(value, str) and (item is str or get_origin(item) is Literal):
            value = [value]  # `metrics: exact_match` means a list of one
        if isinstance(value, list):
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return {str(k): _coerce(v, get_args(hint)[1], f"{key}.{k}") for k, v in value.items()}
    elif origin is Literal:
        if isinstance(value, str) and value in get_args(hint):
            return value
    elif hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    expected = _describe(hint) + (" or null" if nullable else "")
    suggestion = _suggest(value, get_args(hint)) if origin is Literal else ""
    raise _Invalid(f"{key}: expected {expected}, got {_show(value)}{suggestion}")


def _non_null(hint: Any) -> Any:
    """`X | None` → X; any other hint (`X | Y` included) unchanged."""
    if get_origin(hint) in (types.UnionType, typing.Union):
        members = [a for a in get_args(hint) if a is not type(None)]
        return members[0] if len(members) == 1 else _section(members) or hint
    return hint


def _section(members: list) -> Any:
    """`Source | list[Source]` → Source: a key that is one section or a list of them is described as the section."""
    sections = [m for m in members if dataclasses.is_dataclass(m)]
    if len(sections) == 1 and all(m in sections or get_args(m) == (sections[0],) for m in members):
        return sections[0]
    return None


def _describe(hint: Any) -> str:
    if get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in get_args(hint) if a is not type(None))
    if get_origin(hint) is Literal:
        options = get_args(hint)
        return options[0] if len(options) == 1 else "one of " + ", ".join(options)
    if get_origin(hint) is list:
        return "a list"
    if get_origin(hint) is dict or dataclasses.is_dataclass(hint):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, shortened."""
    if value is None or isinstance(value, bool):
        return yaml.safe_dump(value).splitlines()[0]
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggest(word: Any, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _join(key: str, name: Any) -> str:
    return f"{key}.{name}" if key else str(name)


# --- command-line overrides ----------------------------------------------------------------------------


def _apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in the raw YAML data, refusing keys the schema does not have."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise _Invalid(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
    node, cls, hint = raw, Task, None
    for depth, part in enumerate(parts):
        dotted = ".".join(parts[: depth + 1])
        if cls is None:  # inside a free mapping (data.fields): any key
            if depth != len(parts) - 1:
                raise _Invalid(f"override {item!r}: '{dotted}' takes a value, not sub-keys")
            hint = get_args(hint)[1]
            break
        schema = _schema(cls)
        if part not in schema:
            siblings = [_join(".".join(parts[:depth]), n) for n in schema]
            raise _Invalid(f"override {item!r}: unknown key '{dotted}'{_suggest(dotted, siblings)}")
        spec, hint = schema[part]
        if depth == len(parts) - 1:
            break
        inner = _non_null(hint)
        if not (dataclasses.is_dataclass(inner) or get_origin(inner) is dict):
            raise _Invalid(f"override {item!r}: '{dotted}' takes a value, not sub-keys")
        child = node.get(part)
        if isinstance(child, str) and "shorthand" in spec.metadata:
            child = {spec.metadata["shorthand"]: child}
        node[part] = child = {} if child is None else child
        if not isinstance(child, dict):
            raise _Invalid(f"{dotted}: expected a mapping, got {_show(child)}")
        node, cls, hint = child, (inner if dataclasses.is_dataclass(inner) else None), inner
    node[parts[-1]] = _override_value(text, hint, item)


def _override_value(text: str, hint: Any, item: str) -> Any:
    """YAML-parse the value (numbers, bools, lists); a string field takes the text verbatim unless it is null."""
    is_text = _non_null(hint) is str
    try:
        value = yaml.load(text, Loader=TaskLoader)
    except yaml.YAMLError as exc:
        if is_text:
            return text
        raise _Invalid(f"override {item!r}: invalid YAML value ({getattr(exc, 'problem', exc)})") from None
    return text if is_text and value is not None and not isinstance(value, str) else value


# --- paths ---------------------------------------------------------------------------------------------


def local_path(text: str, base_dir: Path, data_file: bool = False) -> Path | None:
    """`text` as an absolute local path (relative ones resolve against `base_dir`), or None for a Hub id.

    It is local when it starts with '.', '/' or '~', exists, or (for data) ends in a data-file suffix.
    """
    path = _absolute(text, base_dir)
    is_local = text.startswith((".", "/", "~")) or path.exists()
    if data_file and path.suffix.lower() in DATA_SUFFIXES:
        is_local = True
    return path if is_local else None


def _absolute(text: str, base_dir: Path) -> Path:
    return Path(os.path.abspath(base_dir / Path(text).expanduser()))


def _resolve_paths(task: Task, task_dir: Path) -> None:
    _resolve_base(task.base, task_dir)
    for source in task.data.sources("train") + task.data.sources("eval"):
        if (path := local_path(source.path, task_dir, data_file=True)) is not None:
            source.path = str(path)
    if task.eval.retention is not None:
        path = _absolute(task.eval.retention, task_dir)
        if not path.is_file():
            raise _Invalid(f"eval.retention: no such file: {path} (expected JSONL with `question` and `answers`)")
        task.eval.retention = str(path)
    if task.preference_task is not None:
        path = _absolute(task.preference_task, task_dir)
        if not path.is_file():
            raise _Invalid(f"preference_task: no such task file: {path}")
        task.preference_task = str(path)
    if task.adapter.init_adapter is not None:
        # Like output_dir, relative to the working directory: it names another run's output.
        path = _absolute(task.adapter.init_adapter, Path.cwd())
        if not (path / "adapter_config.json").is_file():
            raise _Invalid(
                f"adapter.init_adapter: {path} is not a finished adapter (no adapter_config.json)"
                f"{_producer_hint(path, task_dir)}"
            )
        task.adapter.init_adapter = str(path)


def _producer_hint(adapter_dir: Path, task_dir: Path) -> str:
    """'; train it first: lmdiff-ft sft tasks/x.yaml' when a task file next to this one writes that directory."""
    for candidate in sorted(task_dir.glob("*.y*ml")):
        try:
            raw = yaml.safe_load(candidate.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(raw, dict) or "name" not in raw:
            continue
        output = raw.get("output_dir") or f"runs/{raw['name']}"
        if _absolute(str(output), Path.cwd()) == adapter_dir:
            command = "dpo" if "preference" in raw else "sft"
            return f"; train it first: lmdiff-ft {command} {os.path.relpath(candidate)}"
    return ""


def _resolve_base(base: BaseConfig, task_dir: Path) -> None:
    if base.path in get_args(NamedBase):
        return
    path = local_path(base.path, task_dir)
    if path is None:
        if not HUB_ID.fullmatch(base.path):
            named = " or ".join(repr(n) for n in get_args(NamedBase))
            raise _Invalid(
                f"base.path: expected {named}, a checkpoint directory or a Hub id 'org/name', got {base.path!r}"
            )
        return
    if not path.exists():
        raise _Invalid(f"base.path: no such directory: {path}")
    if not (path / "config.json").is_file():
        raise _Invalid(f"base.path: expected a checkpoint directory with config.json, got {path}")
    base.path = str(path)


# --- rules that span keys ------------------------------------------------------------------------------


def _check_task(task: Task) -> None:
    _check_fields(task.data)
    _check_sources(task.data)
    _check_template(task)
    _check_leak(task)
    _check_optim(task.train.optim)
    _check_train(task)
    if task.preference is not None:
        _check_preference(task)


def _check_fields(data: DataConfig) -> None:
    """Only the format's canonical names may be mapped; fill the rest with themselves. A source of several that
    names its own format or fields gets both resolved (its fields default to data.fields for the same format)."""
    data.fields = _filled_fields(data.fields, data.format, "data")
    for key, source in _keyed_sources(data):
        if source.format is not None or source.fields is not None:
            source.format = source.format or data.format
            inherited = data.fields if source.format == data.format else {}
            given = inherited if source.fields is None else source.fields
            source.fields = _filled_fields(given, source.format, key)


def _filled_fields(fields: dict[str, str], data_format: str, key: str) -> dict[str, str]:
    allowed = canonical_fields(data_format)
    for name in fields:
        if name not in allowed:
            raise _Invalid(
                f"unknown key '{key}.fields.{name}'{_suggest(name, allowed)}: {key}.format '{data_format}' maps "
                f"{', '.join(allowed)} (each to a column name)"
            )
    return {name: fields.get(name, name) for name in allowed}


def _keyed_sources(data: DataConfig) -> list[tuple[str, Any]]:
    """Every source with its dotted key: data.train, or data.train[1] in a list."""
    keyed = []
    for role in ("train", "eval"):
        many = isinstance(getattr(data, role), list)
        keyed += [(f"data.{role}[{i}]" if many else f"data.{role}", s) for i, s in enumerate(data.sources(role))]
    return keyed


def _check_sources(data: DataConfig) -> None:
    """`text` rows (no prompt, no answer) mix with no other format; weights are for a list of train sources."""
    formats = {key: source.format or data.format for key, source in _keyed_sources(data)}
    if "text" in formats.values() and len(set(formats.values())) > 1:
        key = next(k for k, f in formats.items() if f == "text")
        others = ", ".join(sorted(set(formats.values()) - {"text"}))
        raise _Invalid(f"{key}.format: 'text' rows cannot be mixed with other formats ({others})")
    for key, source in _keyed_sources(data):
        if source.weight is not None and not (key.startswith("data.train[")):
            raise _Invalid(f"{key}.weight: weights mix several train sources (data.train as a list); remove it")


def used_formats(task: Task) -> set[str]:
    """The data formats of every source of the task."""
    return {source.format or task.data.format for _, source in _keyed_sources(task.data)}


def _check_template(task: Task) -> None:
    template, formats = task.template, used_formats(task)
    for chat_format in sorted(formats & {"messages", "sharegpt"}):
        if not template.chat:
            raise _Invalid(
                f"template.chat: data.format '{chat_format}' needs chat: true (the chat template renders messages)"
            )
    unused = {
        "messages": ("prompt", "completion"), "sharegpt": ("prompt", "completion"),
        "text": ("system", "prompt", "completion"),
    }  # fmt: skip
    for name in ("system", "prompt", "completion"):
        if getattr(template, name) is not None and all(name in unused.get(f, ()) for f in formats):
            shown = "' and '".join(sorted(formats))
            raise _Invalid(f"template.{name}: not used with data.format '{shown}'; remove it")
    for name in ("prompt", "completion"):
        try:
            template_fields(getattr(template, name) or "")
        except ValueError as exc:
            raise _Invalid(f"template.{name}: {exc}") from None


def _check_leak(task: Task) -> None:
    """Refuse a prompt built from the answer's columns: the model would read the answer it must produce."""
    data, template = task.data, task.template
    answers = {data.fields[name]: f"data.fields.{name}" for name in ANSWER_FIELDS if name in data.fields}
    answers.update({column: "template.completion" for column in template_fields(template.completion or "")})
    if template.prompt is not None:
        prompt_columns = {column: "template.prompt" for column in template_fields(template.prompt)}
    else:
        prompt_columns = {data.fields[n]: f"data.fields.{n}" for n in PROMPT_FIELDS if n in data.fields}
    for column, origin in prompt_columns.items():
        if column in answers:
            raise _Invalid(
                f"{origin}: uses column '{column}', which holds the answer ({answers[column]}); "
                "the model would see the answer in its prompt"
            )


def _check_train(task: Task) -> None:
    t = task.train
    for logger in t.report_to:
        if importlib.util.find_spec(logger) is None:
            raise _Invalid(f"train.report_to: {logger} is not installed (pip install 'lmdiff-ft[loggers]')")
    strategy = t.evaluation_strategy()
    if strategy == "steps" and not t.eval_steps:
        raise _Invalid("train.eval_strategy: 'steps' needs train.eval_steps (evaluate every N steps)")
    if (t.load_best_model_at_end or t.early_stopping_patience) and strategy == "no":
        key = "load_best_model_at_end" if t.load_best_model_at_end else "early_stopping_patience"
        raise _Invalid(
            f"train.{key}: needs evaluation during training (train.eval_steps or train.eval_strategy: epoch)"
        )
    if t.early_stopping_patience and not t.load_best_model_at_end:
        raise _Invalid("train.early_stopping_patience: needs train.load_best_model_at_end: true (the best checkpoint)")
    if t.eval_generation_samples and strategy == "no":
        raise _Invalid(
            "train.eval_generation_samples: needs evaluation during training (train.eval_steps or "
            "train.eval_strategy: epoch)"
        )
    if t.metric_for_best_model != "loss":
        metric = t.metric_for_best_model
        if metric not in task.eval.metrics:
            raise _Invalid(f"train.metric_for_best_model: {metric} is not one of eval.metrics; add it there")
        if not t.eval_generation_samples:
            raise _Invalid(
                f"train.metric_for_best_model: {metric} scores generated answers; set train.eval_generation_samples "
                "(eval rows answered at each evaluation, e.g. 20)"
            )
    if t.load_best_model_at_end and strategy == "steps" and t.save_steps % t.eval_steps:
        raise _Invalid(
            f"train.save_steps: with load_best_model_at_end, expected a multiple of train.eval_steps "
            f"({t.eval_steps}), got {t.save_steps}"
        )
    if t.push_to_hub and (t.hub_model_id is None or not HUB_ID.fullmatch(t.hub_model_id)):
        raise _Invalid(f"train.hub_model_id: push_to_hub needs a Hub repo id 'org/name', got {_show(t.hub_model_id)}")
    _check_extra_args(t.extra_args, dpo=task.preference is not None)


def _check_extra_args(extra_args: dict[str, Any], dpo: bool) -> None:
    """Names the TRL config has and the task does not set elsewhere."""
    from trl import DPOConfig, SFTConfig  # here: trl takes seconds to import

    names = [f.name for f in dataclasses.fields(DPOConfig if dpo else SFTConfig) if f.init]
    for name in extra_args:
        if name in OWNED_TRAINER_ARGUMENTS:
            raise _Invalid(f"train.extra_args.{name}: set by {OWNED_TRAINER_ARGUMENTS[name]}; set it there")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise _Invalid(f"train.extra_args.{name}: not an argument of TRL's {'DPO' if dpo else 'SFT'}Config{hint}")


def _check_optim(optim: str) -> None:
    from transformers.training_args import OptimizerNames  # here: transformers takes seconds to import

    names = [name.value for name in OptimizerNames]
    if optim not in names:
        raise _Invalid(f"train.optim: expected a transformers optimizer name, got {optim!r}{_suggest(optim, names)}")


def _check_preference(task: Task) -> None:
    if used_formats(task) != {"prompt_completion"}:
        raise _Invalid(
            f"data.format: preference (DPO) data needs 'prompt_completion' (prompt, chosen and rejected columns), "
            f"got {' and '.join(repr(f) for f in sorted(used_formats(task)))}"
        )
    if task.template.completion is not None:
        raise _Invalid("template.completion: not used by preference data (chosen and rejected are used as they are)")
    if task.preference_task is not None:
        raise _Invalid("preference_task: names the DPO task of an SFT task; this task is the DPO one, remove it")
    weights, losses = task.preference.loss_weights, task.preference.loss_type
    if weights is not None and len(weights) != len(losses):
        raise _Invalid(
            f"preference.loss_weights: expected one weight per loss_type ({len(losses)}), got {len(weights)}"
        )
    if task.train.eval_generation_samples or task.train.metric_for_best_model != "loss":
        key = "eval_generation_samples" if task.train.eval_generation_samples else "metric_for_best_model"
        raise _Invalid(f"train.{key}: SFT only (during DPO training the evaluations report the DPO loss and rewards)")
    if task.train.packing:
        raise _Invalid("train.packing: SFT only (TRL's DPOTrainer pads each pair; padding-free DPO is disabled in TRL)")
