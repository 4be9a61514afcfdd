"""SIGTERM/SIGINT during training (what SLURM, Kubernetes and spot VMs send before SIGKILL): the run finishes its
optimizer step, writes a complete checkpoint, exits 143/130 with one line saying how to continue, and `--resume` ends
as the uninterrupted run does. A second signal stops at once and leaves the last complete checkpoint loadable. Under
`accelerate launch` a signal to one rank stops every rank at the same step.

The runs signal themselves at a fixed point (tests/scripts/signal_at_step.py): an outside signal races a tiny run."""

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file
from test_distributed import CONFIGS, TWO_PROCESS_BODY
from test_dpo import dpo_body, pair_files  # noqa: F401  (a fixture)
from test_sft import QA, QA_BODY, losses, run_cli, write_jsonl, write_task
from transformers import TrainerControl

from lmdiff_ft.recipes import preemption
from lmdiff_ft.recipes.checkpoints import checkpoint_problem
from lmdiff_ft.recipes.dpo import run_dpo
from lmdiff_ft.recipes.preemption import StopOnSignal
from lmdiff_ft.recipes.sft import run_sft
from lmdiff_ft.schema.load import load_task

SCRIPT = Path(__file__).parent / "scripts" / "signal_at_step.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
SFT = ["train.max_steps=8", "train.save_steps=4", "eval.num_samples=0", "eval.train_samples=0"]


def signalled(args: list[str], step: int, name: str, again: bool = False) -> subprocess.CompletedProcess:
    """`lmdiff-ft ARGS` that gets SIG`name` during the optimizer step after `step` (and, with `again`, once more
    while it writes the checkpoint the first one asked for)."""
    command = [sys.executable, str(SCRIPT), str(step), name, "0", *(["again"] if again else []), "--", *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)


def assert_same_losses(run: Path, reference: Path, rel: float = 1e-5) -> None:
    got, expected = losses(run), losses(reference)
    assert got.keys() == expected.keys()
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=rel), step


@pytest.fixture
def qa_task(tmp_path, tiny_base_path):
    write_jsonl(tmp_path / "qa.jsonl", QA)
    return write_task(tmp_path, tiny_base_path, QA_BODY)


