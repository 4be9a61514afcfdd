"""Datasets in, TRL-ready rows out.

`load_splits` reads the task's train/eval data (local JSONL/JSON/CSV/Parquet, a saved `datasets`
directory, or a Hub id); `to_sft_rows` / `to_preference_rows` turn its rows into what TRL 1.16's
SFTTrainer / DPOTrainer take, applying the field mapping and the templates. Every row is checked, and
a bad one is reported by file and 1-based row number (the row in the file, even after the eval split),
so a data bug fails before training instead of being trained on.
"""

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from .errors import UserError, first_line
from .tasks import DataSource, Task, check_preference, local_path, template_fields

ROW_COLUMN = "__row__"  # 1-based row number in the source, added by load_source, dropped by to_*_rows
REFERENCE_COLUMN = "reference"  # the answer text, kept for generation metrics; TRL ignores the column
SPLIT_SEED = 0  # fixed, so every run of a task (whatever train.seed) evaluates on the same rows
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
ROLES = ("system", "user", "assistant")


def source_name(task: Task, role: str) -> str:
    """Where the rows of `role` ('train' or 'eval') come from, as error messages name it."""
    source = task.data.eval if role == "eval" and task.data.eval is not None else task.data.train
    return _display(source.path)


def load_source(source: DataSource, role: str) -> Dataset:
    """Load one data source (`data.<role>`), with its 1-based row numbers in ROW_COLUMN."""
    key = f"data.{role}"
    path = local_path(source.path, Path.cwd(), data_file=True)
    if path is None:
        dataset = _load_hub(source, key)
    elif path.is_file():
        dataset = _load_file(path, source, key)
    elif path.is_dir():
        dataset = _load_saved(path, source.split, key)
    else:
        raise UserError(f"{_display(path)}: file not found ({key})")
    if len(dataset) == 0:
        raise UserError(f"{_display(source.path)}: the dataset has no rows ({key})")
    return dataset.add_column(ROW_COLUMN, list(range(1, len(dataset) + 1)))


def load_splits(task: Task) -> tuple[Dataset, Dataset]:
    """Train and eval rows; without `data.eval`, a seeded `data.eval_fraction` of the train rows; then max_samples."""
    train = load_source(task.data.train, "train")
    if task.data.eval is not None:
        evaluation = load_source(task.data.eval, "eval")
    else:
        train, evaluation = _split(train, task)
    if task.data.max_samples is not None:
        train = train.select(range(min(len(train), task.data.max_samples)))
    return train, evaluation


def to_sft_rows(dataset: Dataset, task: Task, source_name: str) -> Dataset:
    """Rows for TRL's SFTTrainer: prompt/completion (conversational when template.chat), messages, or text.

    Every row but `text` ones also gets REFERENCE_COLUMN: the answer as plain text, for generation metrics.
    """
    data_format = task.data.format
    if data_format == "messages":
        _require_columns(dataset, {task.data.column("messages"): "mapped by data.fields.messages"}, source_name)
        convert = _messages_row
    elif data_format == "text":
        _require_columns(dataset, {task.data.column("text"): "mapped by data.fields.text"}, source_name)
        convert = _text_row
    else:
        answer = "output" if data_format == "alpaca" else "completion"
        _require_columns(dataset, {**_prompt_columns(task), **_answer_columns(task, answer)}, source_name)
        convert = _prompt_completion_row
    return Dataset.from_list([convert(row, task) for row in _rows(dataset, source_name)])


def to_preference_rows(dataset: Dataset, task: Task, source_name: str) -> Dataset:
    """Rows for TRL's DPOTrainer: prompt/chosen/rejected, conversational when template.chat, plus REFERENCE_COLUMN."""
    check_preference(task)
    columns = {task.data.column(name): f"mapped by data.fields.{name}" for name in ("chosen", "rejected")}
    _require_columns(dataset, {**_prompt_columns(task), **columns}, source_name)
    return Dataset.from_list([_preference_row(row, task) for row in _rows(dataset, source_name)])


# --- loading -------------------------------------------------------------------------------------------


def _load_file(path: Path, source: DataSource, key: str) -> Dataset:
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(f"{_display(path)}: expected a .jsonl, .json, .csv or .parquet file ({key})")
    if source.split != "train" or source.name is not None:
        raise UserError(f"{_display(path)}: {key}.split and {key}.name apply to Hub datasets, not to a local file")
    try:
        return load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # the datasets/arrow errors for a malformed file vary; all are the user's to fix
        if _has_no_rows(path):
            raise UserError(f"{_display(path)}: the file has no rows ({key})") from exc
        reason = (_bad_json_line(path) if builder == "json" else None) or first_line(exc)
        raise UserError(f"{_display(path)}: cannot read it as {builder.upper()} ({key}): {reason}") from exc


