"""A task's rows → what TRL 1.16's SFTTrainer / DPOTrainer take, with the field mapping and the templates applied.

Every row is checked, and a bad one is reported by file and 1-based row number (the row in the file, even after the
eval split), so a data bug fails before training instead of being trained on.
"""

import dataclasses
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, concatenate_datasets

from ..errors import UserError
from ..schema.load import check_preference
from ..schema.task import DataSource, Task, template_fields
from .sources import ROW_COLUMN, SOURCE_COLUMN, Part, load_parts, source_name

REFERENCE_COLUMN = "reference"  # the answer text, kept for generation metrics; TRL ignores the column
ROLES = ("system", "user", "assistant")
Prompt = str | list[dict[str, str]]  # plain text, or chat messages


def prepare_rows(task: Task) -> tuple[Dataset, Dataset]:
    """TRL-ready SFT train/eval rows; each keeps its source row number for error messages (and, from several
    sources, the source's name in SOURCE_COLUMN). Several train sources are mixed as their weights say."""
    return _prepared(task, to_sft_rows)


def prepare_pairs(task: Task) -> tuple[Dataset, Dataset]:
    """TRL-ready preference (DPO) train/eval pairs, from one source or several mixed, as `prepare_rows`."""
    return _prepared(task, to_preference_rows)


def _prepared(task: Task, convert: Callable[[Dataset, Task, str], Dataset]) -> tuple[Dataset, Dataset]:
    parts, eval_parts = load_parts(task)
    if len(parts) == 1 and len(eval_parts) <= 1:
        (part,) = parts
        evaluation = eval_parts[0].train if eval_parts else part.eval
        rows = []
        for raw, role in ((part.train, "train"), (evaluation, "eval")):
            converted = convert(raw, task, source_name(task, role))
            rows.append(converted.add_column(ROW_COLUMN, raw[ROW_COLUMN]))
        return rows[0], rows[1]
    train = [_part_rows(part, part.train, task, convert) for part in parts]
    held_out = [_part_rows(part, part.eval, task, convert) for part in parts if part.eval is not None]
    held_out += [_part_rows(part, part.train, task, convert) for part in eval_parts]
    train = mix(train, [part.source.weight for part in parts], task.train.seed)
    return _concatenated(train), _concatenated(held_out)


def _part_rows(part: Part, raw: Dataset, task: Task, convert: Callable[[Dataset, Task, str], Dataset]) -> Dataset:
    converted = convert(raw, source_task(task, part.source), part.name)
    return converted.add_column(ROW_COLUMN, raw[ROW_COLUMN]).add_column(SOURCE_COLUMN, [part.name] * len(raw))


def source_task(task: Task, source: DataSource) -> Task:
    """The task as one source sees it: the source's own format and field mapping where it names them."""
    if source.format is None:
        return task
    data = dataclasses.replace(task.data, format=source.format, fields=source.fields)
    return dataclasses.replace(task, data=data)


def mix(parts: list[Dataset], weights: list[float | None], seed: int) -> list[Dataset]:
    """Without weights, every row of every source once. With weights, the mix keeps as many rows as the sources
    have together, source i's share being weight_i / sum: a seeded sample of its rows, repeated in a seeded
    order where its share is more rows than it has. The same seed, the same rows."""
    if all(weight is None for weight in weights):
        return parts
    weights = [1.0 if weight is None else weight for weight in weights]
    total = sum(len(part) for part in parts)
    rng = random.Random(seed)
    chosen = []
    for part, weight in zip(parts, weights, strict=True):
        count = max(1, round(total * weight / sum(weights)))
        order = []
        while len(order) < count:
            order += rng.sample(range(len(part)), len(part))
        chosen.append(part.select(order[:count]))
    return chosen


def _concatenated(parts: list[Dataset]) -> Dataset:
    """One dataset of the parts' rows; prompt/completion rows become messages when they meet messages rows (TRL
    takes one kind per dataset), which then train on the assistant turns: the completion, as before."""
    if any("messages" in part.column_names for part in parts):
        parts = [
            part if "messages" in part.column_names else part.map(_as_messages, remove_columns=["prompt", "completion"])
            for part in parts
        ]
    return concatenate_datasets(parts)


def _as_messages(row: dict[str, Any]) -> dict[str, Any]:
    return {"messages": row["prompt"] + row["completion"]}


