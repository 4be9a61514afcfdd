"""Task files: defaults, validation messages (file + key + what was expected), overrides, round trip."""

from pathlib import Path
from typing import get_args

import pytest

from lmdiff_ft.cli import main
from lmdiff_ft.errors import UserError
from lmdiff_ft.schema.load import load_task
from lmdiff_ft.schema.task import Task, parse_layers, template_fields

MINIMAL = """\
name: qa
base: tiny
data:
  train: data/train.jsonl
"""


def write_task(directory: Path, text: str, name: str = "task.yaml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load_error(directory: Path, text: str, overrides: list[str] = ()) -> str:
    with pytest.raises(UserError) as info:
        load_task(write_task(directory, text), overrides)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(directory / "task.yaml") + ": ")
    return message


def test_minimal_task_gets_every_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_task(tmp_path / "tasks", MINIMAL)
    task = load_task(path)
    assert task.name == "qa" and task.source_path == path
    assert (task.base.path, task.base.seed, task.base.convert_from_llama) == ("tiny", 0, False)
    assert (task.quantization, task.dtype) == ("auto", "auto")
    assert task.adapter.presets == ["diff_attn", "lambda"]
    assert (task.adapter.r, task.adapter.alpha, task.adapter.dropout, task.adapter.layers) == (16, 32, 0.05, None)
    assert task.data.train.path == str(tmp_path / "tasks" / "data" / "train.jsonl")  # against the task's directory
    assert (task.data.train.split, task.data.eval, task.data.eval_fraction) == ("train", None, 0.1)
    assert task.data.format == "prompt_completion"
    assert task.data.fields == {
        "prompt": "prompt",
        "completion": "completion",
        "chosen": "chosen",
        "rejected": "rejected",
    }
    assert (task.template.chat, task.template.prompt, task.template.system) == (True, None, None)
    assert (task.train.epochs, task.train.lr, task.train.lr_scheduler, task.train.optim) == (
        3.0,
        2e-4,
        "cosine",
        "adamw_torch",
    )
    assert (task.train.batch_size, task.train.max_length, task.train.save_total_limit) == (8, 512, 2)
    assert task.eval.metrics == ["exact_match", "rouge_l"] and task.eval.num_samples == 50
    assert task.preference is None
    assert task.output_dir == "runs/qa"


