"""The data layer: loading sources, splits, and the exact rows TRL receives; bad rows named by file and row."""

import json
from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from rich.console import Console

from lmdiff_ft.data.rows import REFERENCE_COLUMN, prepare_pairs, prepare_rows, to_preference_rows, to_sft_rows
from lmdiff_ft.data.sources import ROW_COLUMN, SOURCE_COLUMN, load_parts, load_source, source_name
from lmdiff_ft.errors import UserError
from lmdiff_ft.recipes.preview import print_mix
from lmdiff_ft.schema.load import load_task
from lmdiff_ft.schema.task import DataSource, Task
from lmdiff_ft.serve.runs import example_prompts

QA_ROWS = [{"question": f"Question {i}?", "answer": f"Answer {i}"} for i in range(1, 11)]


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Error messages show paths relative to the working directory; run each test from its own."""
    monkeypatch.chdir(tmp_path)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def make_task(tmp_path: Path, rows: list[dict], extra: str = "", data: str = "") -> Task:
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    text = f"name: t\nbase: tiny\ndata:\n  train: data/train.jsonl\n{data}{extra}"
    (tmp_path / "task.yaml").write_text(text, encoding="utf-8")
    return load_task(tmp_path / "task.yaml")


def sft_rows(tmp_path: Path, rows: list[dict], extra: str = "", data: str = "") -> list[dict]:
    task = make_task(tmp_path, rows, extra, data)
    return to_sft_rows(load_source(task.data.train, "train"), task, source_name(task, "train")).to_list()


def load_splits(task: Task) -> tuple[Dataset, Dataset]:
    """One source's train rows and held-out rows (its split, or data.eval), raw."""
    (part,), eval_parts = load_parts(task)
    return part.train, eval_parts[0].train if eval_parts else part.eval


def sft_error(tmp_path: Path, rows: list[dict], extra: str = "", data: str = "") -> str:
    with pytest.raises(UserError) as info:
        sft_rows(tmp_path, rows, extra, data)
    assert "\n" not in str(info.value)
    return str(info.value)


# --- loading -------------------------------------------------------------------------------------------


def test_load_jsonl_numbers_rows(tmp_path):
    dataset = load_source(DataSource(path=str(write_jsonl(tmp_path / "qa.jsonl", QA_ROWS[:3]))), "train")
    assert dataset.to_list()[2] == {"question": "Question 3?", "answer": "Answer 3", ROW_COLUMN: 3}


def test_load_csv_parquet_json_and_saved_directories(tmp_path):
    rows = Dataset.from_list(QA_ROWS[:4])
    rows.to_csv(tmp_path / "qa.csv", index=False)
    rows.to_parquet(tmp_path / "qa.parquet")
    (tmp_path / "qa.json").write_text(json.dumps(QA_ROWS[:4]))
    rows.save_to_disk(tmp_path / "saved")
    DatasetDict({"train": rows, "test": rows.select([0])}).save_to_disk(tmp_path / "saved_dict")
    for name in ("qa.csv", "qa.parquet", "qa.json", "saved"):
        dataset = load_source(DataSource(path=str(tmp_path / name)), "train")
        assert dataset.remove_columns(ROW_COLUMN).to_list() == QA_ROWS[:4], name
    assert len(load_source(DataSource(path=str(tmp_path / "saved_dict"), split="test"), "eval")) == 1


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.jsonl", None, "missing.jsonl: file not found (data.train)"),
        ("empty.jsonl", "", "empty.jsonl: the file has no rows (data.train)"),
        ("header.csv", "question,answer\n", "header.csv: the file has no rows (data.train)"),
        (
            "bad.jsonl",
            '{"a": 1}\n{"a": \n',
            "bad.jsonl: cannot read it as JSON (data.train): line 2: invalid JSON (Expecting value)",
        ),
        ("notes.txt", "hello\n", "notes.txt: expected a .jsonl, .json, .csv or .parquet file (data.train)"),
    ],
)
def test_bad_sources_name_the_file_and_key(tmp_path, name, content, expected):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(UserError) as info:
        load_source(DataSource(path=str(tmp_path / name)), "train")
    assert str(info.value) == expected