@pytest.fixture
def python_ctrl_c():
    """Python's own SIGINT handler, whatever the process inherited (a shell's background job ignores SIGINT)."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def test_a_signal_asks_for_a_checkpoint_and_a_stop_at_the_step_end_and_a_later_one_acts_at_once(
    monkeypatch, python_ctrl_c
):
    callback = StopOnSignal()
    previous = signal.getsignal(signal.SIGINT)
    callback.install()
    try:
        signal.raise_signal(signal.SIGINT)
        control = callback.on_step_end(SimpleNamespace(device="cpu"), None, TrainerControl())
        assert control.should_save and control.should_training_stop and callback.stopped_by == signal.SIGINT
        signal.raise_signal(signal.SIGINT)  # the launcher's copy of the same signal: no effect
        monkeypatch.setattr(preemption.time, "monotonic", lambda: callback.received_at + 2 * preemption.REPEAT_WINDOW_S)
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C, later: what Ctrl-C does without us
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is previous
    finally:
        callback.restore()
    assert signal.getsignal(signal.SIGINT) is previous


@pytest.mark.slow
@pytest.mark.parametrize("name, code", [("TERM", 143), ("INT", 130)])
def test_a_signal_between_checkpoints_saves_stops_with_its_code_and_resume_ends_as_the_uninterrupted_run(
    qa_task, tmp_path, name, code
):
    if name == "TERM":
        run_sft(load_task(qa_task, [*SFT, f"output_dir={tmp_path / 'straight'}"]))
    out = tmp_path / "runs" / "qa"

    stopped = signalled(["sft", qa_task, *SFT], step=5, name=name)  # during step 6; checkpoint-4 is the last periodic
    assert stopped.returncode == code, stopped.stderr[-3000:]
    resume = shlex.join(["lmdiff-ft", "sft", qa_task, *SFT, "--resume"])
    assert stopped.stderr.rstrip().endswith(f"\nstopped at step 6 by SIG{name}; continue with `{resume}`")
    assert "Traceback" not in stopped.stderr
    assert checkpoint_problem(out / "checkpoint-6") is None
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    assert not (out / "adapter_config.json").exists(), "a stopped run must not look finished"
    if name == "INT":
        return  # the checkpoint is the same whichever signal asked for it: one resume (below) is enough

    resumed = run_cli(["sft", qa_task, *SFT, "--resume"])
    assert resumed.wait() == 0, resumed.stderr.read()
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 8
    assert_same_losses(out, tmp_path / "straight")


@pytest.mark.slow
def test_a_second_signal_stops_at_once_and_leaves_the_last_complete_checkpoint(qa_task, tmp_path):
    run_sft(load_task(qa_task, [*SFT, f"output_dir={tmp_path / 'straight'}"]))
    out = tmp_path / "runs" / "qa"

    killed = signalled(["sft", qa_task, *SFT], step=5, name="TERM", again=True)  # again while writing checkpoint-6
    assert killed.returncode == -signal.SIGTERM, killed.stderr[-3000:]
    assert (out / "checkpoint-6").is_dir() and checkpoint_problem(out / "checkpoint-6") is not None
    assert checkpoint_problem(out / "checkpoint-4") is None

    resumed = run_cli(["sft", qa_task, *SFT, "--resume"])
    assert resumed.wait() == 0, resumed.stderr.read()
    assert_same_losses(out, tmp_path / "straight")


@pytest.mark.slow
def test_dpo_stops_on_sigterm_and_resumes_to_the_uninterrupted_loss(tmp_path, tiny_base_path, pair_files):  # noqa: F811
    task = write_task(tmp_path, tiny_base_path, dpo_body(None), name="dpo")
    overrides = ["train.max_steps=6", "train.save_steps=4", "train.logging_steps=1", "eval.num_samples=0"]
    run_dpo(load_task(task, [*overrides, f"output_dir={tmp_path / 'straight'}"]))
    out = tmp_path / "runs" / "dpo"

    stopped = signalled(["dpo", task, *overrides], step=4, name="TERM")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "stopped at step 5 by SIGTERM; continue with `lmdiff-ft dpo " in stopped.stderr
    assert checkpoint_problem(out / "checkpoint-5") is None

    resumed = run_cli(["dpo", task, *overrides, "--resume"])
    assert resumed.wait() == 0, resumed.stderr.read()
    assert_same_losses(out, tmp_path / "straight")


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_at_the_same_step_and_two_processes_resume_exactly(tmp_path, tiny_base_path):
    write_jsonl(tmp_path / "qa.jsonl", QA)
    task = write_task(tmp_path, tiny_base_path, TWO_PROCESS_BODY)
    single, double = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    run_sft(load_task(task, [f"output_dir={single}"]))  # 1 process x batch 4, 4 steps

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml")]
    launch += ["--num_processes", "2", "--main_process_port", "0"]
    program = ["sft", task, "train.batch_size=2", f"output_dir={double}"]  # 2 x 2
    command = [*launch, str(SCRIPT), "1", "TERM", "1", "--", *program]  # rank 1 alone, during step 2
    stopped = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert stopped.returncode != 0
    assert stopped.stderr.count("stopped at step 2 by SIGTERM; continue with `lmdiff-ft sft ") == 1, stopped.stderr
    checkpoint = double / "checkpoint-2"
    assert checkpoint_problem(checkpoint) is None
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 2

    resumed = subprocess.run(
        [*launch, "-m", "lmdiff_ft", *program, "--resume"], env=ENV, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the same weights and losses as one process (test_distributed.py: summed in another order, 1.5e-6 relative);
    # TRL's logged token count restarts at a resume (after kill -9 too), so the steps' token counts are not compared
    assert_same_losses(double, single, rel=1e-4)
    for name, expected in load_file(single / "adapter_model.safetensors").items():
        got = load_file(double / "adapter_model.safetensors")[name]
        assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item(), name