def test_full_task_is_read_as_written(tmp_path):
    text = (
        MINIMAL.replace("base: tiny", "base: {path: org/model, convert_from_llama: true}")
        + """\
  eval: {path: squad, split: validation, name: plain_text}
  fields: {prompt: question}
  max_samples: 100
adapter: {presets: [diff_attn, mlp], layers: "0,2-3", dora: true}
train: {lr: 5e-5, epochs: 1, eval_steps: 20}
eval: {metrics: accuracy, labels: [planetary, heliophysics]}
preference: {loss_type: ipo}
quantization: nf4
output_dir: out/qa
"""
    )
    task = load_task(write_task(tmp_path, text))
    assert (task.base.path, task.base.convert_from_llama) == ("org/model", True)
    assert (task.data.eval.path, task.data.eval.split, task.data.eval.name) == ("squad", "validation", "plain_text")
    assert task.data.fields["prompt"] == "question" and task.data.max_samples == 100
    assert task.adapter.layers == [0, 2, 3] and task.adapter.dora is True
    assert task.train.lr == 5e-5 and isinstance(task.train.epochs, float) and task.train.eval_steps == 20
    assert task.eval.metrics == ["accuracy"] and task.eval.labels == ["planetary", "heliophysics"]
    assert task.preference.loss_type == ["ipo"] and task.preference.beta == 0.1
    assert (task.quantization, task.output_dir) == ("nf4", "out/qa")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "trian: {lr: 1}\n", "unknown key 'trian' (did you mean 'train'?)"),
        (MINIMAL + "train: {lrr: 1.0e-4}\n", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        (MINIMAL.replace("train: data", "trian: data"), "unknown key 'data.trian' (did you mean 'data.train'?)"),
        (MINIMAL + "adaptor: {r: 8}\n", "unknown key 'adaptor' (did you mean 'adapter'?)"),
    ],
)
def test_unknown_keys_suggest_the_closest(tmp_path, text, expected):
    assert expected in load_error(tmp_path, text)


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("train: {lr: fast}", "train.lr: expected a number, got 'fast'"),
        ("train: {batch_size: true}", "train.batch_size: expected an integer, got true"),
        ("train: {batch_size: 8.5}", "train.batch_size: expected an integer, got 8.5"),
        ("train: {packing: 'yes'}", "train.packing: expected true or false, got 'yes'"),
        ("train: {lr: -1}", "train.lr: expected a number > 0, got -1.0"),
        ("train: {eval_steps: often}", "train.eval_steps: expected an integer or null, got 'often'"),
        ("train: {lr_scheduler: cosin}", "train.lr_scheduler: expected one of linear, cosine, constant, "),
        ("train: {optim: adamw_trch}", "train.optim: expected a transformers optimizer name, got 'adamw_trch' (did"),
        ("train: 5", "train: expected a mapping with keys epochs, max_steps"),
        ("quantization: nf5", "quantization: expected one of auto, nf4, fp4, int8, none, got 'nf5' (did you mean"),
        ("adapter: {presets: [diff_atn]}", "adapter.presets[0]: expected one of diff_attn, attn, lambda,"),
        ("adapter: {presets: []}", "adapter.presets: expected a list that is not empty, got []"),
        ("adapter: {dropout: 1.5}", "adapter.dropout: expected a number in [0, 1), got 1.5"),
        ("adapter: {layers: 5-2}", "adapter.layers: expected ascending ranges, got '5-2'"),
        ("eval: {metrics: [exact_match, bleu]}", "eval.metrics[1]: expected one of loss, perplexity, exact_match"),
        ("eval: {top_p: 0}", "eval.top_p: expected a number in (0, 1], got 0.0"),
        ("preference: {loss_type: sigmod}", "preference.loss_type[0]: expected one of sigmoid, hinge, ipo"),
        ("preference: {loss_type: [sigmoid, sft], loss_weights: [1.0]}", "one weight per loss_type (2), got 1"),
        ("dtype: fp16", "dtype: expected one of auto, float32, bfloat16, float16, got 'fp16'"),
    ],
)
def test_wrong_values_name_the_dotted_key_and_the_expectation(tmp_path, section, expected):
    assert expected in load_error(tmp_path, MINIMAL + section + "\n")


def test_enum_errors_suggest_the_closest(tmp_path):
    assert "(did you mean 'diff_attn'?)" in load_error(tmp_path, MINIMAL + "adapter: {presets: [diff_atn]}\n")
    assert "(did you mean 'sigmoid'?)" in load_error(tmp_path, MINIMAL + "preference: {loss_type: sigmod}\n")


def test_every_dpo_loss_type_of_trl_is_accepted(tmp_path):
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    names = help_text.split("Possible values are: ")[1].split(". If")[0].replace("`", "").replace("'", "").split(", ")
    assert len(names) == 15
    for name in names:
        task = load_task(write_task(tmp_path, MINIMAL), [f"preference.loss_type={name}"])
        assert task.preference.loss_type == [name]


def test_numbers_without_a_dot_and_ints_are_floats(tmp_path):
    task = load_task(write_task(tmp_path, MINIMAL + "train: {lr: 2e-4, epochs: 2, weight_decay: 1E-2}\n"))
    assert task.train.lr == 2e-4 and task.train.epochs == 2.0 and task.train.weight_decay == 0.01


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL.replace("name: qa\n", ""), "missing required key 'name'"),
        (MINIMAL.replace("name: qa", "name:"), "missing required key 'name'"),
        (MINIMAL.replace("base: tiny\n", ""), "missing required key 'base'"),
        (MINIMAL.replace("name: qa", "name: my task"), "name: expected a string made of letters, digits"),
        ("name: qa\nbase: tiny\n", "missing required key 'data.train'"),
        ("name: qa\nbase: tiny\ndata: {format: text}\n", "missing required key 'data.train'"),
        ("name: qa\nbase: tiny\ndata: {train: }\n", "missing required key 'data.train'"),
    ],
)
def test_missing_required_keys_are_named(tmp_path, text, expected):
    assert expected in load_error(tmp_path, text)


