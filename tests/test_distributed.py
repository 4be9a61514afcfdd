"""Beyond one process: `accelerate launch -m lmdiff_ft` with two CPU processes (gloo), the shipped accelerate
configs as accelerate itself reads them, and `lmdiff-ft env`.

On a machine without GPUs `accelerate launch --cpu` starts a single process (accelerate runs several CPU
processes only through mpirun), so the two-process run uses the shipped DDP config: torchrun starts two ranks and
lmdiff-ft's trainer joins them in a gloo process group, as it would join NCCL ones on GPUs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from conftest import randomize_lmdiff_parameters, tiny_lmdiff_config
from safetensors.torch import load_file
from test_sft import QA, write_jsonl, write_task

from lmdiff_ft.cli import main
from lmdiff_ft.errors import UserError
from lmdiff_ft.model import LmDiffForCausalLM
from lmdiff_ft.model.modeling_lmdiff import LmDiffDecoderLayer
from lmdiff_ft.recipes.sft import run_sft
from lmdiff_ft.schema.load import load_task

CONFIGS = Path(__file__).parent.parent / "configs" / "accelerate"
SHIPPED = ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "multinode"]

# 16 rows, 4 steps of a global batch of 4: one epoch, so each step's rows depend on the shared shuffle.
# Eval reads the same file, so that all 16 rows are training rows.
TWO_PROCESS_BODY = """
adapter: {r: 8, alpha: 16, dropout: 0.0}
data: {train: qa.jsonl, eval: qa.jsonl, format: prompt_completion, fields: {prompt: question, completion: answer}}
train: {max_steps: 4, batch_size: 4, lr: 5.0e-3, logging_steps: 1, save_steps: 4, max_length: 64}
eval: {num_samples: 2, train_samples: 0, max_new_tokens: 4}
"""


@pytest.fixture
def qa_task(tmp_path, tiny_base_path):
    write_jsonl(tmp_path / "qa.jsonl", QA)
    return write_task(tmp_path, tiny_base_path, TWO_PROCESS_BODY)


def launch_two_processes(config: str, program: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch` with a shipped config and two CPU processes; fails the test with its stderr if it fails."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
    command += ["--num_processes", "2", "--main_process_port", "0", *program]  # port 0: tests may run side by side
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}  # no wrapped lines
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_same_adapter(single: Path, double: Path) -> dict[str, torch.Tensor]:
    """Two processes trained one process's adapter: the same tokens per step (the ranks split each global batch)
    and the same weights (to 1e-4 relative). Returns the two-process weights."""
    assert logged_steps(double) == logged_steps(single)
    single_weights = load_file(single / "adapter_model.safetensors")
    double_weights = load_file(double / "adapter_model.safetensors")
    assert double_weights.keys() == single_weights.keys()
    for name, expected in single_weights.items():
        difference = (double_weights[name] - expected).abs().max().item()
        assert difference <= 1e-4 * expected.abs().max().item(), name
    return double_weights


def logged_steps(run_dir: Path) -> list[tuple[int, float]]:
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return [(e["step"], e["num_tokens"]) for e in history if "loss" in e]


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_two_processes_train_the_same_adapter_as_one_with_the_same_global_batch(tmp_path, qa_task, packing):
    # packed: 8 rows of 2 examples (so global batches of 4 split evenly); each rank flattens its own rows
    packed = ["train.packing=true", "train.max_length=80"] if packing else []
    single, double = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    run_sft(load_task(qa_task, [*packed, f"output_dir={single}"]))  # 1 process x batch 4

    program = ["-m", "lmdiff_ft", "sft", qa_task, *packed, "train.batch_size=2", f"output_dir={double}"]  # 2 x 2
    done = launch_two_processes("ddp.yaml", program)

    # DDP averages per-rank gradients of (rank's token-loss sum) / (global token count) x world size: the same
    # gradient as one process, summed in another order (measured: 1.5e-6 relative at most). Ranks that are not
    # synchronised drift apart from the first step (measured: 1.8 relative).
    double_weights = assert_same_adapter(single, double)
    checkpoint = load_file(double / "checkpoint-4" / "adapter_model.safetensors")  # the trainer's own save
    assert all(torch.equal(checkpoint[name], weight) for name, weight in double_weights.items())

    # one adapter, one set of logs, one card: rank 0 writes, the other rank only computes
    assert not [p.name for p in double.iterdir() if "partial" in p.name]
    event_files = list((double / "runs").rglob("events.out.tfevents.*"))  # named events.out.tfevents.TIME.HOST.PID.N
    assert event_files and len({path.name.split(".")[-2] for path in event_files}) == 1, "one process logs"
    assert json.loads((double / "metrics.json").read_text())["global_step"] == 4
    assert (double / "README.md").is_file() and (double / "checkpoint-4" / "adapter_model.safetensors").is_file()
    out = done.stdout
    assert out.count("qa: before → after") == 1 and out.count("wrote ") == 1 and out.count("data: ") == 1


@pytest.mark.slow
def test_fsdp2_on_two_processes_shards_the_layers_and_trains_the_same_adapter_as_one(tmp_path, qa_task):
    """The shipped FSDP2 config with two CPU ranks (gloo), unquantized: every decoder layer's parameters are DTensors
    split across the ranks (not silently replicated), and the adapter matches one process with the same global
    batch."""
    single, double = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    run_sft(load_task(qa_task, ["quantization=none", f"output_dir={single}"]))

    script = Path(__file__).parent / "scripts" / "fsdp_sft.py"
    program = [str(script), str(tmp_path / "layers"), "sft", qa_task, "quantization=none", "train.batch_size=2"]
    launch_two_processes("fsdp.yaml", [*program, f"output_dir={double}"])

    for rank in (0, 1):
        report = json.loads((tmp_path / f"layers.rank{rank}.json").read_text())
        assert report["world_size"] == 2
        parameters = report["parameters"]
        assert parameters and all(p["dtensor"] for p in parameters.values())
        assert sum(p["local"] for p in parameters.values()) * 2 <= sum(p["full"] for p in parameters.values()) + 64
    assert_same_adapter(single, double)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_tensor_parallel_forward_generation_and_gradients_on_two_processes_match_one(tmp_path, tied):
    """transformers' tensor parallelism with LM-Diff's own plan (q2/k2 sharded by heads like q/k, the embedding and
    lm_head by vocabulary, tied or not): two CPU ranks under torchrun give one process's logits, tokens and
    gradients, including those of λ and subln, which each rank sees only through its own heads."""
    torch.manual_seed(0)
    model = LmDiffForCausalLM(tiny_lmdiff_config(tie_word_embeddings=tied)).eval()
    randomize_lmdiff_parameters(model)
    model.save_pretrained(tmp_path / "model")
    tokens = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding
    batch = {"input_ids": tokens, "attention_mask": mask}
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        logits = model(**batch).logits
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.train()(**batch, labels=batch["input_ids"]).loss.backward()

    script = Path(__file__).parent / "scripts" / "tensor_parallel_forward.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    command += [str(tmp_path / "model"), str(tmp_path / "batch.pt"), str(tmp_path / "tp")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    parallel = torch.load(tmp_path / "tp.pt")
    assert (parallel["logits"] - logits)[mask.bool()].abs().max().item() <= 1e-5
    assert torch.equal(parallel["generated"], generated)
    gradients = parallel["gradients"]
    layer = "model.layers.1.self_attn."
    for name in ("diff_lambda.lambda_q1", "diff_lambda.lambda_k2", "subln.weight", "o_proj.weight", "q2_proj.weight"):
        full = model.get_parameter(layer + name).grad
        local = gradients[layer + name]
        expected = full[: local.shape[0]] if local.shape[0] < full.shape[0] else full  # rank 0: the first half of rows
        expected = expected[:, : local.shape[1]] if local.dim() == 2 and local.shape[1] < full.shape[1] else expected
        torch.testing.assert_close(local, expected, atol=1e-6, rtol=1e-4, msg=name)
    shapes = json.loads((tmp_path / "tp.shapes.json").read_text())
    halved = [name for name, s in shapes.items() if s["local"][0] * 2 in (s["full"][0], s["full"][0] + 1)]
    layer = "model.layers.1.self_attn."
    for name in ("q_proj", "k_proj", "v_proj", "q2_proj", "k2_proj"):
        assert layer + name + ".weight" in halved  # by rows: each rank holds half the heads
    assert shapes[layer + "o_proj.weight"]["local"] == [64, 32]  # by columns
    assert "model.embed_tokens.weight" in halved  # 97 tokens: 49 on rank 0
    assert ("lm_head.weight" in halved) != tied  # tied: one tensor, listed once under the embedding's name
    assert shapes[layer + "diff_lambda.lambda_q1"]["local"] == shapes[layer + "diff_lambda.lambda_q1"]["full"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_and_name_only_settings_accelerate_has(name):
    path = CONFIGS / f"{name}.yaml"
    config = load_config_from_file(str(path))  # refuses unknown top-level keys
    options = {action.dest for action in launch_command_parser()._actions}
    nested = {**config.fsdp_config, **config.deepspeed_config}  # not checked by accelerate: a typo is ignored
    unknown = [key for key in nested if key not in options]
    assert not unknown, f"{path.name}: settings accelerate launch does not have: {unknown}"
    assert config.mixed_precision == "no", "the task's dtype decides; a bf16 here would force autocast on CPU runs"


def launcher_environment(name: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file NAME.yaml` gives each process."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def test_fsdp_config_builds_an_fsdp2_plugin_that_wraps_each_lmdiff_layer(monkeypatch):
    for key, value in launcher_environment("fsdp").items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # FULL_SHARD
    assert not plugin.activation_checkpointing and not plugin.cpu_ram_efficient_loading
    plugin.set_auto_wrap_policy(LmDiffForCausalLM(tiny_lmdiff_config()))  # raises if the class is not in the model
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {LmDiffDecoderLayer}


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_deepspeed_configs_build_the_plugin_and_leave_batch_settings_to_the_task(monkeypatch, name, stage):
    for key, value in launcher_environment(name).items():
        monkeypatch.setenv(key, value)
    config = DeepSpeedPlugin().deepspeed_config
    assert config["zero_optimization"]["stage"] == stage
    assert config["gradient_accumulation_steps"] == config["train_micro_batch_size_per_gpu"] == "auto"
    if stage == 3:  # whole weights on save (the final adapter is gathered), no zero.Init (the base loads first)
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert os.environ["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "false"


def test_fsdp1_is_refused_before_any_work(qa_task, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UserError, match="fsdp_version: 2"):
        run_sft(load_task(qa_task), dry_run=True)


def test_env_reports_versions_devices_and_a_working_4bit_check(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"] == torch.__version__
    assert {"transformers", "peft", "trl", "accelerate", "bitsandbytes"} <= info["versions"].keys()
    assert info["cpu_count"] >= 1 and info["default_device"] in ("cpu", "cuda:0")
    assert info["4bit"]["works"] is True, info["4bit"]  # bitsandbytes is a dependency: 4-bit must run here
    assert main(["env"]) == 0
    table = capsys.readouterr().out
    assert "4-bit (bitsandbytes)" in table and "works" in table and "transformers" in table
