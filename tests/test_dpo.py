"""`lmdiff-ft dpo`: preference tuning from an SFT adapter (reference = its frozen copy) or from the base."""

import json
import shutil

import pytest
import torch
from test_sft import QA_BODY, write_jsonl, write_task

from lmdiff_ft.cli import main
from lmdiff_ft.errors import UserError
from lmdiff_ft.recipes import dpo
from lmdiff_ft.recipes.dpo import continuation_task, evaluate_dpo, reference_change, run_dpo
from lmdiff_ft.recipes.sft import run_sft
from lmdiff_ft.schema.load import load_task

PLANETS = [("Mars", "Venus"), ("Jupiter", "Saturn")]


def pairs(n: int, offset: int = 0) -> list[dict]:
    """Held-out prompts are new questions; what generalises is which kind of answer is preferred."""
    return [
        {
            "prompt": f"Which planet does probe {i + offset} study?",
            "chosen": PLANETS[i % 2][0],
            "rejected": PLANETS[i % 2][1],
        }
        for i in range(n)
    ]


def dpo_body(init_adapter: str | None) -> str:
    adapter = (
        f"adapter: {{init_adapter: {init_adapter}}}\n" if init_adapter else "adapter: {r: 8, alpha: 16, dropout: 0.0}\n"
    )
    return (
        adapter
        + """
data: {train: pairs.jsonl, eval: heldout.jsonl, fields: {prompt: prompt}}
preference: {beta: 0.5, loss_type: sigmoid}
train: {max_steps: 12, batch_size: 8, lr: 1.0e-2, logging_steps: 2, save_steps: 100, max_length: 64}
eval: {num_samples: 2, train_samples: 0, max_new_tokens: 4}
"""
    )


@pytest.fixture
def sft_adapter(tmp_path, tiny_base_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": f"Q{i}?", "answer": f"A{i}"} for i in range(16)])
    run_sft(load_task(write_task(tmp_path, tiny_base_path, QA_BODY, name="sft")))
    return tmp_path / "runs" / "sft"


@pytest.fixture
def pair_files(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", pairs(32))
    write_jsonl(tmp_path / "heldout.jsonl", pairs(16, offset=100))


@pytest.mark.slow
def test_dpo_from_an_sft_adapter_on_a_4bit_base(tmp_path, tiny_base_path, sft_adapter, pair_files, capsys):
    task = write_task(tmp_path, tiny_base_path, dpo_body(str(sft_adapter)), name="dpo").replace(
        "quantization: none", "quantization: nf4"
    )
    text = (tmp_path / "dpo.yaml").read_text().replace("quantization: none", "quantization: nf4")
    (tmp_path / "dpo.yaml").write_text(text)
    metrics = run_dpo(load_task(task))
    before, after = metrics["before"], metrics["after"]
    assert before["preference_accuracy"] == before["reference_preference_accuracy"]
    assert after["preference_accuracy"] > before["preference_accuracy"]
    assert after["reward_margin"] > 0 == before["reward_margin"]
    # the reference is the SFT adapter, frozen: its log-probs do not move
    assert after["reference_logprob_sum"] == before["reference_logprob_sum"]
    assert after["reference_preference_accuracy"] == before["reference_preference_accuracy"]
    # and DPO is scored on the SFT task too, so a user sees what it did there
    assert {"sft_eval_loss", "sft_eval_exact_match"} <= after.keys()
    assert "reference model unchanged by training: yes" in capsys.readouterr().out
    out = tmp_path / "runs" / "dpo"
    assert json.loads((out / "metrics.json").read_text())["after"] == after
    assert not (out / "ref").exists(), "only the trained adapter is published"
    assert "- rank / alpha: 8 / 16\n" in (out / "README.md").read_text()  # the SFT adapter's, not the task's defaults


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["dtype=bfloat16", "quantization=nf4"],
        ["preference.loss_type=[sigmoid, sft]", "preference.loss_weights=[1, 0.5]"],
    ],
)
def test_dpo_from_the_base(tmp_path, tiny_base_path, pair_files, overrides):
    """bf16 compute over a 4-bit base is the GPU default. Training there runs under accelerate's autocast
    (the base's norms and gates are fp32), and the reference check once said "NO" only because the
    evaluation after training ran under it and the one before did not."""
    task = write_task(tmp_path, tiny_base_path, dpo_body(None), name="dpo")
    metrics = run_dpo(load_task(task, overrides))
    assert metrics["after"]["preference_accuracy"] > metrics["before"]["preference_accuracy"]
    assert metrics["after"]["reference_logprob_sum"] == metrics["before"]["reference_logprob_sum"]


