"""Which parts to train: `lmdiff-ft sweep` (resumable, summarised), the plain-Llama baseline, and retention."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_sft import QA, write_jsonl, write_task
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lmdiff_ft.cli import main
from lmdiff_ft.commands.sweep import load_sweep
from lmdiff_ft.commands.sweep_summary import aggregate, fastest_step, versus
from lmdiff_ft.errors import UserError
from lmdiff_ft.evaluation.retention import contains_answer, load_retention_set, retention_kept
from lmdiff_ft.recipes.sft import run_sft
from lmdiff_ft.schema.load import load_task

TINY_BODY = """
adapter: {r: 4, alpha: 8, dropout: 0.0}
data: {train: qa.jsonl, eval_fraction: 0.25, format: prompt_completion, fields: {prompt: question, completion: answer}}
train: {max_steps: 2, batch_size: 4, lr: 5.0e-3, logging_steps: 1, save_steps: 1, eval_steps: 1, max_length: 64}
eval: {metrics: [exact_match], num_samples: 2, train_samples: 0, max_new_tokens: 3, retention: general.jsonl,
       retention_max_new_tokens: 3}
"""
GENERAL = [{"question": "What is the capital of France?", "answers": ["Paris"]}, {"question": "2+2?", "answers": ["4"]}]


@pytest.fixture
def tiny_task(tmp_path, tiny_base_path):
    write_jsonl(tmp_path / "qa.jsonl", QA)
    write_jsonl(tmp_path / "general.jsonl", GENERAL)
    return write_task(tmp_path, tiny_base_path, TINY_BODY)


def write_sweep(tmp_path, task: str, body: str) -> str:
    path = tmp_path / "sweep.yaml"
    out = f"output_dir: {tmp_path / 'sweeps' / 'demo'}\nruns_dir: {tmp_path / 'runs' / 'sweeps'}\n"
    path.write_text(f"name: demo\ntasks: [{task}]\n{out}{body}")
    return str(path)


# --- the sweep file: cells × grid × seeds, checked before anything trains ---------------------------------------


def test_cells_cross_the_grid_and_every_run_gets_its_seed(tmp_path, tiny_task):
    sweep = load_sweep(
        write_sweep(tmp_path, tiny_task, "seeds: [1, 2]\ncells: {a: {adapter.r: 2}, b: [adapter.r=8]}\n"),
        grid_options=["adapter.alpha=4,16"],
    )
    assert list(sweep.cells) == ["a,adapter.alpha=4", "a,adapter.alpha=16", "b,adapter.alpha=4", "b,adapter.alpha=16"]
    assert sweep.cells["b,adapter.alpha=16"] == ["adapter.r=8", "adapter.alpha=16"]
    assert sweep.reference == "a,adapter.alpha=4"
    task = load_task(tiny_task, sweep.cells["a,adapter.alpha=16"] + ["train.seed=2"])
    assert (task.adapter.r, task.adapter.alpha, task.train.seed) == (2, 16, 2)


def test_a_task_file_sweeps_with_grid_and_seeds_alone(tiny_task):
    sweep = load_sweep(tiny_task, ["adapter.presets=[attn],[diff_attn, lambda]"], seeds=[3])
    assert list(sweep.cells) == ["adapter.presets=attn", "adapter.presets=diff_attn+lambda"]
    assert sweep.seeds == [3] and sweep.name == "qa"


@pytest.mark.parametrize(
    "body, option, message",
    [
        (
            "cells: {a: {}}\n",
            ["adapter.rank=8,16"],
            r"cell 'a,adapter.rank=8': .*unknown key 'adapter.rank' \(did you mean 'adapter.r'\?\)",
        ),
        ("cells: {a: {train.lr: fast}}\n", [], r"cell 'a': .*train.lr"),
        ("seeds: [one]\n", [], r"seeds: expected a list of integers"),
        ("cells: {a: {}}\nreference: b\n", [], r"reference: no cell 'b'"),
        ("grids: {}\n", [], r"unknown key 'grids'"),
        ("", ["adapter.r"], r"--grid 'adapter.r': expected key=value1,value2"),
    ],
)
def test_a_bad_sweep_is_one_line_and_exit_2(tmp_path, tiny_task, capsys, body, option, message):
    path = write_sweep(tmp_path, tiny_task, body)
    assert main(["sweep", path, *(f"--grid={o}" for o in option)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmdiff-ft sweep: error: ")
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "runs" / "sweeps").exists()


# --- running: resumable, a failed run recorded, a summary with n per cell --------------------------------------


def sweep_process(path: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    command = [sys.executable, "-m", "lmdiff_ft", "sweep", path]
    return subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


@pytest.mark.slow
def test_a_sweep_killed_after_its_first_run_continues_without_redoing_it(tmp_path, tiny_task):
    path = write_sweep(tmp_path, tiny_task, "seeds: [1, 2]\ncells: {small: {adapter.r: 2}, large: {adapter.r: 8}}\n")
    results = tmp_path / "sweeps" / "demo" / "results" / "qa"
    first = results / "small" / "seed1.json"
    sweep = sweep_process(path)
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and sweep.poll() is None:
        time.sleep(0.2)
    os.killpg(sweep.pid, signal.SIGKILL)  # the sweep and its run, mid-way through the second run
    sweep.wait()
    assert first.exists(), sweep.stdout.read()
    written = first.stat().st_mtime_ns

    done = sweep_process(path)
    output = done.communicate(timeout=600)[0]
    assert done.returncode == 0, output
    assert "4 runs (1 task(s) × 2 cells × 2 seeds), 1 done, 3 to run" in output
    assert "[2/4] qa/large/seed1" in output and "qa/small/seed1" not in output.split("to run")[1]
    assert first.stat().st_mtime_ns == written
    summary = json.loads((tmp_path / "sweeps" / "demo" / "summary.json").read_text())
    cells = {c["cell"]: c["metrics"] for c in summary["cells"]}
    assert set(cells) == {"small", "large"}
    for metrics in cells.values():
        assert metrics["after.eval_exact_match"]["n"] == 2 and metrics["after.eval_loss"]["n"] == 2
        assert metrics["after.retention_accuracy"]["n"] == 2 and metrics["peak_rss_mib"]["mean"] > 0
    assert cells["large"]["trainable_parameters"]["mean"] > cells["small"]["trainable_parameters"]["mean"]
    result = json.loads(first.read_text())
    assert [p["step"] for p in result["eval_curve"]] == [0, 1, 2] and result["seconds_per_step"] > 0
    assert result["resumed"] is False
    markdown = (tmp_path / "sweeps" / "demo" / "summary.md").read_text()
    assert "| `small` | 2 |" in markdown and "reference" in markdown
    assert (tmp_path / "sweeps" / "demo" / "qa.png").stat().st_size > 10_000
    assert (tmp_path / "sweeps" / "demo" / "summary.csv").read_text().startswith("task,cell,")
    (tmp_path / "sweeps" / "demo" / "summary.md").unlink()
    assert main(["sweep", path, "--summary-only"]) == 0  # from the result files alone: nothing runs
    assert (tmp_path / "sweeps" / "demo" / "summary.md").read_text() == markdown
    assert first.stat().st_mtime_ns == written


@pytest.mark.slow
def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_task, capsys):
    # layer 7 does not exist in the tiny base: a user error inside the run, found when its base is loaded
    path = write_sweep(tmp_path, tiny_task, "cells: {bad: {adapter.layers: '7'}, good: {}}\n")
    assert main(["sweep", path]) == 1
    results = tmp_path / "sweeps" / "demo" / "results" / "qa"
    failed = json.loads((results / "bad" / "seed42.json").read_text())
    assert failed["status"] == "failed" and failed["exit_code"] == 2 and "adapter.layers" in failed["last_line"]
    assert json.loads((results / "good" / "seed42.json").read_text())["status"] == "ok"
    assert "Failed runs (tried again by the next `lmdiff-ft sweep`): qa/bad/seed42" in capsys.readouterr().out


def stats_of(cells: dict[str, list[float]]) -> dict:
    results = [{"task": "t", "cell": c, "before": {}, "after": {"eval_em": v}} for c, vs in cells.items() for v in vs]
    return {cell: metrics["after.eval_em"] for (_, cell), metrics in aggregate(results).items()}


def test_noise_is_welchs_t_test_at_95_percent():
    stats = stats_of({"ref": [0.50, 0.52, 0.48], "a": [0.60, 0.62, 0.58], "b": [0.3, 0.7, 0.5]})
    assert stats["a"]["n"] == 3 and stats["a"]["std"] == pytest.approx(0.02)
    assert versus(stats["a"], stats["ref"]) == (pytest.approx(0.10), "beyond noise")
    assert versus(stats["b"], stats["ref"]) == (pytest.approx(0.0), "within noise")
    assert versus({**stats["a"], "n": 1}, stats["ref"])[1] == "n < 2"


def test_three_seeds_need_more_than_two_standard_errors():
    # 0.035 apart, standard error 0.014: twice the standard error would call it real; at about 3 degrees of freedom
    # Welch's t-test needs 3.18 standard errors
    stats = stats_of({"ref": [0.5833, 0.5833, 0.6042], "a": [0.6042, 0.625, 0.6458]})
    difference, verdict = versus(stats["a"], stats["ref"])
    assert difference == pytest.approx(0.0347, abs=1e-3) and verdict == "within noise"
    assert versus(stats_of({"ref": [0.5833, 0.5833, 0.6042], "a": [0.6458, 0.6667, 0.6875]})["a"], stats["ref"])[1] == (
        "beyond noise"
    )


def test_seeds_that_agree_exactly_are_not_taken_as_noise_free():
    stats = stats_of({"ref": [0.90, 0.92], "same": [0.96, 0.96], "far": [0.99, 0.99], "equal": [0.9, 0.9]})
    assert versus(stats["same"], stats["ref"])[1] == "within noise"  # the reference's spread stands in for both
    assert versus(stats["far"], stats["ref"])[1] == "beyond noise"
    assert versus(stats["same"], stats["equal"])[1] == "no seed spread"


def test_timings_come_from_the_fastest_uninterrupted_seed():
    def run(seconds, resumed):
        return {"task": "t", "cell": "c", "seconds_per_step": seconds, "resumed": resumed}

    assert fastest_step([run(10.7, False), run(0.04, True), run(16.1, False)], "t", "c") == "10.7"
    assert fastest_step([run(0.04, True)], "t", "c") == ""


# --- the plain-Llama baseline -----------------------------------------------------------------------------------


@pytest.fixture
def tiny_llama_dir(tmp_path, tiny_base_path):
    """A plain Llama checkpoint (never converted) with the tiny base's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_a_plain_llama_trains_with_the_baseline_presets_and_refuses_lm_diffs(tmp_path, tiny_llama_dir):
    write_jsonl(tmp_path / "qa.jsonl", QA)
    write_jsonl(tmp_path / "general.jsonl", GENERAL)
    task = write_task(tmp_path, f"{{path: {tiny_llama_dir}, plain_llama: true}}", TINY_BODY)
    metrics = run_sft(load_task(task, ["adapter.presets=[attn, mlp]"]))
    config = json.loads((tmp_path / "runs" / "qa" / "adapter_config.json").read_text())
    assert sorted({m.split(".")[-1] for m in config["target_modules"]}) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert json.loads((tmp_path / "runs" / "qa" / "lmdiff_base.json").read_text())["model_type"] == "llama"
    assert metrics["trainable_parameters"] == 2 * 4 * (4 * 64 + 2 * (64 + 32) + 3 * (64 + 128))
    with pytest.raises(UserError, match=r"'lambda' is LM-Diff's; a plain Llama base takes attn, mlp"):
        run_sft(load_task(task, ["adapter.presets=[lambda]", f"output_dir={tmp_path / 'other'}"]))