def test_yaml_syntax_error_gives_the_line(tmp_path):
    message = load_error(tmp_path, MINIMAL + "train:\n  lr: [1, 2\n  epochs: 3\n")
    assert "invalid YAML at line 7" in message


def test_duplicate_keys_are_refused_with_the_line(tmp_path):
    message = load_error(tmp_path, MINIMAL + "train: {lr: 1.0}\ntrain: {epochs: 1}\n")
    assert "invalid YAML at line 6" in message and "duplicate key 'train'" in message


@pytest.mark.parametrize(
    ("text", "expected"), [("", "got an empty file"), ("- name: qa\n", "expected a mapping of task keys")]
)
def test_top_level_must_be_a_mapping(tmp_path, text, expected):
    assert expected in load_error(tmp_path, text)


def test_missing_task_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.yaml: task file not found"):
        load_task(tmp_path / "nope.yaml")


def test_overrides_parse_values_as_yaml(tmp_path):
    overrides = [
        "train.lr=1e-4",
        "adapter.r=32",
        "adapter.presets=[diff_attn,mlp]",
        "eval.num_samples=10",
        "train.gradient_checkpointing=false",
        "template.system=Answer: briefly",  # a string field takes the text as written
        "base.seed=3",  # the string form `base: tiny` becomes a mapping
        "data.fields.prompt=question",
        "adapter.layers=0-1",
        "train.eval_steps=",  # empty = null
        "preference.beta=0.2",  # creates the section
    ]
    task = load_task(write_task(tmp_path, MINIMAL + "train: {eval_steps: 5}\n"), overrides)
    assert task.train.lr == 1e-4 and task.adapter.r == 32 and task.adapter.presets == ["diff_attn", "mlp"]
    assert task.eval.num_samples == 10 and task.train.gradient_checkpointing is False
    assert task.template.system == "Answer: briefly"
    assert (task.base.path, task.base.seed) == ("tiny", 3)
    assert task.data.fields["prompt"] == "question" and task.adapter.layers == [0, 1]
    assert task.train.eval_steps is None and task.preference.beta == 0.2


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrr=1e-4", "override 'train.lrr=1e-4': unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ("trian.lr=1e-4", "unknown key 'trian' (did you mean 'train'?)"),
        ("adapter.r.x=1", "override 'adapter.r.x=1': 'adapter.r' takes a value, not sub-keys"),
        ("train.lr", "override 'train.lr': expected key=value, e.g. train.lr=1e-4"),
        ("adapter.r=big", "adapter.r: expected an integer, got 'big'"),
        ("train.batch_size=[1", "override 'train.batch_size=[1': invalid YAML value"),
    ],
)
def test_bad_overrides_are_named(tmp_path, override, expected):
    assert expected in load_error(tmp_path, MINIMAL, [override])


def test_resolved_yaml_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = MINIMAL + "adapter: {layers: '1-2'}\npreference: {}\ntemplate: {system: '1e5', prompt: 'Q: {prompt}'}\n"
    task = load_task(write_task(tmp_path / "tasks", text), ["train.lr=3e-5"])
    resolved = write_task(tmp_path / "runs" / "qa", task.to_yaml(), "resolved_task.yaml")
    again = load_task(resolved)
    assert again == task and again.to_dict() == task.to_dict()
    assert again.template.system == "1e5"  # a string that reads like a number stays a string
    assert "source_path" not in task.to_dict() and task.to_dict()["data"]["train"]["path"].startswith("/")


@pytest.mark.parametrize(
    ("spec", "layers"),
    [
        ("12-21", list(range(12, 22))),
        ("0,2,5-7", [0, 2, 5, 6, 7]),
        (" 3 - 4 , 1 ", [1, 3, 4]),
        (3, [3]),
        ([5, 1, 1], [1, 5]),
        (None, None),
    ],
)
def test_parse_layers(spec, layers):
    assert parse_layers(spec) == layers


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("7-5", "expected ascending ranges, got '7-5'"),
        ("a", "expected layer indices like"),
        ("", "expected layer indices like"),
        ("1,,2", "expected layer indices like"),
        ([], "expected layer indices like"),
        ([-1], "expected layer indices like"),
        (True, "expected layer indices like"),
        (["1"], "expected layer indices like"),
    ],
)
def test_parse_layers_rejects(spec, expected):
    with pytest.raises(ValueError, match=expected):
        parse_layers(spec)


