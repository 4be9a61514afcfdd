"""The benchmark scripts run end to end from a clone, and the FLOP count that MFU rests on follows the
2/4/6 rule minus exactly what autograd skips."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench` lives at the repository root
from bench.common import Dims, build_lora_model  # noqa: E402
from bench.flops import training_flops_per_token, weight_flops_per_token  # noqa: E402

SMALL = ["--layers", "2", "--hidden", "64", "--intermediate", "96", "--heads", "4", "--kv-heads", "2", "--vocab", "128"]
SMALL_DIMS = Dims(layers=2, hidden=64, intermediate=96, heads=4, kv_heads=2, vocab=128)


def test_weight_flops_follow_the_two_four_six_rule():
    """Llama under LoRA on q/k/v/o: 4 FLOPs per frozen and 6 per trainable parameter, except that the first
    layer's q/k/v (and their LoRA A) read the frozen embeddings, whose input gradient autograd never forms."""
    model = build_lora_model("llama", SMALL_DIMS, torch.device("meta"), torch.float32)
    frozen = trainable = first_layer_inputs = 0
    for name, param in model.named_parameters():
        if param.dim() != 2 or "embed_tokens" in name:
            continue
        if param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
        if ".layers.0.self_attn." in name and any(p in name for p in ("q_proj", "k_proj", "v_proj")):
            if "lora_B" not in name:
                first_layer_inputs += param.numel()
    expected = 4 * frozen + 6 * trainable - 2 * first_layer_inputs
    assert weight_flops_per_token("llama", SMALL_DIMS)["weights"] == expected


def test_naive_reference_is_credited_lmdiff_flops():
    lmdiff = training_flops_per_token("lmdiff", SMALL_DIMS, 64)
    assert training_flops_per_token("naive", SMALL_DIMS, 64) == lmdiff
    assert lmdiff["total"] > training_flops_per_token("llama", SMALL_DIMS, 64)["total"]


def run_bench(script: str, out: Path, *flags: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", f"bench.{script}", *SMALL, "--repeats", "1", "--out", str(out), *flags]
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: the dtype paths of the GPU runs
def test_train_step_and_decode_benchmarks_run(tmp_path, dtype):
    train = run_bench("train_step", tmp_path / "train.json", "--seq-lens", "32", "--dtype", dtype)
    rows = {row["variant"]: row for row in train["rows"]}
    assert set(rows) == {"lmdiff", "llama", "naive"}
    assert all(row["tokens_per_s"] > 0 and row["mfu"] > 0 for row in rows.values())
    assert rows["naive"]["lmdiff_speed_ratio"] > 0 and rows["naive"]["lmdiff_speed_ratio_ceiling"] > 0

    decode = run_bench(
        "decode", tmp_path / "decode.json", "--contexts", "8", "24", "--new-tokens", "4", "--dtype", dtype
    )
    cached = [row for row in decode["rows"] if row["cache"]]
    assert {(row["variant"], row["context"]) for row in cached} == {
        (variant, context) for variant in ("lmdiff", "llama") for context in (8, 24)
    }
    assert all(row["token_ms"] > 0 for row in decode["rows"])