def test_diff_attn_alone_on_a_converted_llama_is_announced(tmp_path, tiny_llama_dir, capsys):
    write_jsonl(tmp_path / "qa.jsonl", QA)
    write_jsonl(tmp_path / "general.jsonl", GENERAL)
    task = write_task(tmp_path, f"{{path: {tiny_llama_dir}, convert_from_llama: true}}", TINY_BODY)
    run_sft(load_task(task, ["adapter.presets=[diff_attn]"]))
    assert "warning: adapter.presets: diff_attn without lambda on a base whose λ is 0" in capsys.readouterr().out
    run_sft(load_task(task, [f"output_dir={tmp_path / 'with_lambda'}"]))  # the default presets: diff_attn, lambda
    assert "warning" not in capsys.readouterr().out


def test_a_llama_checkpoint_is_converted_trained_plain_or_refused_in_one_line(tmp_path, tiny_llama_dir, tiny_base_path):
    from lmdiff_ft.base.loading import load_base

    assert load_base(str(tiny_llama_dir), "none", plain_llama=True).model.config.model_type == "llama"
    with pytest.raises(UserError, match=r"a Llama checkpoint; set .*convert_from_llama: true.*plain_llama: true"):
        load_base(str(tiny_llama_dir), "none")
    with pytest.raises(UserError, match=r"model_type 'lmdiff'; `plain_llama: true` takes a Llama checkpoint"):
        load_base(str(tiny_base_path), "none", plain_llama=True)


