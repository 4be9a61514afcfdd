"""`lmdiff-ft sft`: label masking per data format, user errors, a short end-to-end run, resume after kill -9."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmdiff_ft.base.loading import load_base
from lmdiff_ft.cli import main
from lmdiff_ft.errors import UserError
from lmdiff_ft.model import modeling_lmdiff
from lmdiff_ft.recipes import common, sft
from lmdiff_ft.recipes.common import use_gradient_checkpointing
from lmdiff_ft.recipes.preview import packed_examples
from lmdiff_ft.recipes.sft import run_sft
from lmdiff_ft.schema.load import load_task

QA = [{"question": f"What is fact number {i} about Mars?", "answer": f"Fact {i}"} for i in range(16)]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_task(tmp_path, base, body: str, name: str = "qa") -> str:
    task = tmp_path / f"{name}.yaml"
    task.write_text(f"name: {name}\nbase: {base}\nquantization: none\noutput_dir: {tmp_path / 'runs' / name}\n" + body)
    return str(task)


QA_BODY = """
adapter: {r: 8, alpha: 16, dropout: 0.0}
data: {train: qa.jsonl, eval_fraction: 0.25, format: prompt_completion, fields: {prompt: question, completion: answer}}
train: {max_steps: 4, batch_size: 4, lr: 5.0e-3, logging_steps: 1, save_steps: 2, max_length: 64}
eval: {num_samples: 2, train_samples: 2, max_new_tokens: 4}
"""


@pytest.fixture
def qa_task(tmp_path, tiny_base_path):
    write_jsonl(tmp_path / "qa.jsonl", QA)
    return write_task(tmp_path, tiny_base_path, QA_BODY)


def trained_text(example, tokenizer) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
    )


def untrained_text(example, tokenizer) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label == -100]
    )


FORMATS = {
    "chat prompt/completion": (
        {"question": "Which rover landed in 2021?", "answer": "Perseverance"},
        "data: {train: d.jsonl, eval: d.jsonl, fields: {prompt: question, completion: answer}}",
        "Perseverance</s>\n",
        "Which rover landed in 2021?",
    ),
    "plain template": (
        {"text_in": "Voyager 2 flew past Neptune", "label": "planetary"},
        "data: {train: d.jsonl, eval: d.jsonl, fields: {prompt: text_in, completion: label}}\n"
        'template: {chat: false, prompt: "Mission: {text_in}\\nCategory:", completion: " {label}"}',
        " planetary</s>",
        "Mission: Voyager 2 flew past Neptune\nCategory:",
    ),
    "messages": (
        {
            "messages": [
                {"role": "user", "content": "Who flew Apollo 11?"},
                {"role": "assistant", "content": "Armstrong"},
            ]
        },
        "data: {train: d.jsonl, eval: d.jsonl, format: messages}",
        "Armstrong</s>",
        "Who flew Apollo 11?",
    ),
    "sharegpt": (
        {"conversations": [{"from": "human", "value": "Who flew Apollo 11?"}, {"from": "gpt", "value": "Armstrong"}]},
        "data: {train: d.jsonl, eval: d.jsonl, format: sharegpt}",
        "Armstrong</s>",
        "Who flew Apollo 11?",
    ),
    "alpaca": (
        {"instruction": "Name the planet.", "input": "It has the Great Red Spot.", "output": "Jupiter"},
        "data: {train: d.jsonl, eval: d.jsonl, format: alpaca}",
        "Jupiter</s>\n",
        "It has the Great Red Spot.",
    ),
}


@pytest.mark.parametrize("data_format", list(FORMATS))
def test_dry_run_trains_on_the_answer_only(tmp_path, tiny_base_path, data_format):
    row, data, answer, prompt_part = FORMATS[data_format]
    write_jsonl(tmp_path / "d.jsonl", [row] * 4)
    task = load_task(write_task(tmp_path, tiny_base_path, data + "\n"))
    prepared = run_sft(task, dry_run=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_path)
    for example in prepared:
        assert trained_text(example, tokenizer) == answer
        assert prompt_part in untrained_text(example, tokenizer)
    assert not (tmp_path / "runs" / "qa").exists(), "a dry run writes nothing"


@pytest.mark.parametrize("data_format", ["chat prompt/completion", "plain template", "sharegpt"])
def test_train_on_inputs_trains_on_the_prompt_too(tmp_path, tiny_base_path, data_format):
    row, data, answer, prompt_part = FORMATS[data_format]
    write_jsonl(tmp_path / "d.jsonl", [row] * 4)
    task = load_task(write_task(tmp_path, tiny_base_path, data + "\ntrain: {train_on_inputs: true}\n"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_path)
    for example in run_sft(task, dry_run=True):
        assert prompt_part in trained_text(example, tokenizer) and answer.strip() in trained_text(example, tokenizer)


def test_a_conversation_trains_on_every_assistant_turn(tmp_path, tiny_base_path):
    turns = [("human", "Hi there"), ("gpt", "Hello one"), ("human", "Again"), ("gpt", "Hello two")]
    write_jsonl(tmp_path / "d.jsonl", [{"conversations": [{"from": f, "value": v} for f, v in turns]}] * 4)
    task = load_task(write_task(tmp_path, tiny_base_path, "data: {train: d.jsonl, eval: d.jsonl, format: sharegpt}\n"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_path)
    for example in run_sft(task, dry_run=True):
        assert trained_text(example, tokenizer) == "Hello one</s>Hello two</s>"


def test_text_format_trains_on_every_token(tmp_path, tiny_base_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "The Moon orbits the Earth."}] * 4)
    task = load_task(write_task(tmp_path, tiny_base_path, "data: {train: d.jsonl, eval: d.jsonl, format: text}\n"))
    example = run_sft(task, dry_run=True)[0]
    assert all(label == token for label, token in zip(example["labels"], example["input_ids"], strict=True))


def test_dry_run_prints_the_marked_examples(qa_task, capsys):
    assert main(["sft", qa_task, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trained on: 'Fact" in out and "trained tokens of" in out


def test_examples_left_without_trained_tokens_are_an_error(qa_task):
    with pytest.raises(UserError, match=r"qa.jsonl: row 1, .*no answer token left to train on.*max_length=6"):
        run_sft(load_task(qa_task, ["train.max_length=6"]), dry_run=True)


@pytest.mark.slow
def test_the_same_command_trains_the_same_adapter_whether_or_not_the_base_was_built_first(tmp_path, monkeypatch):
    """Building the tiny base on first use draws random numbers; the adapter's initialisation once drew
    from the same stream, so a first run and every later run of one command trained different adapters."""
    monkeypatch.setenv("LMDIFF_FT_CACHE", str(tmp_path / "cache"))  # empty: the first run builds the base
    write_jsonl(tmp_path / "qa.jsonl", QA)
    task = write_task(tmp_path, "tiny", QA_BODY)
    adapters = []
    for run in ("builds", "loads"):
        run_sft(load_task(task, ["train.max_steps=1", f"output_dir={tmp_path / run}"]))
        adapters.append(load_file(tmp_path / run / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])


def test_packing_puts_whole_examples_in_rows_with_their_labels(qa_task, tiny_base_path):
    prepared = run_sft(load_task(qa_task, ["train.packing=true"]), dry_run=True)
    assert "seq_lengths" in prepared.column_names and len(prepared) < 12, "12 train rows, packed"
    examples = list(packed_examples(prepared))
    assert len(examples) == 12
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_path)
    for example in examples:
        assert trained_text(example, tokenizer).startswith("Fact ")
        assert "about Mars?" in untrained_text(example, tokenizer)


def test_packed_examples_without_trained_tokens_are_an_error(qa_task):
    with pytest.raises(UserError, match=r"qa.jsonl: 12 of 12 rows have no answer token left.*max_length=6"):
        run_sft(load_task(qa_task, ["train.max_length=6", "train.packing=true"]), dry_run=True)


@pytest.mark.slow
def test_packed_training_learns_and_keeps_examples_apart(qa_task, monkeypatch):
    """A packed run: TRL flattens each batch into one row whose position_ids restart at every example, the
    model takes the packed path for it (attention, means and conv within each example), and the loss falls."""
    sequences_per_batch, original = [], modeling_lmdiff.packed_sequences

    def recording(position_ids):
        packed = original(position_ids)
        if packed is not None:
            sequences_per_batch.append(packed.gather.shape[0])
        return packed

    monkeypatch.setattr(modeling_lmdiff, "packed_sequences", recording)
    metrics = run_sft(load_task(qa_task, ["train.packing=true", "train.max_steps=6"]))
    assert metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"]
    assert sequences_per_batch and max(sequences_per_batch) > 1, "batches reached the model as packed rows"


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda d: (d / "qa.jsonl").unlink(), "qa.jsonl: file not found (data.train)"),
        (
            lambda d: write_jsonl(d / "qa.jsonl", QA[:3] + [{"question": "q"}]),
            "qa.jsonl: row 4: missing field 'answer'",
        ),
        (lambda d: write_jsonl(d / "qa.jsonl", []), "no rows"),
    ],
)
def test_data_errors_are_one_line_with_exit_2(qa_task, tmp_path, capsys, setup, expected):
    setup(tmp_path)
    assert main(["sft", qa_task]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err.splitlines()[-1] and "Traceback" not in err  # progress bars may come before


def test_task_errors_are_one_line_with_exit_2(qa_task, capsys):
    assert main(["sft", qa_task, "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'train.lr'" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(["sft", qa_task.replace("qa.yaml", "missing.yaml")]) == 2
    assert main(["sft", qa_task, "base=/nonexistent/base"]) == 2
    assert "/nonexistent/base" in capsys.readouterr().err


TRAIN_SECTION = {  # a value other than the default for every train.* key the trainer's arguments take
    "epochs": 2.5, "max_steps": 7, "lr": 3.0e-4, "lr_scheduler": "constant_with_warmup", "warmup_ratio": 0.1,
    "weight_decay": 0.01, "batch_size": 2, "grad_accum": 3, "max_length": 48, "seed": 7, "logging_steps": 2,
    "save_steps": 4, "eval_steps": 2, "eval_strategy": "steps", "load_best_model_at_end": True,
    "metric_for_best_model": "exact_match", "eval_generation_samples": 2, "save_total_limit": 3,
    "gradient_checkpointing": True, "optim": "adafactor", "report_to": ["tensorboard", "mlflow"],
    "train_on_inputs": True, "packing": True, "extra_args": {"max_grad_norm": 0.3, "neftune_noise_alpha": 5.0},
}  # fmt: skip
TRAINER_ARGUMENTS = {  # what each reaches the trainer as (SFTConfig's names)
    "num_train_epochs": 2.5, "max_steps": 7, "learning_rate": 3.0e-4, "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 0.1, "weight_decay": 0.01, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
    "gradient_accumulation_steps": 3, "max_length": 48, "seed": 7, "data_seed": 7, "logging_steps": 2,
    "save_steps": 4, "eval_steps": 2, "eval_strategy": "steps", "save_strategy": "steps",
    "load_best_model_at_end": True, "metric_for_best_model": "eval_exact_match", "greater_is_better": True,
    "save_total_limit": 3, "gradient_checkpointing": True, "optim": "adafactor",
    "report_to": ["tensorboard", "mlflow"], "run_name": "qa", "completion_only_loss": False, "packing": True,
    "max_grad_norm": 0.3, "neftune_noise_alpha": 5.0,
}  # fmt: skip
# train.* keys the recipe uses itself rather than passing them on
USED_BY_THE_RECIPE = {
    "early_stopping_patience", "eval_generation_samples", "push_to_hub", "hub_model_id", "hub_private"
}  # fmt: skip


def test_every_train_key_reaches_the_trainer(qa_task, monkeypatch):
    """The task's train section, 1:1, in the arguments of the SFTTrainer that the recipe builds."""
    import dataclasses

    from lmdiff_ft.schema.task import TrainConfig

    untested = {f.name for f in dataclasses.fields(TrainConfig)} - set(TRAIN_SECTION) - USED_BY_THE_RECIPE
    assert not untested, f"map these train keys in TRAIN_SECTION/TRAINER_ARGUMENTS: {untested}"
    built = []

    class Built(Exception):
        """Raised where the recipe builds its trainer: the arguments are all this test needs."""

    def build(**kwargs):
        built.append(kwargs["args"])
        raise Built

    monkeypatch.setattr(sft, "SFTTrainer", build)
    overrides = [f"train.{key}={json.dumps(value)}" for key, value in TRAIN_SECTION.items()]
    with pytest.raises(Built):
        run_sft(load_task(qa_task, [*overrides, "eval.metrics=[exact_match]"]), dry_run=True)
    (args,) = built
    assert {name: getattr(args, name) for name in TRAINER_ARGUMENTS} == TRAINER_ARGUMENTS