def test_template_fields():
    assert template_fields("Q: {question}\nContext: {context!r} {score:.2f}") == ["question", "context", "score"]
    for bad in ("{}", "{0}", "{a.b}", "{oops"):
        with pytest.raises(ValueError):
            template_fields(bad)


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            "  fields: {prompt: question, completion: answer}\ntemplate: {prompt: 'Q: {question} A: {answer}'}",
            "template.prompt: uses column 'answer', which holds the answer (data.fields.completion)",
        ),
        (
            "template: {prompt: 'Text: {label}', completion: ' {label}'}",
            "template.prompt: uses column 'label', which holds the answer (template.completion)",
        ),
        (
            "  fields: {prompt: text, completion: text}",
            "data.fields.prompt: uses column 'text', which holds the answer (data.fields.completion)",
        ),
    ],
)
def test_a_prompt_that_holds_the_answer_is_refused(tmp_path, section, expected):
    assert expected in load_error(tmp_path, MINIMAL + section + "\n")


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("template: {prompt: 'Q: {'}", "template.prompt: not a valid format string"),
        ("template: {completion: ' {}'}", "template.completion: placeholder {} must name a column"),
        ("  format: messages\ntemplate: {chat: false}", "template.chat: data.format 'messages' needs chat: true"),
        ("  format: text\ntemplate: {prompt: '{text}'}", "template.prompt: not used with data.format 'text'"),
        ("  fields: {answer: label}", "unknown key 'data.fields.answer'"),
        ("  format: alpaca\n  fields: {prompt: q}", "unknown key 'data.fields.prompt'"),
        ("  format: alpaca\npreference: {}", "data.format: preference (DPO) data needs 'prompt_completion'"),
        ("  eval_fraction: 1", "data.eval_fraction: expected a number in (0, 1), got 1.0"),
        ("template: {completion: ' {x}'}\npreference: {}", "template.completion: not used by preference data"),
        ("train: {packing: true}\npreference: {}", "train.packing: SFT only"),
    ],
)
def test_format_and_template_rules(tmp_path, section, expected):
    assert expected in load_error(tmp_path, MINIMAL + section + "\n")


SOURCES = "name: qa\nbase: tiny\ndata:\n  train:\n    - a.jsonl\n    - {path: b.jsonl, format: sharegpt, weight: 1}\n"