def to_sft_rows(dataset: Dataset, task: Task, source_name: str) -> Dataset:
    """Rows for TRL's SFTTrainer: prompt/completion (conversational when template.chat), messages, or text.

    Every row but `text` ones also gets REFERENCE_COLUMN: the answer as plain text, for generation metrics.
    """
    data_format = task.data.format
    if data_format == "messages":
        _require_columns(dataset, {task.data.column("messages"): "mapped by data.fields.messages"}, source_name)
        convert = _messages_row
    elif data_format == "sharegpt":
        _require_columns(
            dataset, {task.data.column("conversations"): "mapped by data.fields.conversations"}, source_name
        )
        convert = _sharegpt_row
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


def wrapped_prompt(text: str, task: Task) -> Prompt:
    """A user's text as the task's rows present it to the model: after the task's system text, as chat messages
    (`template.chat`) or as plain text with a blank line after the system text."""
    system = task.template.system
    if task.template.chat:
        return ([_message("system", system)] if system else []) + [_message("user", text)]
    return f"{system}\n\n{text}" if system else text


def user_texts(dataset: Dataset, task: Task, source_name: str) -> list[str]:
    """Each row's user text, before the system text and the chat format wrap it: what a person would type."""
    if task.data.format in ("messages", "sharegpt"):
        convert = _messages_row if task.data.format == "messages" else _sharegpt_row
        turns = (convert(row, task)["messages"] for row in _rows(dataset, source_name))
        return [[m for m in messages if m["role"] == "user"][-1]["content"] for messages in turns]
    return [_prompt_text(row, task) for row in _rows(dataset, source_name)]


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


def _prompt_completion_row(row: _Row, task: Task) -> dict[str, Any]:
    prompt, completion = wrapped_prompt(_prompt_text(row, task), task), _completion_text(row, task)
    answer = [_message("assistant", completion)] if task.template.chat else completion
    return {"prompt": prompt, "completion": answer, REFERENCE_COLUMN: completion.strip()}


def _text_row(row: _Row, task: Task) -> dict[str, Any]:
    return {"text": row.text(task.data.column("text"), "mapped by data.fields.text")}


def _list_field(row: _Row, task: Task, canonical: str, items: str) -> tuple[str, list]:
    """A conversation column (`messages`, ShareGPT's `conversations`): its name and its list, or one-line errors."""
    column = task.data.column(canonical)
    value = row.values.get(column)
    if value is None:
        raise row.error(f"missing field '{column}' (mapped by data.fields.{canonical})")
    if not isinstance(value, list):
        raise row.error(f"field '{column}' must be a list of {items}, got {type(value).__name__}")
    return column, value


def _messages_row(row: _Row, task: Task) -> dict[str, Any]:
    column, messages = _list_field(row, task, "messages", "{role, content} messages")
    checked = [_checked_message(row, column, index, message) for index, message in enumerate(messages)]
    return _conversation_row(row, column, checked, task)


def _sharegpt_row(row: _Row, task: Task) -> dict[str, Any]:
    """ShareGPT's `conversations: [{from, value}]`, its `from` names mapped to roles by data.sharegpt_roles."""
    column, turns = _list_field(row, task, "conversations", "{from, value} turns")
    roles = {name: role for role in ROLES for name in getattr(task.data.sharegpt_roles, role)}
    checked = []
    for index, turn in enumerate(turns):
        where = f"{column}[{index}]"
        if not isinstance(turn, dict):
            raise row.error(f"{where}: expected a {{from, value}} mapping, got {type(turn).__name__}")
        if turn.get("from") not in roles:
            known = ", ".join(roles)
            raise row.error(f"{where}: 'from' must be one of {known} (data.sharegpt_roles), got {turn.get('from')!r}")
        checked.append(
            _checked_message(row, column, index, {"role": roles[turn["from"]], "content": turn.get("value")})
        )
    return _conversation_row(row, column, checked, task)


def _conversation_row(row: _Row, column: str, checked: list[dict[str, str]], task: Task) -> dict[str, Any]:
    """Checked chat messages as a messages row: the task's system text first, a user turn, the answer last."""
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
    prompt = wrapped_prompt(_prompt_text(row, task), task)
    chosen = row.text(task.data.column("chosen"), "mapped by data.fields.chosen")
    rejected = row.text(task.data.column("rejected"), "mapped by data.fields.rejected")
    if chosen.strip() == rejected.strip():
        raise row.error(f"chosen and rejected are the same ({chosen.strip()!r}); a preference needs two answers")
    if task.template.chat:
        chosen_answer, rejected_answer = [_message("assistant", chosen)], [_message("assistant", rejected)]
    else:
        chosen_answer, rejected_answer = chosen, rejected
    return {"prompt": prompt, "chosen": chosen_answer, "rejected": rejected_answer, REFERENCE_COLUMN: chosen.strip()}
