"""The benchmark scripts run end to end from a clone at tiny dims, the FLOP count that MFU rests on follows the
2/4/6 rule minus exactly what autograd skips, and every variant trains what the README says it trains.

The scripts' `main` runs in this process (an interpreter start costs more than a tiny benchmark); the workers
they start for memory and timing isolation are real subprocesses."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench` lives at the repository root
from bench import decode, dpo_memory, sft_step, sft_throughput, train_step, transformers_model_tests  # noqa: E402
from bench.common import (  # noqa: E402
    DIFFLLAMA_LAMBDAS,
    GEMM_MAX_TOKENS,
    Dims,
    build_lora_model,
    gemm_flops,
    gemm_seconds,
    gemm_shape,
    portable,
)
from bench.flops import training_flops_per_token, weight_flops_per_token  # noqa: E402
from lmdiff_ft.model.modeling_lmdiff import LmDiffAdaptiveRMSNorm  # noqa: E402

SMALL = ["--layers", "2", "--hidden", "64", "--intermediate", "96", "--heads", "4", "--kv-heads", "2", "--vocab", "128"]
SMALL_DIMS = Dims(layers=2, hidden=64, intermediate=96, heads=4, kv_heads=2, vocab=128)
META = torch.device("meta")


def test_weight_flops_follow_the_two_four_six_rule():
    """Llama under LoRA on q/k/v/o: 4 FLOPs per frozen and 6 per trainable parameter, except that the first
    layer's q/k/v (and their LoRA A) read the frozen embeddings, whose input gradient autograd never forms."""
    model = build_lora_model("llama", SMALL_DIMS, META, torch.float32)
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
    """The naive reference runs fc_gamma although it is frozen at zero; LM-Diff skips it. It is credited the
    products LM-Diff needs, so its MFU is useful work too."""
    lmdiff = training_flops_per_token("lmdiff", SMALL_DIMS, 64)
    assert weight_flops_per_token("naive", SMALL_DIMS)["weights"] > lmdiff["weights"]
    assert training_flops_per_token("naive", SMALL_DIMS, 64) == lmdiff
    assert lmdiff["total"] > training_flops_per_token("llama", SMALL_DIMS, 64)["total"]


def test_difflama_and_diff_attention_only_variants():
    """DiffLlama: LoRA on q/k/v/o plus its λ vectors, Llama's weight products and two attention maps like LM-Diff.
    LM-Diff with differential attention alone: no SE gate, adaptive norm or token mixing left to run."""
    difflama = build_lora_model("difflama", SMALL_DIMS, META, torch.float32)
    trainable = [name for name, param in difflama.named_parameters() if param.requires_grad]
    lambdas = [name for name in trainable if name.rsplit(".", 1)[-1] in DIFFLLAMA_LAMBDAS]
    assert len(lambdas) == 4 * SMALL_DIMS.layers
    assert {name.split(".")[-4] for name in trainable if "lora_" in name} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert all(param.device == META for param in difflama.parameters())

    llama, diff = (training_flops_per_token(v, SMALL_DIMS, 64) for v in ("llama", "difflama"))
    assert diff["weights"] == llama["weights"] and diff["attention"] == 2 * llama["attention"]

    attn_only = build_lora_model("lmdiff-attn", SMALL_DIMS, META, torch.float32)
    names = [name for name, _ in attn_only.named_modules()]
    assert any("q2_proj.lora_A" in n for n in names) and any("diff_lambda.modules_to_save" in n for n in names)
    assert not any(part in n for n in names for part in ("se_gate", "fc_gamma", "token_mixing"))
    full = training_flops_per_token("lmdiff", SMALL_DIMS, 64)
    assert llama["weights"] < training_flops_per_token("lmdiff-attn", SMALL_DIMS, 64)["weights"] < full["weights"]