def test_a_directory_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match=r"^folder: expected a dataset saved by save_to_disk .*\(data\.eval\)$"):
        load_source(DataSource(path=str(tmp_path / "folder")), "eval")


def test_split_and_name_do_not_apply_to_a_local_file(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    with pytest.raises(UserError, match=r"^qa\.jsonl: data\.train\.split and data\.train\.name apply to Hub datasets"):
        load_source(DataSource(path=str(path), split="test"), "train")


def test_an_unreachable_hub_dataset_is_a_user_error():  # conftest.py sets HF_HUB_OFFLINE=1
    with pytest.raises(UserError, match=r"^someorg/somedata: not a local file, and loading it as a Hub dataset"):
        load_source(DataSource(path="someorg/somedata"), "train")


def test_eval_fraction_split_is_seeded_and_keeps_file_row_numbers(tmp_path):
    task = make_task(tmp_path, QA_ROWS, data="  eval_fraction: 0.3\n")
    train, evaluation = load_splits(task)
    assert (len(train), len(evaluation)) == (7, 3)
    again_train, again_eval = load_splits(task)
    assert evaluation.to_list() == again_eval.to_list() and train.to_list() == again_train.to_list()
    for row in train.to_list() + evaluation.to_list():
        assert row["question"] == f"Question {row[ROW_COLUMN]}?"
    assert sorted(row[ROW_COLUMN] for row in train.to_list() + evaluation.to_list()) == list(range(1, 11))
    assert source_name(task, "eval") == "data/train.jsonl"


def test_eval_file_and_max_samples(tmp_path):
    write_jsonl(tmp_path / "data" / "eval.jsonl", QA_ROWS[:2])
    task = make_task(tmp_path, QA_ROWS, data="  eval: data/eval.jsonl\n  max_samples: 4\n")
    train, evaluation = load_splits(task)
    assert [row[ROW_COLUMN] for row in train] == [1, 2, 3, 4] and len(evaluation) == 2
    assert source_name(task, "eval") == "data/eval.jsonl"


def test_too_few_rows_to_split(tmp_path):
    task = make_task(tmp_path, QA_ROWS[:1])
    with pytest.raises(UserError, match=r"^data/train\.jsonl: 1 row\(s\) are too few to hold out data\.eval_fraction"):
        load_splits(task)


# --- SFT rows, one test per format, exact structure ----------------------------------------------------


def test_prompt_completion_chat_rows(tmp_path):
    rows = sft_rows(
        tmp_path,
        QA_ROWS[:1],
        extra="template: {system: Be brief.}\n",
        data="  fields: {prompt: question, completion: answer}\n",
    )
    assert rows == [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Question 1?"}],
            "completion": [{"role": "assistant", "content": "Answer 1"}],
            REFERENCE_COLUMN: "Answer 1",
        }
    ]


def test_classification_rows_with_templates_and_plain_text(tmp_path):
    rows = [{"description": "Cassini orbited Saturn.", "label": "planetary", "id": 7}]
    extra = 'template:\n  prompt: "Mission: {description} (#{id})\\nType:"\n  completion: " {label}"\n  chat: false\n'
    assert sft_rows(tmp_path, rows, extra) == [
        {
            "prompt": "Mission: Cassini orbited Saturn. (#7)\nType:",
            "completion": " planetary",
            REFERENCE_COLUMN: "planetary",
        }
    ]


def test_plain_rows_put_the_system_prompt_first(tmp_path):
    rows = [{"prompt": "Hi", "completion": "Hello"}]
    assert sft_rows(tmp_path, rows, "template: {system: Sys, chat: false}\n") == [
        {"prompt": "Sys\n\nHi", "completion": "Hello", REFERENCE_COLUMN: "Hello"}
    ]


