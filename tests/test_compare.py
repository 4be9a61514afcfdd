"""The comparison engine: one base in memory, several adapters on it, each column exactly what that model
alone generates; run discovery, prompt rendering, limits, the inspection helpers and the vote log."""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from lmdiff_ft.adapters.known_base import base_info, load_adapter, write_base_info
from lmdiff_ft.adapters.presets import attach_adapters
from lmdiff_ft.base.loading import load_base
from lmdiff_ft.errors import UserError
from lmdiff_ft.evaluation.generation import generate_answers, render_prompt
from lmdiff_ft.evaluation.report import plot_loss_curve
from lmdiff_ft.schema.task import AdapterConfig, EvalConfig
from lmdiff_ft.serve.compare import Comparer
from lmdiff_ft.serve.runs import BASE, discover_runs, task_prompt
from lmdiff_ft.serve.settings import GenerationSettings, Limits
from lmdiff_ft.serve.votes import VoteLog

SYSTEM = "Answer briefly."
QUESTIONS = ["Which rocket flew Apollo?", "Who is Goddard named after?", "What does GPM measure?"]
# Two adapters taught different answers (and different presets: B leaves λ alone), so their columns differ.
RUNS = {
    "alpha": {"answers": ["Saturn V", "Robert Goddard", "rain"], "presets": ["diff_attn", "lambda", "se_gate"]},
    "beta": {"answers": ["blue whale", "blue whale", "blue whale"], "presets": ["diff_attn", "se_gate"]},
}
TASK_YAML = """\
name: {name}
base: {{path: {base}}}
quantization: none
data: {{train: eval.jsonl, eval: eval.jsonl, fields: {{prompt: question, completion: answer}}}}
template: {{system: {system}}}
"""


