"""A task's data in: local JSONL/JSON/CSV/Parquet, a saved `datasets` directory, or a Hub id, split into train and
eval rows, each row numbered as in its source so that errors can name it."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from ..errors import UserError, first_line
from ..schema.load import local_path
from ..schema.task import DataSource, Task

ROW_COLUMN = "__row__"  # 1-based row number in the source, added by load_source, dropped by to_*_rows
SOURCE_COLUMN = "__source__"  # with several sources: the source a prepared row came from
SPLIT_SEED = 0  # fixed, so every run of a task (whatever train.seed) evaluates on the same rows
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


def source_name(task: Task, role: str) -> str:
    """Where the rows of `role` ('train' or 'eval') come from, as error messages name it."""
    sources = task.data.sources("eval") if role == "eval" and task.data.eval is not None else task.data.sources("train")
    return " + ".join(_display(source.path) for source in sources)


@dataclass
class Part:
    """One source's rows: its train rows (after its max_samples) and, without data.eval, its held-out rows."""

    key: str  # data.train, or data.train[1] in a list
    source: DataSource
    train: Dataset
    eval: Dataset | None

    @property
    def name(self) -> str:
        return _display(self.source.path)


def load_parts(task: Task) -> tuple[list[Part], list[Part]]:
    """Every train source (each split into train and eval rows when there is no data.eval) and every eval source.
    Each source is split on its own, so a mix never trains on another source's held-out rows."""
    many = isinstance(task.data.train, list)
    parts = []
    for index, source in enumerate(task.data.sources("train")):
        key = f"data.train[{index}]" if many else "data.train"
        rows = load_source(source, "train", key)
        held_out = None
        if task.data.eval is None:
            rows, held_out = _split(rows, task, source)
        parts.append(Part(key, source, _first(rows, source.max_samples or task.data.max_samples), held_out))
    eval_many = isinstance(task.data.eval, list)
    eval_parts = [
        Part(key, source, _first(load_source(source, "eval", key), source.max_samples), None)
        for index, source in enumerate(task.data.sources("eval"))
        for key in [f"data.eval[{index}]" if eval_many else "data.eval"]
    ]
    return parts, eval_parts


def _first(rows: Dataset, limit: int | None) -> Dataset:
    return rows if limit is None else rows.select(range(min(len(rows), limit)))


def load_source(source: DataSource, role: str, key: str | None = None) -> Dataset:
    """Load one data source (`data.<role>`, or the `key` of one of several), with 1-based row numbers in ROW_COLUMN."""
    key = key or f"data.{role}"
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


def _split(train: Dataset, task: Task, source: DataSource) -> tuple[Dataset, Dataset]:
    fraction = task.data.eval_fraction
    if len(train) - math.ceil(fraction * len(train)) < 1:
        raise UserError(
            f"{_display(source.path)}: {len(train)} row(s) are too few to hold out "
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