def test_alpaca_rows_drop_the_blank_part_when_input_is_empty(tmp_path):
    rows = [
        {"instruction": "Translate.", "input": "bonjour", "output": "hello"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Count.", "output": 3},  # no input key at all; a number answer becomes text
    ]
    result = sft_rows(tmp_path, rows, "template: {chat: false}\n", "  format: alpaca\n")
    assert [(r["prompt"], r["completion"]) for r in result] == [
        ("Translate.\n\nbonjour", "hello"),
        ("Say hi.", "hi"),
        ("Count.", "3"),
    ]


def test_messages_rows_are_checked_and_get_the_system_prompt(tmp_path):
    conversation = [
        {"role": "user", "content": "Hi", "name": "ann"},
        {"role": "assistant", "content": "Hello!"},
    ]
    result = sft_rows(
        tmp_path,
        [{"chat": conversation}],
        "template: {system: Sys}\n",
        "  format: messages\n  fields: {messages: chat}\n",
    )
    assert result == [
        {
            "messages": [
                {"role": "system", "content": "Sys"},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ],
            REFERENCE_COLUMN: "Hello!",
        }
    ]


def test_text_rows(tmp_path):
    assert sft_rows(tmp_path, [{"body": "Some text."}], data="  format: text\n  fields: {text: body}\n") == [
        {"text": "Some text."}
    ]


# --- SFT row errors: file, 1-based row, field and the key that mapped it -------------------------------


QA_FIELDS = "  fields: {prompt: question, completion: answer}\n"


def test_a_row_missing_a_field_is_named(tmp_path):
    rows = [*QA_ROWS[:2], {"question": "Question 3?"}]
    assert sft_error(tmp_path, rows, data=QA_FIELDS) == (
        "data/train.jsonl: row 3: missing field 'answer' (mapped by data.fields.completion)"
    )


def test_row_numbers_stay_those_of_the_file_after_the_split(tmp_path):
    rows = [*QA_ROWS, {"question": "Question 11?", "answer": ""}]
    task = make_task(tmp_path, rows, data=QA_FIELDS + "  eval_fraction: 0.5\n")
    train, evaluation = load_splits(task)
    bad = train if 11 in list(train[ROW_COLUMN]) else evaluation
    with pytest.raises(UserError) as info:
        to_sft_rows(bad, task, source_name(task, "train"))
    assert str(info.value) == "data/train.jsonl: row 11: field 'answer' is empty (mapped by data.fields.completion)"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"question": None, "answer": "a"}, "row 1: missing field 'question' (mapped by data.fields.prompt)"),
        ({"question": "  ", "answer": "a"}, "row 1: field 'question' is empty (mapped by data.fields.prompt)"),
        ({"question": "q", "answer": ["a"]}, "row 1: field 'answer' must be a string, got list (mapped by data.fi"),
        ({"question": "q", "answer": True}, "row 1: field 'answer' must be a string, got bool"),
    ],
)
def test_bad_values_are_named(tmp_path, row, expected):
    assert sft_error(tmp_path, [row], data=QA_FIELDS).startswith("data/train.jsonl: " + expected)


def test_a_column_absent_from_every_row_lists_the_columns(tmp_path):
    assert sft_error(tmp_path, QA_ROWS, data="  fields: {prompt: question, completion: response}\n") == (
        "data/train.jsonl: no column 'response' (mapped by data.fields.completion); the columns are question, answer"
    )


def test_template_placeholders_need_their_columns(tmp_path):
    rows = [{"q": "x", "answer": "a"}, {"answer": "b"}]
    extra = "template: {prompt: 'Q: {q}'}\n"
    message = sft_error(tmp_path, rows, extra, "  fields: {completion: answer}\n")
    assert message == "data/train.jsonl: row 2: missing field 'q' (used by template.prompt)"
    message = sft_error(tmp_path, QA_ROWS, "template: {prompt: 'Q: {query}'}\n", "  fields: {completion: answer}\n")
    assert message.startswith("data/train.jsonl: no column 'query' (used by template.prompt)")


def test_a_format_spec_that_does_not_fit_the_value(tmp_path):
    extra = "template: {prompt: 'Q: {question:.2f}'}\n"
    message = sft_error(tmp_path, QA_ROWS[:1], extra, "  fields: {completion: answer}\n")
    assert message.startswith("data/train.jsonl: row 1: template.prompt: Unknown format code 'f'")


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"role": "user", "content": "Hi"}], "row 1: messages: the last message must be the assistant's"),
        ([{"role": "assistant", "content": "Hi"}], "row 1: messages: no user message"),
        (
            [{"role": "bot", "content": "Hi"}],
            "row 1: messages[0]: role must be one of system, user, assistant, got 'bot'",
        ),
        ([{"role": "user", "content": ""}], "row 1: messages[0]: content must be a non-empty string, got ''"),
    ],
)
def test_bad_conversations_are_named(tmp_path, messages, expected):
    assert sft_error(tmp_path, [{"messages": messages}], data="  format: messages\n").startswith(
        "data/train.jsonl: " + expected
    )