def chat(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def train_run(root: Path, base_path: Path, name: str, answers: list[str], presets: list[str], seed: int) -> Path:
    """A finished run directory as `lmdiff-ft sft` leaves it, trained by 80 AdamW steps (seconds: the base is tiny)."""
    directory = root / name
    directory.mkdir(parents=True)
    rows = [{"question": q, "answer": a} for q, a in zip(QUESTIONS, answers, strict=True)]
    (directory / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "resolved_task.yaml").write_text(TASK_YAML.format(name=name, base=base_path, system=SYSTEM))

    loaded = load_base(str(base_path), quantization="none")
    torch.manual_seed(seed)
    model = attach_adapters(loaded.model, AdapterConfig(presets=presets, r=8, alpha=16, dropout=0.0))
    tokenizer = loaded.tokenizer
    examples = [
        tokenizer.apply_chat_template(chat(q) + [{"role": "assistant", "content": a}], tokenize=False)
        for q, a in zip(QUESTIONS, answers, strict=True)
    ]
    batch = tokenizer(examples, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    history = []
    for step in range(1, 81):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append({"step": step, "loss": loss.item()})

    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    write_base_info(directory, base_info(model.get_base_model(), loaded.path, loaded.fingerprint))
    metrics = {"before": {"eval_loss": history[0]["loss"]}, "after": {"eval_loss": history[-1]["loss"]}}
    (directory / "metrics.json").write_text(json.dumps(metrics))
    (directory / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    plot_loss_curve(history, directory / "loss_curve.png")
    return directory


@contextmanager
def one_thread() -> Iterator[None]:
    """These models are tiny: on a busy 2-core machine, handing each small matmul to a second thread costs
    ~15x more than the math."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, tiny_base_path) -> Path:
    """runs/ with two finished adapters for the tiny base; built once per session, for every app test."""
    root = tmp_path_factory.getbasetemp() / "app-runs"
    if not root.is_dir():
        staging = tmp_path_factory.mktemp("app-runs-staging")
        with one_thread():
            for seed, (name, run) in enumerate(RUNS.items()):
                train_run(staging, tiny_base_path, name, run["answers"], run["presets"], seed)
        staging.rename(root)
    return root


@pytest.fixture(autouse=True)
def single_threaded_torch():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def comparer(trained_runs) -> Comparer:
    comparer, problems = Comparer.from_runs([trained_runs])
    assert problems == []
    return comparer


def reference_answer(model, tokenizer, question: str, settings: GenerationSettings) -> str:
    """What evaluation generates for this model alone (lmdiff_ft.evaluation.generation), with the same settings."""
    config = EvalConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=not settings.greedy,
        temperature=settings.temperature,
        top_p=settings.top_p,
    )
    return generate_answers(model, tokenizer, [chat(question)], config, seed=settings.seed)[0]


def test_discovery_labels_runs_with_task_and_metrics(trained_runs):
    runs, problems = discover_runs([trained_runs])
    assert problems == [] and [r.name for r in runs] == ["alpha", "beta"]
    assert runs[0].label.startswith("alpha · loss ")
    assert runs[0].task.template.system == SYSTEM


@pytest.mark.parametrize("greedy", [True, False])
def test_every_column_equals_that_model_loaded_alone(comparer, trained_runs, tiny_base_path, greedy):
    settings = GenerationSettings(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3, greedy=greedy)
    question = QUESTIONS[0]
    ids = comparer.prompt_ids(question, "alpha")
    outputs = {column: comparer.complete(column, ids, settings).text.strip() for column in comparer.columns}
    assert comparer.base.model is comparer.model.get_base_model()  # one base in memory, wrapped in place

    bare = load_base(str(tiny_base_path), quantization="none")
    assert ids == render_prompt(chat(question), bare.tokenizer)
    assert outputs[BASE] == reference_answer(bare.model, bare.tokenizer, question, settings)
    for name in RUNS:
        alone = load_base(str(tiny_base_path), quantization="none")
        model = load_adapter(alone.model, trained_runs / name, alone.fingerprint)
        assert outputs[name] == reference_answer(model, alone.tokenizer, question, settings), name
    assert outputs["alpha"] != outputs[BASE] and outputs["beta"] != outputs[BASE]


def test_streaming_grows_the_text_and_reports_speed(comparer):
    ids = comparer.prompt_ids(QUESTIONS[1], "alpha")
    partials = list(comparer.stream("alpha", ids, GenerationSettings(max_new_tokens=6)))
    assert [p.tokens for p in partials] == list(range(1, len(partials) + 1))
    assert all(later.text.startswith(earlier.text) for earlier, later in pairwise(partials))
    assert "tokens/s" in partials[-1].stats() and partials[-1].first_token_s <= partials[-1].elapsed_s


def test_prompt_follows_the_runs_task_template(comparer):
    task = comparer.runs["alpha"].task
    assert task_prompt(task, "hi") == chat("hi")
    plain = replace(task, template=replace(task.template, chat=False, prompt="Q: {question}\nA:"))
    assert task_prompt(plain, "hi") == f"{SYSTEM}\n\nQ: hi\nA:"
    assert comparer.examples("alpha") == QUESTIONS


def test_limits_and_unknown_columns_are_refused_with_a_message(comparer):
    limited = Comparer(comparer.base, comparer.roots, Limits(max_prompt_chars=50, max_new_tokens=8))
    with pytest.raises(UserError, match="60 characters; the limit is 50"):
        limited.prompt_ids("x" * 60)
    with pytest.raises(UserError, match="between 1 and 8"):
        list(limited.stream(BASE, [1, 2], GenerationSettings(max_new_tokens=9)))
    with pytest.raises(UserError, match="unknown column 'gamma'"):
        comparer.complete("gamma", [1, 2], GenerationSettings(max_new_tokens=2))


def test_a_path_outside_the_served_directories_is_refused(comparer, trained_runs, tmp_path):
    with pytest.raises(UserError, match="outside the adapter directories"):
        comparer.add_run(tmp_path)
    with pytest.raises(UserError, match="outside the adapter directories"):
        comparer.add_run(trained_runs / ".." / trained_runs.name / ".." / "elsewhere")
    assert comparer.add_run(trained_runs / "alpha").name == "alpha"  # already served: the same adapter


def test_an_adapter_for_another_base_is_refused_and_the_rest_still_served(trained_runs, tmp_path):
    root = tmp_path / "runs"
    for name in RUNS:
        (root / name).mkdir(parents=True)
        for file in (trained_runs / name).iterdir():
            (root / name / file.name).write_bytes(file.read_bytes())
    info = json.loads((root / "beta" / "lmdiff_base.json").read_text())
    (root / "beta" / "lmdiff_base.json").write_text(json.dumps({**info, "fingerprint": "0123456789abcdef"}))
    (root / "gamma").mkdir()
    (root / "gamma" / "adapter_config.json").write_text("{}")  # finished-looking, but no task or base info

    comparer, problems = Comparer.from_runs([root])
    assert comparer.columns == [BASE, "alpha"]
    assert len(problems) == 2 and all("\n" not in p for p in problems)
    assert "lmdiff_base.json: missing" in problems[0]
    assert "made for base" in problems[1] and "fingerprint 0123456789abcdef" in problems[1]


def test_lambda_and_se_gate_follow_the_active_adapter(comparer, trained_runs, tiny_base_path):
    ids = comparer.prompt_ids(QUESTIONS[2], "alpha")
    base, alpha, beta = (comparer.inspect(c, ids, layer=1, head=3) for c in (BASE, "alpha", "beta"))
    bare = load_base(str(tiny_base_path), quantization="none").model
    with torch.no_grad():
        assert base.lambdas == [float(layer.self_attn.diff_lambda()) for layer in bare.model.layers]
    assert alpha.lambdas != base.lambdas  # alpha trained λ ...
    assert beta.lambdas == base.lambdas  # ... beta did not (no `lambda` preset)
    assert base.se_gate == pytest.approx([1.0, 1.0], abs=1e-6)  # a fresh base's SE gate is exactly 1 (fc2 = 0)
    assert alpha.se_gate != base.se_gate
    assert comparer.lambdas("alpha") == alpha.lambdas
    assert len(alpha.tokens) == len(ids)


@torch.no_grad()
def test_the_attention_map_is_the_models_own_and_generation_stays_on_sdpa(comparer):
    """The map shown is the one the model returns under eager attention, with the column's adapter active: each
    row of A1 − λ·A2 sums to 1 − λ of that layer. Generation afterwards is back on SDPA."""
    ids = comparer.prompt_ids(QUESTIONS[0], "alpha")
    alpha, base = comparer.inspect("alpha", ids, layer=1, head=2), comparer.inspect(BASE, ids, layer=1, head=2)
    assert comparer.base.model.config._attn_implementation == "sdpa"
    assert alpha.diff_map.shape == (len(ids), len(ids))
    for inspection in (alpha, base):
        ones = torch.ones(len(ids))
        torch.testing.assert_close(inspection.diff_map.sum(-1), ones * (1 - inspection.lambdas[1]), atol=1e-5, rtol=0)
        assert inspection.diff_map.triu(1).abs().max() == 0  # causal
    assert not torch.allclose(alpha.diff_map, base.diff_map)  # alpha trained the projections and λ
    comparer.base.model.set_attn_implementation("eager")
    try:
        with comparer.weights("alpha"):
            own = comparer.model(input_ids=torch.tensor([ids]), output_attentions=True).attentions[1][0, 2]
    finally:
        comparer.base.model.set_attn_implementation("sdpa")
    assert torch.equal(own, alpha.diff_map)


def test_votes_are_appended_and_tallied(tmp_path):
    votes = VoteLog(tmp_path / "data")
    left = {"column": BASE, "label": "base", "output": "a"}
    right = {"column": "alpha", "label": "alpha", "output": "b"}
    settings = GenerationSettings()
    votes.record("right better", "hi", settings, left, right, "alpha")
    votes.record("tie", "hi", settings, left, right, "alpha")
    lines = [json.loads(line) for line in votes.path.read_text().splitlines()]
    assert [line["vote"] for line in lines] == ["right better", "tie"]
    assert lines[0]["right"]["output"] == "b" and lines[0]["settings"]["seed"] == 0
    assert votes.tally() == [[BASE, "alpha", 0, 1, 1, 0]]
    with pytest.raises(UserError, match="unknown vote"):
        votes.record("great", "hi", settings, left, right, "alpha")