NEW_KEY_ERRORS = [
        # several sources (issue 23)
        ("name: qa\nbase: tiny\ndata: {train: []}\n", "data.train: expected a mapping that is not empty, got []"),
        ("name: qa\nbase: tiny\ndata: {train: [a.jsonl, 5]}\n", "data.train[1]: expected a string or a mapping"),
        ("name: qa\nbase: tiny\ndata: {train: [{path: a.jsonl, format: shargpt}]}\n",
         "data.train[0].format: expected one of messages, sharegpt"),
        ("name: qa\nbase: tiny\ndata: {train: [{path: a.jsonl, weight: 0}]}\n",
         "data.train[0].weight: expected a number > 0, got 0.0"),
        ("name: qa\nbase: tiny\ndata: {train: [{pth: a.jsonl}]}\n", "unknown key 'data.train[0].pth'"),
        ("name: qa\nbase: tiny\ndata: {train: [{path: a.jsonl, format: sharegpt, fields: {messages: m}}]}\n",
         "unknown key 'data.train[0].fields.messages': data.train[0].format 'sharegpt' maps conversations"),
        ("name: qa\nbase: tiny\ndata: {train: a.jsonl, eval: {path: b.jsonl, weight: 2}}\n",
         "data.eval.weight: weights mix several train sources"),
        ("name: qa\nbase: tiny\ndata: {train: [a.jsonl, {path: b.jsonl, format: text}]}\n",
         "data.train[1].format: 'text' rows cannot be mixed with other formats (prompt_completion)"),
        (SOURCES + "template: {chat: false}\n", "template.chat: data.format 'sharegpt' needs chat: true"),
        (SOURCES + "preference: {}\n", "data.format: preference (DPO) data needs 'prompt_completion'"),
        ("name: qa\nbase: tiny\ndata: {train: a.jsonl, format: sharegpt, sharegpt_roles: {user: []}}\n",
         "data.sharegpt_roles.user: expected a list that is not empty"),
        # loggers, trainer pass-through, evaluation during training, the Hub
        (MINIMAL + "train: {report_to: [tensorboard, wandbb]}\n", "train.report_to[1]: expected one of tensorboard"),
        (MINIMAL + "train: {extra_args: {max_grad_nrom: 0.3}}\n",
         "train.extra_args.max_grad_nrom: not an argument of TRL's SFTConfig (close: max_grad_norm"),
        (MINIMAL + "train: {extra_args: {learning_rate: 0.1}}\n",
         "train.extra_args.learning_rate: set by train.lr; set it there"),
        (MINIMAL + "train: {extra_args: {rpo_alpha: 1}}\n", "train.extra_args.rpo_alpha: not an argument of TRL's"),
        (MINIMAL + "train: {extra_args: [max_grad_norm]}\n", "train.extra_args: expected a mapping"),
        (MINIMAL + "train: {eval_strategy: steps}\n", "train.eval_strategy: 'steps' needs train.eval_steps"),
        (MINIMAL + "train: {load_best_model_at_end: true}\n", "train.load_best_model_at_end: needs evaluation"),
        (MINIMAL + "train: {eval_steps: 5, early_stopping_patience: 2}\n",
         "train.early_stopping_patience: needs train.load_best_model_at_end: true"),
        (MINIMAL + "train: {eval_steps: 5, save_steps: 7, load_best_model_at_end: true}\n",
         "train.save_steps: with load_best_model_at_end, expected a multiple of train.eval_steps (5), got 7"),
        (MINIMAL + "train: {metric_for_best_model: acuracy}\n",
         "train.metric_for_best_model: expected one of loss, exact_match, f1, rouge_l, accuracy, got 'acuracy' "
         "(did you mean 'accuracy'?)"),
        (MINIMAL + "train: {metric_for_best_model: accuracy}\n",
         "train.metric_for_best_model: accuracy is not one of eval.metrics; add it there"),
        (MINIMAL + "train: {eval_steps: 5, metric_for_best_model: exact_match}\n",
         "train.metric_for_best_model: exact_match scores generated answers; set train.eval_generation_samples"),
        (MINIMAL + "train: {eval_generation_samples: 4}\n", "train.eval_generation_samples: needs evaluation during"),
        (MINIMAL + "train: {eval_generation_samples: -1}\n", "train.eval_generation_samples: expected an integer >= 0"),
        (MINIMAL + "preference: {}\ntrain: {eval_steps: 5, eval_generation_samples: 4}\n",
         "train.eval_generation_samples: SFT only (during DPO training the evaluations report the DPO loss"),
        (MINIMAL + "train: {push_to_hub: true}\n", "train.hub_model_id: push_to_hub needs a Hub repo id"),
        (MINIMAL + "train: {push_to_hub: true, hub_model_id: nope}\n", "got 'nope'"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), NEW_KEY_ERRORS)
def test_new_keys_give_one_line_errors(tmp_path, text, expected):
    assert expected in load_error(tmp_path, text)