# --- retention: what training breaks ----------------------------------------------------------------------------


def test_contains_answer_is_whole_words_after_normalisation():
    assert contains_answer("The capital of France is Paris.", ["paris"])
    assert contains_answer("It was Neil Armstrong, in 1969", ["Neil Armstrong", "Armstrong"])
    assert not contains_answer("Apollo 1", ["Apollo 11"])
    assert not contains_answer("Parisian food", ["Paris"])


def test_kept_is_the_share_of_the_bases_correct_answers_still_correct():
    before = {"retention_correct": [0, 1, 2, 3]}
    assert retention_kept(before, {"retention_correct": [1, 2, 3, 5, 6]}) == {"retention_kept": 0.75}
    assert retention_kept({}, {"retention_correct": [1]}) == {}


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"question": "Q?"}', r"row 2: expected `answers`, a non-empty list"),
        ('{"question": "", "answers": ["a"]}', r"row 2: expected a non-empty string `question`"),
        ("not json", r"row 2: not valid JSON"),
    ],
)
def test_a_bad_retention_file_names_the_row(tmp_path, line, message):
    path = tmp_path / "r.jsonl"
    path.write_text('{"question": "Q?", "answers": ["A"]}\n' + line + "\n")
    with pytest.raises(UserError, match=message):
        load_retention_set(path)


def test_a_missing_retention_file_is_a_task_error(tmp_path, tiny_task):
    with pytest.raises(UserError, match=r"qa.yaml: eval.retention: no such file: .*nope.jsonl"):
        load_task(tiny_task, ["eval.retention=nope.jsonl"])


def test_sft_reports_retention_before_and_after_and_what_it_kept(tiny_task, capsys):
    metrics = run_sft(load_task(tiny_task))
    before, after = metrics["before"], metrics["after"]
    assert 0 <= before["retention_accuracy"] <= 1 and 0 <= after["retention_accuracy"] <= 1
    assert isinstance(before["retention_correct"], list) and 0 <= after.get("retention_kept", 0) <= 1
    assert ("retention_kept" in after) == bool(before["retention_correct"])
    assert [s["split"] for s in metrics["samples"]].count("retention") == len(GENERAL)
    assert [p["step"] for p in metrics["eval_curve"]] == [0, 1, 2] and metrics["peak_rss_mib"] > 0
    assert "retention_accuracy" in capsys.readouterr().out