def test_gemm_probe_is_sized_from_the_run():
    """The probe is the MLP's up projection of the step's tokens (rows capped): tiny at test dims, in any dtype."""
    assert gemm_shape(SMALL_DIMS, 32) == (32, 64, 96)
    assert gemm_shape(Dims(), 100_000) == (GEMM_MAX_TOKENS, 2048, 5632)
    assert gemm_flops((32, 64, 96)) == 2 * 32 * 64 * 96
    assert gemm_seconds(torch.device("cpu"), torch.bfloat16, gemm_shape(SMALL_DIMS, 32))() > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: the dtype paths of the GPU runs
def test_train_step_and_decode_benchmarks_run(tmp_path, dtype, capsys):
    train_step.main([*SMALL, "--repeats", "1", "--seq-lens", "32", "--dtype", dtype, "--out", str(tmp_path / "t.json")])
    train = json.loads((tmp_path / "t.json").read_text())
    rows = {row["variant"]: row for row in train["rows"]}
    assert set(rows) == {"lmdiff", "lmdiff-attn", "difflama", "llama", "naive"}
    assert all(row["tokens_per_s"] > 0 and row["mfu"] > 0 for row in rows.values())
    assert all(row["gemm_shape"] == [32, 64, 96] for row in rows.values())
    assert rows["naive"]["lmdiff_speed_ratio"] > 0 and rows["naive"]["lmdiff_speed_ratio_ceiling"] > 0
    ratios = {(r["variant"], r["over"]): r["ratio"] for r in train["ratios"]}
    assert ratios[("lmdiff", "difflama")] == rows["difflama"]["lmdiff_speed_ratio"]
    assert ratios[("lmdiff-attn", "difflama")] > 0

    decode.main(
        [*SMALL, "--repeats", "1", "--contexts", "8", "24", "--new-tokens", "4", "--dtype", dtype]
        + ["--out", str(tmp_path / "d.json")]
    )
    rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    cached = [row for row in rows if row["cache"]]
    assert {(row["variant"], row["context"]) for row in cached} == {
        (variant, context) for variant in ("lmdiff", "llama") for context in (8, 24)
    }
    assert all(row["token_ms"] > 0 for row in rows)
    assert "LM-Diff (ours) / DiffLlama (transformers, sdpa)" in capsys.readouterr().out


def test_dpo_memory_builds_its_checkpoint_and_runs(tmp_path, monkeypatch):
    """From a clone with no runs/bench/: the random checkpoint is built at the dims flags, then both workers run."""
    monkeypatch.setenv("LMDIFF_FT_CACHE", str(tmp_path / "cache"))
    checkpoint, out = tmp_path / "checkpoint", tmp_path / "dpo.json"
    dims = ["--layers", "1", "--hidden", "64", "--intermediate", "96", "--heads", "4", "--kv-heads", "2"]
    dpo_memory.main([*dims, "--vocab", "4096", "--seq-len", "16", "--checkpoint", str(checkpoint), "--out", str(out)])
    assert (checkpoint / "config.json").is_file()
    result = json.loads(out.read_text())
    assert [row["trainer"] for row in result["rows"]] == ["sft", "dpo"]
    assert all(row["peak_rss_gb"] > 0 for row in result["rows"]) and result["dpo_over_sft_peak"] > 0