@pytest.mark.parametrize(("text", "expected"), NEW_KEY_ERRORS)
def test_new_keys_errors_reach_the_command_line_as_one_line_and_exit_2(tmp_path, capsys, text, expected):
    command = "dpo" if "preference:" in text else "sft"
    assert main([command, str(write_task(tmp_path, text)), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert not captured.out and captured.err.count("\n") == 1 and expected in captured.err


def test_an_uninstalled_logger_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    message = load_error(tmp_path, MINIMAL + "train: {report_to: [tensorboard, wandb]}\n")
    assert message.endswith("train.report_to: wandb is not installed (pip install 'lmdiff-ft[loggers]')")


def test_several_sources_resolve_and_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = SOURCES + "  format: prompt_completion\n  fields: {prompt: q}\n"
    task = load_task(write_task(tmp_path, text))
    first, second = task.data.train
    assert first.path == str(tmp_path / "a.jsonl") and first.format is None and first.fields is None
    assert (second.format, second.fields, second.weight) == ("sharegpt", {"conversations": "conversations"}, 1.0)
    again = load_task(write_task(tmp_path, task.to_yaml(), "resolved.yaml"))
    assert again.data == task.data


def test_base_forms(tmp_path):
    model = tmp_path / "models" / "tiny-llama"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    task = load_task(write_task(tmp_path, MINIMAL.replace("base: tiny", "base: models/tiny-llama")))
    assert task.base.path == str(model)  # exists next to the task file: local
    task = load_task(write_task(tmp_path, MINIMAL.replace("base: tiny", "base: TinyLlama/TinyLlama-1.1B")))
    assert task.base.path == "TinyLlama/TinyLlama-1.1B"  # a Hub id is kept as is


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("./models/missing", "base.path: no such directory: "),
        ("/nonexistent/model", "base.path: no such directory: /nonexistent/model"),
        ("data", "base.path: expected a checkpoint directory with config.json"),
        ("not a hub id", "base.path: expected 'tiny' or 'smollm2-135m' or 'smollm2-135m-llama', a checkpoint"),
        ("{seed: 1}", "missing required key 'base.path'"),
        ("5", "base: expected a string or a mapping with 'path', got 5"),
    ],
)
def test_bad_base_is_named(tmp_path, base, expected):
    (tmp_path / "data").mkdir()
    assert expected in load_error(tmp_path, MINIMAL.replace("base: tiny", f"base: {base}"))


def test_init_adapter_must_be_a_finished_adapter_and_names_the_task_that_makes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # init_adapter, like output_dir, is relative to the working directory
    adapter = tmp_path / "runs" / "previous"
    write_task(tmp_path, MINIMAL.replace("name: qa", "name: previous"), name="sft.yaml")
    message = load_error(tmp_path, MINIMAL + "adapter: {init_adapter: runs/previous}\n")
    assert f"adapter.init_adapter: {adapter} is not a finished adapter (no adapter_config.json)" in message
    assert "train it first: lmdiff-ft sft sft.yaml" in message
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    task = load_task(tmp_path / "task.yaml")
    assert task.adapter.init_adapter == str(adapter)


def test_data_sources_local_or_hub(tmp_path):
    text = MINIMAL.replace("data/train.jsonl", "org/dataset") + "  eval: ../shared/eval.csv\n"
    task = load_task(write_task(tmp_path / "tasks", text))
    assert task.data.train.path == "org/dataset"
    assert task.data.eval.path == str(tmp_path / "shared" / "eval.csv")


def test_task_equality_ignores_where_it_was_read(tmp_path):
    first = load_task(write_task(tmp_path, MINIMAL))
    second = load_task(write_task(tmp_path, MINIMAL, "other.yaml"))
    assert first == second and isinstance(first, Task)


def test_every_list_of_choices_comes_from_the_schema(tmp_path, monkeypatch):
    """The schema's `Literal`s are the one source: presets, named bases, quantizations and dtypes elsewhere
    are derived from them (or, for presets and named bases, defined for exactly those names)."""
    from lmdiff_ft.adapters.presets import PRESETS
    from lmdiff_ft.base.loading import DTYPES
    from lmdiff_ft.base.named import named_base_dir
    from lmdiff_ft.base.quantization import QUANTIZATIONS
    from lmdiff_ft.cli import ADAPTER_DEFAULTS
    from lmdiff_ft.cli import QUANTIZATIONS as CLI_QUANTIZATIONS
    from lmdiff_ft.schema.task import AdapterConfig, Dtype, NamedBase, PresetName, Quantization

    assert set(PRESETS) == set(get_args(PresetName))
    assert QUANTIZATIONS == get_args(Quantization) and tuple(CLI_QUANTIZATIONS) == get_args(Quantization)
    assert [*DTYPES, "auto"] == sorted(get_args(Dtype), key=lambda d: d == "auto")
    assert ADAPTER_DEFAULTS == AdapterConfig()
    monkeypatch.setenv("LMDIFF_FT_CACHE", str(tmp_path))
    assert (named_base_dir("tiny") / "config.json").is_file()
    assert set(get_args(NamedBase)) == {"tiny", "smollm2-135m", "smollm2-135m-llama"}  # the others: test_smollm2.py
    with pytest.raises(ValueError, match="no named base"):
        named_base_dir("tinyllama")
