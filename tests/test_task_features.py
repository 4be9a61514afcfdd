"""What users bring from Axolotl and LLaMA-Factory, end to end on the tiny base: several sources mixed, ShareGPT,
loggers, evaluation during training with early stopping and the best checkpoint, TRL pass-through, the Hub."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmdiff_ft.cli import main
from lmdiff_ft.recipes.sft import run_sft
from lmdiff_ft.schema.load import load_task

QA = [{"question": f"What is fact number {i} about Mars?", "answer": f"Fact {i}"} for i in range(16)]
CHAT = [
    {"conversations": [{"from": "human", "value": f"Say hello to planet {i}."}, {"from": "gpt", "value": f"Hi {i}"}]}
    for i in range(8)
]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_task(tmp_path, base, body: str, name: str = "mixed") -> str:
    write_jsonl(tmp_path / "qa.jsonl", QA)
    write_jsonl(tmp_path / "chat.jsonl", CHAT)
    task = tmp_path / f"{name}.yaml"
    task.write_text(f"name: {name}\nbase: {base}\nquantization: none\noutput_dir: {tmp_path / 'runs' / name}\n" + body)
    return str(task)


def scalar_tags(events) -> list[str]:
    return EventAccumulator(str(events)).Reload().Tags()["scalars"]


# The example of docs/tasks.md ("Everything together"), on the tiny base and with steps a test can afford.
MIXED = """
adapter: {r: 8, alpha: 16, dropout: 0.0}
data:
  eval_fraction: 0.25
  train:
    - {path: qa.jsonl, fields: {prompt: question, completion: answer}, weight: 2}
    - {path: chat.jsonl, format: sharegpt, weight: 1}
train:
  max_steps: 40
  batch_size: 2
  lr: 5.0e-3
  logging_steps: 1
  max_length: 64
  eval_steps: 5
  save_steps: 5
  load_best_model_at_end: true
  metric_for_best_model: exact_match
  eval_generation_samples: 2
  early_stopping_patience: 1
  report_to: [tensorboard, mlflow]
eval: {metrics: [exact_match], num_samples: 2, train_samples: 0, max_new_tokens: 4}
"""


@pytest.mark.slow
def test_a_mixed_task_logs_evaluates_stops_early_and_publishes_its_best_checkpoint(
    tmp_path, tiny_base_path, monkeypatch
):
    """JSONL prompt/completion + ShareGPT at 2:1, TensorBoard + MLflow, evaluated every 5 steps on the eval loss and
    exact match of 2 generated answers. The tiny base answers none right: exact match 0.0 at step 5 is the best,
    not beaten at step 10, so training stops there (patience 1) and publishes checkpoint-5."""
    monkeypatch.chdir(tmp_path)  # MLflow's default store: ./mlflow.db
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    metrics = run_sft(load_task(write_task(tmp_path, tiny_base_path, MIXED)))
    run = tmp_path / "runs" / "mixed"

    assert metrics["global_step"] == 10  # stopped early, of 40
    assert metrics["best_checkpoint"] == {"step": 5, "metric": 0.0}
    published = load_file(run / "adapter_model.safetensors")
    best = load_file(run / "checkpoint-5" / "adapter_model.safetensors")
    last = load_file(run / "checkpoint-10" / "adapter_model.safetensors")
    assert all((published[k] == best[k]).all() for k in best)
    assert any((published[k] != last[k]).any() for k in last)
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    # before training, every 5 steps, after training (checkpoint-5's again: one eval-loss definition throughout)
    evaluations = [(0, metrics["before"]["eval_loss"])]
    evaluations += [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    assert [step for step, _ in evaluations] == [0, 5, 10, 10]
    assert evaluations[-1][1] == pytest.approx(evaluations[1][1], rel=1e-6)
    assert metrics["eval_curve"] == [{"step": s, "eval_loss": loss} for s, loss in evaluations[:3]]
    assert [e["step"] for e in history if "eval_exact_match" in e] == [5, 10]
    tags = {tag for events in run.glob("runs/*/events.out.tfevents.*") for tag in scalar_tags(events)}
    assert {"eval/loss", "eval/exact_match", "train/loss"} <= set(tags)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (mlflow_run,) = client.search_runs(["0"])  # the default experiment
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "mixed"  # one run, before to after
    eval_loss = client.get_metric_history(mlflow_run.info.run_id, "eval_loss")
    assert [m.step for m in eval_loss] == [step for step, _ in evaluations]
    assert [m.value for m in eval_loss] == pytest.approx([loss for _, loss in evaluations])
    assert [m.value for m in client.get_metric_history(mlflow_run.info.run_id, "eval_exact_match")] == [0.0, 0.0]
    assert len(client.get_metric_history(mlflow_run.info.run_id, "loss")) == 10


SHORT = """
adapter: {r: 4, alpha: 8, dropout: 0.0}
data: {train: qa.jsonl, eval_fraction: 0.25, fields: {prompt: question, completion: answer}}
train: {max_steps: 2, batch_size: 4, save_steps: 1, max_length: 64, push_to_hub: true, hub_model_id: me/qa-adapter,
        hub_private: false}