def test_sft_throughput_runs_both_sides_on_the_same_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("LMDIFF_FT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sft.json"
    sft_throughput.main(
        ["--base", "tiny", "--steps", "2", "--repeats", "1", "--quantizations", "none", "--out", str(out)]
        + ["--overrides", "train.batch_size=2", "train.grad_accum=1", "data.max_samples=16"]
    )
    result = json.loads(out.read_text())
    rows = {row["arm"]: row for row in result["rows"]}
    assert set(rows) == {"lmdiff", "stock"}
    assert all(row["trained_tokens_per_s"] > 0 and row["peak_rss_mib"] > 0 for row in rows.values())
    [ratio] = result["ratios"]
    assert ratio["quantization"] == "none" and ratio["trained_tokens_per_s"] > 0
    lmdiff, stock = result["runs"]  # one round: the same rows in the same order, so the same tokens
    assert lmdiff["trained_tokens_per_step"] == stock["trained_tokens_per_step"]
    assert lmdiff["total_tokens"] == stock["total_tokens"] > lmdiff["trained_tokens"] > 0


def test_sft_step_profiles_one_optimizer_step_today_and_as_before(tmp_path, tiny_base_path):
    rows = [{"question": f"Which planet does probe {i} study?", "answer": "Mars"} for i in range(32)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "qa.yaml"
    task.write_text(
        f"name: qa\nbase: {tiny_base_path}\nquantization: nf4\n"
        "data: {train: qa.jsonl, fields: {prompt: question, completion: answer}}\n"
        "train: {batch_size: 2, grad_accum: 2, max_length: 64}\n"
    )
    for baseline in (False, True):
        out = tmp_path / f"step-{baseline}.json"
        sft_step.main(["--task", str(task), "--repeats", "1", "--out", str(out)] + ["--baseline"] * baseline)
        result = json.loads(out.read_text())
        assert (result["rows"], result["micro_batches"]) == ((16, 1) if baseline else (4, 2))
        assert result["step_s"] > 0 and result["profile_s"]["matrix products"] > 0
        assert result["tokens"] > result["trained_tokens"] > 0
        products = result["matrix_products"]
        assert products["flops"] > 0 and products["seconds_as_plain_products"] > 0 and products["shapes"] > 0
    # the baseline's patches are undone
    assert LmDiffAdaptiveRMSNorm._gamma_is_frozen_zero.__name__ == "_gamma_is_frozen_zero"


def test_transformers_model_tests_refuse_a_folder_that_is_no_repository_tree(tmp_path):
    """The harness needs a transformers repository tree (not in CI: its test files are not shipped with the wheel);
    anything else stops it before any test runs, naming what is missing."""
    (tmp_path / "tests").mkdir()
    missing = "is not a transformers repository tree: missing pyproject.toml, tests/__init__.py"
    with pytest.raises(SystemExit, match=missing):
        transformers_model_tests.main(["--transformers-tree", str(tmp_path)])


def test_transformers_model_tests_sort_each_difference_from_the_control():
    outcome = {s: {"outcome": s, "message": f"{s} because"} for s in ("passed", "failed", "skipped", "error")}
    ours = {"a": outcome["failed"], "b": outcome["skipped"], "c": outcome["error"], "d": outcome["passed"]}
    control = {"a": outcome["passed"], "b": outcome["passed"], "c": outcome["failed"], "d": outcome["skipped"]}
    diffs = transformers_model_tests.compare(ours | {"e": outcome["passed"]}, control)
    assert [row["test"] for row in diffs["lmdiff_fails_llama_passes"]] == ["a"]
    skipped = {"test": "b", "lmdiff": "skipped", "llama": "passed", "reason": "skipped because"}
    assert diffs["lmdiff_skips_llama_runs"] == [skipped]
    assert [row["test"] for row in diffs["both_fail"]] == ["c"]
    assert [row["test"] for row in diffs["lmdiff_runs_llama_skips"]] == ["d"]
    assert diffs["only_one_model_ran"] == [{"test": "e", "lmdiff": outcome["passed"], "llama": None}]


def test_results_name_paths_any_clone_can_read():
    """A result file says `tasks/nasa_qa.yaml`, not the measuring machine's checkout or home directory."""
    document = {"task": ROOT / "tasks" / "nasa_qa.yaml", "cache": [str(Path.home() / ".cache" / "x")], "n": 3}
    assert portable(document) == {"task": "tasks/nasa_qa.yaml", "cache": ["~/.cache/x"], "n": 3}
    for path in (ROOT / "bench" / "results").rglob("*.json"):
        absolute = [v for v in strings(json.loads(path.read_text())) if v.startswith("/") and not v.startswith("/tmp/")]
        assert not absolute, f"{path.name}: {absolute[:3]}"  # a temporary directory is the only absolute path left


def strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return [value] if isinstance(value, str) else []