def test_dpo_on_a_task_without_preference_says_so(tmp_path, tiny_base_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": f"Q{i}?", "answer": f"A{i}"} for i in range(16)])
    task = load_task(write_task(tmp_path, tiny_base_path, QA_BODY, name="sft"))
    with pytest.raises(UserError, match="sft.yaml: no `preference` section, so not a DPO task"):
        run_dpo(task)
    assert not (tmp_path / "runs").exists()


def test_dry_run_shows_pairs_and_token_counts(tmp_path, tiny_base_path, pair_files, capsys):
    task = write_task(tmp_path, tiny_base_path, dpo_body(None), name="dpo")
    assert main(["dpo", task, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pair 1: prompt" in out and "chosen: 'Mars</s>\\n'" in out and "32 pairs" in out
    assert not (tmp_path / "runs" / "dpo").exists()


@pytest.mark.parametrize(
    "bad_row, expected",
    [
        ({"prompt": "Which?", "chosen": "Mars", "rejected": "Mars"}, "row 3: chosen and rejected are the same"),
        ({"prompt": "Which?", "chosen": "", "rejected": "Venus"}, "row 3:"),
        ({"prompt": "Which?", "chosen": "Mars"}, "row 3: missing field 'rejected'"),
    ],
)
def test_bad_pairs_are_named_by_row(tmp_path, tiny_base_path, pair_files, bad_row, expected):
    write_jsonl(tmp_path / "pairs.jsonl", pairs(2) + [bad_row])
    with pytest.raises(UserError, match=expected):
        run_dpo(load_task(write_task(tmp_path, tiny_base_path, dpo_body(None), name="dpo")), dry_run=True)


@pytest.mark.slow
def test_dpo_without_a_task_continues_the_newest_sft_run(
    tmp_path, tiny_base_path, sft_adapter, pair_files, capsys, monkeypatch
):
    dpo_task = write_task(tmp_path, tiny_base_path, dpo_body(None), name="dpo")
    monkeypatch.chdir(tmp_path)  # `lmdiff-ft dpo` looks in ./runs
    resolved = sft_adapter / "resolved_task.yaml"
    assert main(["dpo", "--dry-run"]) == 2  # the SFT task names no preference_task
    assert "names a `preference_task`" in capsys.readouterr().err
    resolved.write_text(resolved.read_text().replace("preference_task: null", f"preference_task: {dpo_task}"))

    newer = tmp_path / "runs" / "newer"  # a newer finished SFT run that names no DPO task is passed over
    shutil.copytree(sft_adapter, newer)
    (newer / "adapter_config.json").touch()  # copytree keeps the mtime
    (newer / "resolved_task.yaml").write_text(resolved.read_text().replace(f"preference_task: {dpo_task}", ""))
    task = continuation_task(["train.lr=1e-4"], runs=tmp_path / "runs")
    assert task.name == "dpo" and task.adapter.init_adapter == str(sft_adapter)
    assert task.base.path == str(tiny_base_path) and task.train.lr == 1e-4
    # the CLI: no task at all, or only overrides
    assert main(["dpo", "--dry-run"]) == 0
    assert main(["dpo", "train.lr=1e-4", "--dry-run"]) == 0
    assert "pair 1:" in capsys.readouterr().out


def test_dpo_without_a_task_or_a_finished_sft_run_says_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["dpo"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lmdiff-ft sft tasks/nasa_qa.yaml" in err


def test_the_reference_check_allows_the_compute_dtype_rounding_only():
    assert reference_change(-100.0, -100.0, torch.float32) == 0
    assert reference_change(-100.0, -100.0005, torch.float32) == pytest.approx(5e-6)
    assert reference_change(-100.0, -100.5, torch.bfloat16) == pytest.approx(5e-3)
    with pytest.raises(UserError, match=r"reference model moved.*\(0.005 relative, 1e-05 allowed in float32\)"):
        reference_change(-100.0, -100.5, torch.float32)
    with pytest.raises(UserError, match="reference model moved"):
        reference_change(-100.0, float("nan"), torch.bfloat16)


def test_a_reference_that_moves_during_training_fails_the_run_with_one_line(
    tmp_path, tiny_base_path, pair_files, monkeypatch, capsys
):
    """The reference here is the base with the adapter disabled: a base weight that changes moves it (as a base
    parameter left trainable would). The run fails before it is published."""
    calls = []

    def base_moved_by_training(model, *args):
        calls.append(model)
        if len(calls) == 2:  # the evaluation after training
            with torch.no_grad():
                model.get_input_embeddings().weight.mul_(1.5)
        return evaluate_dpo(model, *args)

    monkeypatch.setattr(dpo, "evaluate_dpo", base_moved_by_training)
    task = write_task(tmp_path, tiny_base_path, dpo_body(None), name="dpo")
    assert main(["dpo", task, "train.max_steps=2", "eval.num_samples=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "lmdiff-ft dpo: error: the reference model moved during training" in err and "not published" in err
    assert not (tmp_path / "runs" / "dpo" / "adapter_config.json").exists()