eval: {num_samples: 0, train_samples: 0}
"""


def test_push_to_hub_uploads_the_published_run(tmp_path, tiny_base_path, monkeypatch, capsys):
    """The Hub API's boundary (create_repo, upload_folder) mocked: the repo id, the private flag, and which files
    upload_folder would send (huggingface_hub's own filter over the run directory)."""
    calls = {}

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        calls["create_repo"] = (repo_id, private, exist_ok)

    def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kwargs):
        files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        calls["upload_folder"] = (repo_id, set(filter_repo_objects(files, ignore_patterns=ignore_patterns)))
        return SimpleNamespace(repo_url=f"https://huggingface.co/{repo_id}")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert main(["sft", write_task(tmp_path, tiny_base_path, SHORT, name="qa")]) == 0
    assert calls["create_repo"] == ("me/qa-adapter", False, True)
    repo_id, files = calls["upload_folder"]
    run = tmp_path / "runs" / "qa"
    assert repo_id == "me/qa-adapter" and (run / "checkpoint-2").is_dir() and (run / "runs").is_dir()
    assert files == {
        "adapter_config.json", "adapter_model.safetensors", "README.md", "metrics.json", "resolved_task.yaml",
        "trainer_state.json", "loss_curve.png", "lmdiff_base.json", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja",
    }  # fmt: skip
    printed = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert f"pushed {run} to https://huggingface.co/me/qa-adapter" in printed


def test_a_push_that_fails_is_one_line_and_leaves_the_run_complete(tmp_path, tiny_base_path, capsys):
    """Offline (tests/conftest.py sets HF_HUB_OFFLINE=1), the real Hub client fails: one line, exit 2, and the run
    is published on disk all the same."""
    assert main(["sft", write_task(tmp_path, tiny_base_path, SHORT, name="qa")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    run = tmp_path / "runs" / "qa"
    assert err.startswith(
        f"lmdiff-ft sft: error: {run}: trained and saved, but pushing it to the Hub repo me/qa-adapter failed ("
    )
    assert err.endswith(f"push it later with `hf upload me/qa-adapter {run}`")
    assert (run / "adapter_config.json").is_file() and (run / "adapter_model.safetensors").is_file()


def wandb_history(run_file: Path) -> list[dict]:
    """The `history` records (one per logged step) of an offline W&B run file. It is LevelDB's log format after a
    7-byte header: 32 KiB blocks of chunks, each with a 7-byte header (checksum, length, type: 1 whole record,
    2/3/4 its first/middle/last part); a block's last bytes are padding when a chunk header does not fit."""
    from wandb.proto import wandb_internal_pb2

    data, position, parts, history = run_file.read_bytes(), 7, b"", []
    while position + 7 <= len(data):
        if (left := 32768 - position % 32768) < 7:
            position += left
            continue
        length, kind = struct.unpack_from("<HB", data, position + 4)
        parts += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(parts)
            if record.WhichOneof("record_type") == "history":
                history.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
            parts = b""
    return history


@pytest.mark.slow
def test_metrics_reach_weights_and_biases_offline(tmp_path, tiny_base_path):
    """W&B in offline mode (no account, no network) writes its run under WANDB_DIR, every logged step included."""
    task = write_task(tmp_path, tiny_base_path, SHORT.replace("push_to_hub: true", "push_to_hub: false"), name="qa")
    overrides = ["train.report_to=[wandb]", "train.eval_steps=1", "train.logging_steps=1"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    done = subprocess.run([sys.executable, "-m", "lmdiff_ft", "sft", task, *overrides], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    losses = [(h["train/global_step"], h["train/loss"]) for h in history if "train/loss" in h]
    assert [step for step, _ in losses] == [1, 2] and all(loss > 0 for _, loss in losses)
    evaluations = [h["train/global_step"] for h in history if "eval/loss" in h]
    assert evaluations[:3] == [0, 1, 2]  # before training, then every step