def _has_no_rows(path: Path) -> bool:
    """datasets fails obscurely on a text file without rows ('StopIteration', 'corresponds to no data')."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return False
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    header = 1 if suffix == ".csv" else 0
    return len(lines) <= header or (suffix == ".json" and "".join(lines).replace(" ", "") == "[]")


def _bad_json_line(path: Path) -> str | None:
    """For a JSON Lines file, the first line that is not JSON (datasets' own error does not say which)."""
    if path.suffix.lower() != ".jsonl":
        return None
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            try:
                if line.strip():
                    json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {number}: invalid JSON ({exc.msg})"
    return None


def _load_saved(path: Path, split: str, key: str) -> Dataset:
    if not any((path / name).is_file() for name in SAVED_DATASET_FILES):
        raise UserError(
            f"{_display(path)}: expected a dataset saved by save_to_disk (with dataset_info.json or state.json) ({key})"
        )
    loaded = load_from_disk(str(path))
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise UserError(f"{_display(path)}: no split {split!r} ({key}.split); it has {', '.join(loaded)}")
        return loaded[split]
    return loaded


def _load_hub(source: DataSource, key: str) -> Dataset:
    try:
        return load_dataset(source.path, source.name, split=source.split)
    except Exception as exc:  # offline, unknown id, unknown split: the user's to fix
        raise UserError(
            f"{source.path}: not a local file, and loading it as a Hub dataset (split {source.split!r}) failed "
            f"({key}): {first_line(exc)}"
        ) from exc


def _split(train: Dataset, task: Task) -> tuple[Dataset, Dataset]:
    fraction = task.data.eval_fraction
    if len(train) - math.ceil(fraction * len(train)) < 1:
        raise UserError(
            f"{_display(task.data.train.path)}: {len(train)} row(s) are too few to hold out "
            f"data.eval_fraction={fraction} for evaluation; add rows or give data.eval"
        )
    parts = train.train_test_split(test_size=fraction, seed=SPLIT_SEED)
    return parts["train"], parts["test"]


def _display(path: str | Path) -> str:
    """A path as short as is unambiguous: relative to the working directory when it lies under it."""
    path = Path(path)
    if path.is_absolute() and path.is_relative_to(Path.cwd()):
        return str(path.relative_to(Path.cwd()))
    return str(path)


# --- rows ----------------------------------------------------------------------------------------------


@dataclass
class _Row:
    """One source row, with what its errors must name: the file and the 1-based row number."""

    values: dict[str, Any]
    number: int
    source: str

    def error(self, message: str) -> UserError:
        return UserError(f"{self.source}: row {self.number}: {message}")

    def scalar(self, column: str, origin: str) -> str | int | float:
        """A string or number field; `origin` says which task key made us read it."""
        value = self.values.get(column)
        if value is None:
            raise self.error(f"missing field '{column}' ({origin})")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.error(f"field '{column}' must be a string, got {type(value).__name__} ({origin})")
        return value

    def text(self, column: str, origin: str) -> str:
        text = str(self.scalar(column, origin))
        if not text.strip():
            raise self.error(f"field '{column}' is empty ({origin})")
        return text


def _rows(dataset: Dataset, source: str) -> Iterator[_Row]:
    for index, values in enumerate(dataset):
        yield _Row(values, values.pop(ROW_COLUMN, index + 1), source)


def _require_columns(dataset: Dataset, columns: dict[str, str], source: str) -> None:
    """A column absent from every row is a mapping mistake: say so once, with the columns there are."""
    present = [c for c in dataset.column_names if c != ROW_COLUMN]
    for column, origin in columns.items():
        if column not in present:
            raise UserError(f"{source}: no column '{column}' ({origin}); the columns are {', '.join(present)}")


def _prompt_columns(task: Task) -> dict[str, str]:
    """The columns the prompt is built from (alpaca's `input` is optional, so not required)."""
    if task.template.prompt is not None:
        return {column: "used by template.prompt" for column in template_fields(task.template.prompt)}
    name = "instruction" if task.data.format == "alpaca" else "prompt"
    return {task.data.column(name): f"mapped by data.fields.{name}"}


def _answer_columns(task: Task, name: str) -> dict[str, str]:
    if task.template.completion is not None:
        return {column: "used by template.completion" for column in template_fields(task.template.completion)}
    return {task.data.column(name): f"mapped by data.fields.{name}"}


def _render(template: str, row: _Row, origin: str) -> str:
    values = {column: row.scalar(column, f"used by {origin}") for column in template_fields(template)}
    try:
        return template.format_map(values)
    except (ValueError, TypeError) as exc:  # a format spec that does not fit the value, e.g. {label:.2f}
        raise row.error(f"{origin}: {exc}") from None


def _prompt_text(row: _Row, task: Task) -> str:
    if task.template.prompt is None:
        if task.data.format == "alpaca":
            return _alpaca_prompt(row, task)
        return row.text(task.data.column("prompt"), "mapped by data.fields.prompt")
    text = _render(task.template.prompt, row, "template.prompt")
    if not text.strip():
        raise row.error("the prompt is empty (template.prompt)")
    return text


def _alpaca_prompt(row: _Row, task: Task) -> str:
    """'{instruction}\\n\\n{input}', without the blank line and input when the row's input is empty."""
    instruction = row.text(task.data.column("instruction"), "mapped by data.fields.instruction")
    column = task.data.column("input")
    extra = "" if row.values.get(column) is None else str(row.scalar(column, "mapped by data.fields.input"))
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _completion_text(row: _Row, task: Task) -> str:
    if task.template.completion is None:
        name = "output" if task.data.format == "alpaca" else "completion"
        return row.text(task.data.column(name), f"mapped by data.fields.{name}")
    text = _render(task.template.completion, row, "template.completion")
    if not text.strip():
        raise row.error("the completion is empty (template.completion)")
    return text


def _message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _chat_prompt(prompt: str, task: Task) -> list[dict[str, str]]:
    system = task.template.system
    return ([_message("system", system)] if system else []) + [_message("user", prompt)]


def _plain_prompt(prompt: str, task: Task) -> str:
    system = task.template.system
    return f"{system}\n\n{prompt}" if system else prompt


def _prompt_completion_row(row: _Row, task: Task) -> dict[str, Any]:
    prompt, completion = _prompt_text(row, task), _completion_text(row, task)
    if task.template.chat:
        return {
            "prompt": _chat_prompt(prompt, task),
            "completion": [_message("assistant", completion)],
            REFERENCE_COLUMN: completion.strip(),
        }
    return {"prompt": _plain_prompt(prompt, task), "completion": completion, REFERENCE_COLUMN: completion.strip()}


def _text_row(row: _Row, task: Task) -> dict[str, Any]:
    return {"text": row.text(task.data.column("text"), "mapped by data.fields.text")}


def _messages_row(row: _Row, task: Task) -> dict[str, Any]:
    column = task.data.column("messages")
    messages = row.values.get(column)
    if messages is None:
        raise row.error(f"missing field '{column}' (mapped by data.fields.messages)")
    if not isinstance(messages, list):
        raise row.error(f"field '{column}' must be a list of {{role, content}} messages, got {type(messages).__name__}")
    checked = [_checked_message(row, column, index, message) for index, message in enumerate(messages)]
    if task.template.system and (not checked or checked[0]["role"] != "system"):
        checked.insert(0, _message("system", task.template.system))
    if not checked or checked[-1]["role"] != "assistant":
        raise row.error(f"{column}: the last message must be the assistant's (it is the answer trained on)")
    if not any(message["role"] == "user" for message in checked):
        raise row.error(f"{column}: no user message")
    return {"messages": checked, REFERENCE_COLUMN: checked[-1]["content"].strip()}


def _checked_message(row: _Row, column: str, index: int, message: Any) -> dict[str, str]:
    """{role, content} with a known role and non-empty text content; other keys are dropped."""
    where = f"{column}[{index}]"
    if not isinstance(message, dict):
        raise row.error(f"{where}: expected a {{role, content}} mapping, got {type(message).__name__}")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise row.error(f"{where}: role must be one of {', '.join(ROLES)}, got {role!r}")
    if not isinstance(content, str) or not content.strip():
        raise row.error(f"{where}: content must be a non-empty string, got {content!r}")
    return _message(role, content)


def _preference_row(row: _Row, task: Task) -> dict[str, Any]:
    prompt = _prompt_text(row, task)
    chosen = row.text(task.data.column("chosen"), "mapped by data.fields.chosen")
    rejected = row.text(task.data.column("rejected"), "mapped by data.fields.rejected")
    if chosen.strip() == rejected.strip():
        raise row.error(f"chosen and rejected are the same ({chosen.strip()!r}); a preference needs two answers")
    if task.template.chat:
        return {
            "prompt": _chat_prompt(prompt, task),
            "chosen": [_message("assistant", chosen)],
            "rejected": [_message("assistant", rejected)],
            REFERENCE_COLUMN: chosen.strip(),
        }
    prompt = _plain_prompt(prompt, task)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, REFERENCE_COLUMN: chosen.strip()}