@pytest.mark.slow
def test_short_run_writes_a_complete_adapter_that_plain_peft_loads(qa_task, tiny_base_path, tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # TensorBoard once wrote the run's logs to ./runs of the working directory
    metrics = run_sft(load_task(qa_task))
    out = tmp_path / "runs" / "qa"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "README.md",
        "metrics.json",
        "resolved_task.yaml",
        "trainer_state.json",
        "loss_curve.png",
        "lmdiff_base.json",
        "checkpoint-4",
    ):
        assert (out / name).exists(), name
    assert not [p for p in out.iterdir() if "partial" in p.name]
    assert not list(elsewhere.iterdir()), "nothing written outside the run directory"
    logged = set()
    for events in (out / "runs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        logged |= set(accumulator.Tags()["scalars"])
    assert {"train/loss", "eval/loss"} <= logged, "TensorBoard logs of the training and the evaluations"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["after"]["eval_loss"] < saved["before"]["eval_loss"] == metrics["before"]["eval_loss"]
    assert {"eval_exact_match", "eval_rouge_l", "train_exact_match"} <= saved["after"].keys()
    assert load_task(out / "resolved_task.yaml") == load_task(qa_task)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_path), out, is_trainable=True)
    tokens = torch.tensor([[1, 5, 6, 7]])
    assert model.eval()(tokens).logits.shape[-1] == model.config.vocab_size
    assert saved["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert "- rank / alpha: 8 / 16\n" in (out / "README.md").read_text()

    with pytest.raises(UserError, match="holds a finished run"):
        run_sft(load_task(qa_task))
    finished = sorted(out.rglob("*"))
    assert len(run_sft(load_task(qa_task), dry_run=True)) > 0  # a dry run writes nothing, so it may look
    assert sorted(out.rglob("*")) == finished


@pytest.mark.slow
def test_eval_gives_the_numbers_of_the_runs_metrics(qa_task, tmp_path, capsys):
    """`lmdiff-ft eval` on the base and a run's adapter gives the numbers the run's metrics.json holds before and
    after training: the same rows, prompts and decoding."""
    metrics = run_sft(load_task(qa_task))
    adapter = str(tmp_path / "runs" / "qa")
    capsys.readouterr()
    assert main(["eval", qa_task, "--adapter", adapter, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    keys = ["eval_loss", "eval_perplexity", "eval_exact_match", "eval_rouge_l", "train_exact_match", "train_rouge_l"]
    for key in keys:
        assert results["base"][key] == pytest.approx(metrics["before"][key], rel=1e-5), key
        assert results[adapter][key] == pytest.approx(metrics["after"][key], rel=1e-5), key
    assert results[adapter]["eval_loss"] < results["base"]["eval_loss"]
    assert main(["eval", qa_task, "--adapter", adapter, "eval.num_samples=2", "eval.train_samples=0"]) == 0
    table = capsys.readouterr().out
    assert f"{results[adapter]['eval_loss']:.4f}" in table and f"{results['base']['eval_loss']:.4f}" in table


def run_cli(args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lmdiff_ft", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def losses(run_dir) -> dict[int, float]:
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["loss"] for e in history if "loss" in e}


KILLED_AFTER_STEP_5 = """
import os, signal, sys
import transformers
from lmdiff_ft.cli import main

training_step = transformers.Trainer.training_step

def kill_after_step_5(self, *args, **kwargs):
    if self.state.global_step == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return training_step(self, *args, **kwargs)

transformers.Trainer.training_step = kill_after_step_5
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(qa_task, tmp_path):
    overrides = ["train.max_steps=8", "train.save_steps=2", "eval.num_samples=0", "eval.train_samples=0"]
    reference = run_sft(load_task(qa_task, [*overrides, f"output_dir={tmp_path / 'straight'}"]))
    assert reference["global_step"] == 8

    out = tmp_path / "runs" / "qa"
    # the CLI killed with SIGKILL by itself, at a fixed point: after step 5, so checkpoint-4 is the last one (an
    # outside kill raced the tiny run, which can finish all 8 steps between two looks at the directory)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_STEP_5, "sft", qa_task, *overrides],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / "checkpoint-4" / "trainer_state.json").exists() and not (out / "checkpoint-6").exists()
    assert not (out / "adapter_config.json").exists(), "a killed run must not look finished"

    fresh = run_cli(["sft", qa_task, *overrides])
    assert fresh.wait() == 2 and "--resume" in fresh.stderr.read()

    resumed = run_cli(["sft", qa_task, *overrides, "--resume"])
    assert resumed.wait() == 0, resumed.stderr.read()
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 8
    got, expected = losses(out), losses(tmp_path / "straight")
    assert got.keys() == expected.keys()
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step


def test_an_override_after_resume_is_an_override(qa_task, monkeypatch):
    """`--resume` takes an optional checkpoint path; `key=value` in its place is an override, as after any option."""
    calls = []
    monkeypatch.setattr(sft, "run_sft", lambda task, dry_run, resume: calls.append((task.train.lr, resume)))
    assert main(["sft", qa_task, "--resume", "train.lr=1e-3"]) == 0
    assert main(["sft", qa_task, "--resume", "train.lr=2e-3", "train.seed=1"]) == 0
    assert main(["sft", qa_task, "--resume"]) == 0
    assert calls == [(1e-3, True), (2e-3, True), (5e-3, True)]


def test_gradient_checkpointing_auto_recomputes_only_when_memory_needs_it(qa_task, tiny_base_path, monkeypatch):
    task = load_task(qa_task)
    assert task.train.gradient_checkpointing == "auto"
    base = load_base(str(tiny_base_path), quantization="none")
    monkeypatch.setattr(common, "available_memory", lambda device: 2**40)
    assert use_gradient_checkpointing(task, base)[0] is False
    monkeypatch.setattr(common, "available_memory", lambda device: 2**20)
    on, why = use_gradient_checkpointing(task, base)
    assert on and why.startswith("auto: activations up to")
    assert use_gradient_checkpointing(task, base, sequences_per_row=2)[0]
    forced = load_task(qa_task, ["train.gradient_checkpointing=false"])
    assert use_gradient_checkpointing(forced, base) == (False, "set in the task")