def test_the_answer_cannot_leak_into_the_prompt(tmp_path):
    with pytest.raises(UserError) as info:
        make_task(tmp_path, QA_ROWS, "template: {prompt: '{question} {answer}'}\n", QA_FIELDS)
    assert str(info.value) == (
        f"{tmp_path / 'task.yaml'}: template.prompt: uses column 'answer', which holds the answer "
        "(data.fields.completion); the model would see the answer in its prompt"
    )


# --- preference rows -----------------------------------------------------------------------------------

PAIRS = [{"prompt": "Which rocket?", "chosen": "Saturn V", "rejected": "Atlas"}]


def preference_rows(tmp_path: Path, rows: list[dict], extra: str = "") -> list[dict]:
    task = make_task(tmp_path, rows, extra + "preference: {beta: 0.2}\n")
    return to_preference_rows(load_source(task.data.train, "train"), task, source_name(task, "train")).to_list()


def test_preference_rows_chat(tmp_path):
    assert preference_rows(tmp_path, PAIRS, "template: {system: Sys}\n") == [
        {
            "prompt": [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Which rocket?"}],
            "chosen": [{"role": "assistant", "content": "Saturn V"}],
            "rejected": [{"role": "assistant", "content": "Atlas"}],
            REFERENCE_COLUMN: "Saturn V",
        }
    ]


def test_preference_rows_plain_with_a_prompt_template(tmp_path):
    assert preference_rows(tmp_path, PAIRS, 'template: {chat: false, prompt: "Q: {prompt}\\nA:"}\n') == [
        {"prompt": "Q: Which rocket?\nA:", "chosen": "Saturn V", "rejected": "Atlas", REFERENCE_COLUMN: "Saturn V"}
    ]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "p", "chosen": "GPM", "rejected": "GPM "}, "row 2: chosen and rejected are the same ('GPM')"),
        ({"prompt": "p", "chosen": "GPM", "rejected": ""}, "row 2: field 'rejected' is empty (mapped by data.fie"),
        ({"prompt": "p", "chosen": "GPM"}, "row 2: missing field 'rejected' (mapped by data.fields.rejected)"),
    ],
)
def test_bad_preference_rows_are_named(tmp_path, row, expected):
    with pytest.raises(UserError) as info:
        preference_rows(tmp_path, [*PAIRS, row])
    assert str(info.value).startswith("data/train.jsonl: " + expected)


def test_preference_rows_need_the_prompt_completion_format(tmp_path):
    task = make_task(tmp_path, [{"instruction": "i", "output": "o"}], data="  format: alpaca\n")
    with pytest.raises(UserError) as info:
        to_preference_rows(load_source(task.data.train, "train"), task, "x")
    assert str(info.value) == (
        f"{tmp_path / 'task.yaml'}: data.format: preference (DPO) data needs 'prompt_completion' "
        "(prompt, chosen and rejected columns), got 'alpaca'"
    )


# --- ShareGPT -------------------------------------------------------------------------------------------


LAST_TURN = "(it is the answer trained on)"


def sharegpt(*turns: tuple[str, str]) -> dict:
    return {"conversations": [{"from": who, "value": text} for who, text in turns]}


def test_sharegpt_rows_map_their_roles(tmp_path):
    row = sharegpt(("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello!"), ("human", "Bye"), ("gpt", "Bye!"))
    result = sft_rows(tmp_path, [row], data="  format: sharegpt\n")
    roles = [(m["role"], m["content"]) for m in result[0]["messages"]]
    assert roles == [
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello!"),
        ("user", "Bye"),
        ("assistant", "Bye!"),
    ]
    assert result[0][REFERENCE_COLUMN] == "Bye!"


def test_sharegpt_roles_and_column_are_configurable(tmp_path):
    row = {"chat": [{"from": "USER", "value": "Hi"}, {"from": "BOT", "value": "Hello!"}]}
    data = "  format: sharegpt\n  fields: {conversations: chat}\n  sharegpt_roles: {user: [USER], assistant: [BOT]}\n"
    result = sft_rows(tmp_path, [row], "template: {system: Sys}\n", data)
    assert [m["role"] for m in result[0]["messages"]] == ["system", "user", "assistant"]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (sharegpt(("human", "Hi"), ("bard", "Hello")),
         "row 1: conversations[1]: 'from' must be one of system, human, user, gpt, assistant (data.sharegpt_roles), "
         "got 'bard'"),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt"}]},
         "row 1: conversations[1]: content must be a non-empty string, got None"),
        ({"conversations": ["Hi", "Hello"]}, "row 1: conversations[0]: expected a {from, value} mapping, got str"),
        ({"conversations": "Hi"}, "row 1: field 'conversations' must be a list of {from, value} turns, got str"),
        (sharegpt(("gpt", "Hello"), ("human", "Hi")),
         "row 1: conversations: the last message must be the assistant's " + LAST_TURN),
        ({"dialogue": []}, "no column 'conversations' (mapped by data.fields.conversations); the columns are dialogue"),
    ],
)  # fmt: skip
def test_bad_sharegpt_rows_are_named(tmp_path, row, expected):
    assert sft_error(tmp_path, [row], data="  format: sharegpt\n") == "data/train.jsonl: " + expected


# --- several sources ------------------------------------------------------------------------------------


def mixed_task(tmp_path: Path, train: str, seed: int = 42) -> Task:
    write_jsonl(tmp_path / "qa.jsonl", [{"prompt": f"Q{i}?", "completion": f"A{i}"} for i in range(20)])
    write_jsonl(tmp_path / "chat.jsonl", [sharegpt(("human", f"Hi {i}"), ("gpt", f"Hello {i}")) for i in range(10)])
    text = f"name: t\nbase: tiny\ndata:\n  eval_fraction: 0.2\n  train:\n{train}train: {{seed: {seed}}}\n"
    (tmp_path / "task.yaml").write_text(text, encoding="utf-8")
    return load_task(tmp_path / "task.yaml")


WEIGHTED = "    - {path: qa.jsonl, weight: 3}\n    - {path: chat.jsonl, format: sharegpt, weight: 1}\n"


def test_several_sources_mix_by_weight_each_with_its_own_format_and_held_out_rows(tmp_path):
    train, held_out = prepare_rows(mixed_task(tmp_path, WEIGHTED))
    # 16 + 8 train rows after each source's 20% is held out; 3:1 of 24 is 18 (two repeated) and 6 (two dropped)
    assert Counter(train[SOURCE_COLUMN]) == {"qa.jsonl": 18, "chat.jsonl": 6}
    assert Counter(held_out[SOURCE_COLUMN]) == {"qa.jsonl": 4, "chat.jsonl": 2}
    assert len(set(zip(train[SOURCE_COLUMN], train[ROW_COLUMN], strict=True))) == 16 + 6
    held = set(zip(held_out[SOURCE_COLUMN], held_out[ROW_COLUMN], strict=True))
    assert not held & set(zip(train[SOURCE_COLUMN], train[ROW_COLUMN], strict=True))  # never trained on
    first = train.to_list()[train[SOURCE_COLUMN].index("qa.jsonl")]
    assert first["messages"][-1]["role"] == "assistant"  # prompt/completion rows join the chat rows as messages
    assert first[REFERENCE_COLUMN].startswith("A")


def test_the_mix_is_the_same_under_the_same_seed(tmp_path):
    def rows(seed):
        train, _ = prepare_rows(mixed_task(tmp_path, WEIGHTED, seed))
        return list(zip(train[SOURCE_COLUMN], train[ROW_COLUMN], strict=True))

    assert rows(1) == rows(1) and rows(1) != rows(2)
    assert Counter(s for s, _ in rows(2)) == Counter(s for s, _ in rows(1))


def test_without_weights_every_row_of_every_source_once_and_max_samples_per_source(tmp_path):
    plain = "    - qa.jsonl\n    - {path: chat.jsonl, format: sharegpt, max_samples: 3}\n"
    train, _ = prepare_rows(mixed_task(tmp_path, plain))
    assert Counter(train[SOURCE_COLUMN]) == {"qa.jsonl": 16, "chat.jsonl": 3}


def test_the_dry_run_shows_the_mix(tmp_path):
    train, held_out = prepare_rows(mixed_task(tmp_path, WEIGHTED))
    console = Console(record=True, width=200)
    print_mix(train, held_out, console)
    assert console.export_text().splitlines() == [
        "  qa.jsonl: 18 train rows (75% of the mix), 4 eval rows",
        "  chat.jsonl: 6 train rows (25% of the mix), 2 eval rows",
    ]


def test_a_bad_row_of_one_source_names_that_source(tmp_path):
    task = mixed_task(tmp_path, WEIGHTED)
    write_jsonl(tmp_path / "chat.jsonl", [sharegpt(("human", "Hi"), ("gpt", "Hello"))] * 9 + [sharegpt(("human", "x"))])
    with pytest.raises(UserError) as info:
        prepare_rows(task)
    assert (
        str(info.value)
        == "chat.jsonl: row 10: conversations: the last message must be the assistant's (it is the answer trained on)"
    )


def test_eval_sources_of_their_own_formats_and_caps(tmp_path):
    # the same files as eval sources
    eval_sources = "  eval:\n    - qa.jsonl\n    - {path: chat.jsonl, format: sharegpt, max_samples: 4}\n"
    task = mixed_task(tmp_path, WEIGHTED.replace("weight: 3", "weight: 1") + eval_sources)
    train, held_out = prepare_rows(task)
    assert Counter(train[SOURCE_COLUMN]) == {"qa.jsonl": 15, "chat.jsonl": 15}  # all 30 rows trained, 1:1
    assert Counter(held_out[SOURCE_COLUMN]) == {"qa.jsonl": 20, "chat.jsonl": 4}
    console = Console(record=True, width=200)
    print_mix(train, held_out, console)
    assert console.export_text().splitlines() == [
        "  qa.jsonl: 15 train rows (50% of the mix), 20 eval rows",
        "  chat.jsonl: 15 train rows (50% of the mix), 4 eval rows",
    ]


def test_preference_pairs_from_several_sources(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"Q{i}?", "chosen": f"C{i}", "rejected": f"R{i}"} for i in range(10)])
    write_jsonl(tmp_path / "b.jsonl", [{"question": f"P{i}?", "good": f"G{i}", "bad": f"B{i}"} for i in range(10)])
    mapped = "{path: b.jsonl, fields: {prompt: question, chosen: good, rejected: bad}, weight: 1}"
    text = f"name: t\nbase: tiny\ndata:\n  eval_fraction: 0.2\n  train: [{{path: a.jsonl, weight: 3}}, {mapped}]\n"
    (tmp_path / "task.yaml").write_text(text + "preference: {}\n", encoding="utf-8")
    train, held_out = prepare_pairs(load_task(tmp_path / "task.yaml"))
    assert Counter(train[SOURCE_COLUMN]) == {"a.jsonl": 12, "b.jsonl": 4}  # 3:1 of 8 + 8
    assert Counter(held_out[SOURCE_COLUMN]) == {"a.jsonl": 2, "b.jsonl": 2}
    pair = train.to_list()[train[SOURCE_COLUMN].index("b.jsonl")]
    number = pair[ROW_COLUMN] - 1  # each pair still knows its row in its file
    assert pair["prompt"][-1]["content"] == f"P{number}?" and pair["chosen"][0]["content"] == f"G{number}"
    assert pair["rejected"][0]["content"] == f"B{number}"


def test_the_apps_example_prompts_come_from_every_held_out_source(tmp_path):
    """The app's example prompts: each source's held-out rows in turn, as a user would type them."""
    task = mixed_task(tmp_path, WEIGHTED)
    prompts = example_prompts(task, limit=8)  # 4 held out of qa.jsonl, 2 of chat.jsonl
    assert [p[0] for p in prompts] == list("QQQQHH") and prompts[-1].startswith("Hi ")
    assert example_prompts(task, limit=3) == prompts[:3]
