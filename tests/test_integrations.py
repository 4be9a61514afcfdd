"""Each workaround in lmdiff_ft/integrations/ against the library it works around: it must still apply, and do
what it says. A failure here means the library changed; re-check the workaround against the new version."""

import ast
import contextlib
import importlib
import importlib.metadata
import inspect
import logging
import os
import sys
from pathlib import Path

import accelerate
import accelerate.utils.launch
import bitsandbytes as bnb
import pytest
import torch
import trl.trainer.utils as trl_utils
from conftest import tiny_lmdiff_config
from datasets import Dataset
from safetensors import safe_open
from transformers import AutoModelForCausalLM, EarlyStoppingCallback, LlamaConfig, Trainer, TrainingArguments
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticCache
from transformers.integrations.integration_utils import TensorBoardCallback
from trl import DPOTrainer, SFTConfig, SFTTrainer
from trl.kernels import chunked_logprob

import lmdiff_ft.integrations
from lmdiff_ft.adapters.presets import attach_adapters
from lmdiff_ft.base.loading import load_base
from lmdiff_ft.cli import main
from lmdiff_ft.integrations import versions
from lmdiff_ft.integrations.accelerate import (
    default_config_file,
    fsdp_enabled,
    fsdp_version,
    parameters_sharded,
)
from lmdiff_ft.integrations.bitsandbytes import (
    CPU_OPS_LOGGER,
    CPU_REPACKING_SWITCH,
    HUB_KERNEL_NOTICE,
    dense_weight,
    keep_4bit_layout_trainable,
    quiet_hub_kernel_notice,
)
from lmdiff_ft.integrations.glibc import (
    INITIAL_MMAP_THRESHOLD,
    M_MMAP_THRESHOLD,
    glibc,
    pin_malloc_mmap_threshold,
    trim_malloc_heap,
)
from lmdiff_ft.integrations.transformers import (
    DynamicLayerWithStates,
    StaticLayerWithStates,
    causal_lm_from_state_dict,
    evaluate_with,
    tensorboard_logs_in,
    with_layers_of,
)
from lmdiff_ft.integrations.trl import (
    REFERENCE_ADAPTER,
    reference_model,
    score_labelled_positions_only,
    trainable_parameters_frozen,
)
from lmdiff_ft.integrations.versions import WORKED_AROUND
from lmdiff_ft.model import LmDiffForCausalLM
from lmdiff_ft.schema.task import AdapterConfig

PROJECT = trl_utils._ChunkedLogProbFunction.apply


def fused_model_output(monkeypatch, compact: bool):
    """TRL's fused LM head on a tiny LM-Diff; returns its output and the rows it projected."""
    monkeypatch.setattr(trl_utils, "_use_triton", chunked_logprob._use_triton)  # TRL's own; restored afterwards
    if compact:
        score_labelled_positions_only()
    torch.manual_seed(0)
    model = LmDiffForCausalLM(tiny_lmdiff_config())
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    rows = []
    monkeypatch.setattr(
        trl_utils._ChunkedLogProbFunction, "apply", lambda hidden, *a: rows.append(len(hidden)) or PROJECT(hidden, *a)
    )
    tokens = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(tokens, -100)
    labels[:, 9:] = tokens[:, 9:]  # the answer: the last 3 tokens of each row
    output = model(input_ids=tokens, labels=labels, fused_lm_head=True)
    output.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return output, rows, grads


def test_trl_fused_head_projects_only_labelled_positions_on_cpu(monkeypatch):
    """Checked against trl 1.16.0: `_fused_forward` looks the module-level `_use_triton` up on every call to decide
    whether to gather the labelled rows, and the kernels read their own copy in trl.kernels.chunked_logprob."""
    assert "compact = _use_triton(hidden_states.device)" in inspect.getsource(trl_utils.add_fused_lm_head)
    assert chunked_logprob._use_triton(torch.device("cpu")) is False
    full, full_rows, full_grads = fused_model_output(monkeypatch, compact=False)
    compact, compact_rows, compact_grads = fused_model_output(monkeypatch, compact=True)
    assert full_rows == [2 * 11] and compact_rows == [2 * 3]  # every shifted position vs the labelled ones
    assert chunked_logprob._use_triton(torch.device("cpu")) is False  # the kernels still run their torch code
    assert torch.allclose(full.loss, compact.loss, atol=1e-6)
    for field in ("log_probs", "entropy", "is_top1", "label_mask"):
        assert torch.allclose(getattr(full, field).float(), getattr(compact, field).float(), atol=1e-6), field
    for name, grad in full_grads.items():
        assert torch.allclose(grad, compact_grads[name], atol=1e-6), name


# --- trl: the QLoRA cast, the reference adapter ------------------------------------------------------------


def test_trl_casts_trainable_parameters_of_quantized_models_to_bf16_unless_frozen(tiny_base_path, tmp_path):
    """Checked against trl 1.16.0: SFTTrainer (and DPOTrainer) cast every parameter that requires grad to bf16 when
    the base is quantized; freezing them while the trainer is built keeps them in fp32."""
    source = inspect.getsource(SFTTrainer.__init__)
    assert "if param.requires_grad" in source and "param.data.to(torch.bfloat16)" in source
    dtypes = {}
    for frozen in (False, True):
        loaded = load_base(str(tiny_base_path), quantization="nf4")
        model = attach_adapters(loaded.model, AdapterConfig(r=4, alpha=8))
        rows = Dataset.from_list([{"prompt": "a", "completion": "b"}] * 2)
        args = SFTConfig(output_dir=str(tmp_path / str(frozen)), report_to=[], use_cpu=True, max_length=32)
        with trainable_parameters_frozen(model) if frozen else contextlib.nullcontext():
            SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=loaded.tokenizer)
        dtypes[frozen] = {p.dtype for p in model.parameters() if p.requires_grad}
    assert dtypes == {False: {torch.bfloat16}, True: {torch.float32}}


def test_trl_reference_is_the_ref_adapter_or_the_base(random_lmdiff):
    """Checked against trl 1.16.0: DPOTrainer copies a PeftModel's starting adapter as "ref", and scores the
    reference with `use_adapter(model, "ref" or None)`; `reference_model` makes the same choice."""
    assert f'model.add_adapter("{REFERENCE_ADAPTER}", default_config)' in inspect.getsource(DPOTrainer.__init__)
    model = attach_adapters(random_lmdiff, AdapterConfig(presets=["diff_attn"], r=4, alpha=8, dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # an adapter that changes the output
    ids = torch.randint(3, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        policy = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        with reference_model(model):
            assert torch.equal(model(input_ids=ids).logits, base)  # no "ref" adapter: the base
        model.add_adapter(REFERENCE_ADAPTER, model.peft_config["default"])
        model.eval()
        for name, param in model.named_parameters():
            if f".{REFERENCE_ADAPTER}." in name:
                param.data.copy_(model.get_parameter(name.replace(f".{REFERENCE_ADAPTER}.", ".default.")))
        with reference_model(model):
            assert torch.allclose(model(input_ids=ids).logits, policy)  # the frozen copy of the starting adapter
        assert model.active_adapter == "default"
    assert not torch.allclose(policy, base)


# --- transformers: the cache layer, loading a lazy state dict, TensorBoard's directory ---------------------


class _LayerWithSum(DynamicLayerWithStates):
    extra_states = ("running",)


def test_transformers_dynamic_layer_keeps_extra_states_with_the_batch():
    """Checked against transformers 5.24.0: `DynamicLayer` keeps `keys`/`values`, initialises lazily, and `generate`
    reorders, repeats and selects the batch through these methods of every layer."""
    for method in ("lazy_initialization", "get_seq_length", "reorder_cache", "batch_repeat_interleave"):
        assert callable(getattr(DynamicLayer, method)), method
    assert callable(DynamicLayer.batch_select_indices) and callable(DynamicLayer.reset)
    layer = _LayerWithSum()
    keys = torch.randn(2, 1, 6, 4)
    layer.update(keys[..., :3, :], keys[..., :3, :])
    layer.update(keys[..., 3:4, :], keys[..., 3:4, :])  # grows the buffer to twice the cached length
    buffer = layer.key_buffer
    got, _ = layer.update(keys[..., 4:5, :], keys[..., 4:5, :])  # fits: written in place
    assert layer.key_buffer is buffer and torch.equal(got, keys[..., :5, :]) and layer.get_seq_length() == 5
    layer.running = (torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [4.0]]))
    layer.reorder_cache(torch.tensor([1, 0]))
    assert layer.running[0].flatten().tolist() == [2.0, 1.0] and torch.equal(layer.keys[0], keys[1, ..., :5, :])
    layer.batch_repeat_interleave(2)
    assert layer.running[1].flatten().tolist() == [4.0, 4.0, 3.0, 3.0] and layer.keys.shape[0] == 4
    layer.batch_select_indices(torch.tensor([0, 3]))
    assert layer.running[1].flatten().tolist() == [4.0, 3.0]
    got, _ = layer.update(keys[..., 5:, :], keys[..., 5:, :])  # after a reorder the buffers are rebuilt
    assert got.shape == (2, 1, 6, 4) and torch.equal(got[0, ..., :5, :], keys[1, ..., :5, :])
    layer.reset()
    assert layer.running is None and layer.key_buffer is None
    with pytest.raises(NotImplementedError):
        layer.crop(1)


class _StaticLayerWithSum(StaticLayerWithStates):
    extra_states = ("running",)


def test_transformers_static_layer_writes_keys_and_extra_states_in_place():
    """Checked against transformers 5.24.0: `StaticLayer` preallocates `max_cache_len` slots at the first `update`,
    writes later tokens in place, counts them in a 0-d tensor, and `reset` zeroes; the extra states follow."""
    layer = _StaticLayerWithSum(max_cache_len=8)
    keys = torch.randn(2, 1, 4, 3)
    layer.update(keys[..., :3, :], keys[..., :3, :])
    layer.write_state("running", (torch.ones(2, 3), torch.full((2, 1), 3.0)))
    storage = [layer.keys.data_ptr(), *(t.data_ptr() for t in layer.running)]
    got, _ = layer.update(keys[..., 3:, :], keys[..., 3:, :])
    layer.write_state("running", (torch.full((2, 3), 2.0), torch.full((2, 1), 4.0)))
    assert got.shape == (2, 1, 8, 3) and torch.equal(got[..., :4, :], keys) and not got[..., 4:, :].any()
    assert [layer.keys.data_ptr(), *(t.data_ptr() for t in layer.running)] == storage
    assert isinstance(layer.get_seq_length(), torch.Tensor) and int(layer.get_seq_length()) == 4
    assert layer.running[1].flatten().tolist() == [4.0, 4.0]
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.keys[0, ..., :4, :], keys[1])
    layer.reset()
    assert int(layer.get_seq_length()) == 0 and not any(t.any() for t in (layer.keys, *layer.running))
    with pytest.raises(NotImplementedError):
        layer.crop(-1)


def test_transformers_caches_made_from_a_config_take_the_models_layers():
    """Checked against transformers 5.24.0: `DynamicCache(config=...)` and `StaticCache(config=..., max_cache_len=...)`
    (what `generate` makes) hold plain `DynamicLayer`s / `StaticLayer`s, which `with_layers_of` replaces."""
    config = LlamaConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, vocab_size=11)
    dynamic = with_layers_of(DynamicCache(config=config), 3, _LayerWithSum, _StaticLayerWithSum)
    static = with_layers_of(StaticCache(config=config, max_cache_len=5), 3, _LayerWithSum, _StaticLayerWithSum)
    assert [type(layer) for layer in dynamic.layers] == [_LayerWithSum] * 3
    assert [type(layer) for layer in static.layers] == [_StaticLayerWithSum] * 3
    assert static.get_max_length() == 5 and with_layers_of(static, 3, _LayerWithSum, _StaticLayerWithSum) is static
    assert len(with_layers_of(DynamicCache(), 3, _LayerWithSum, _StaticLayerWithSum).layers) == 3
    filled = DynamicCache(config=config)
    filled.update(torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8), layer_idx=0)
    with pytest.raises(TypeError, match="empty DynamicCache or StaticCache .*got DynamicCache of DynamicLayer"):
        with_layers_of(filled, 3, _LayerWithSum, _StaticLayerWithSum)


def test_transformers_loads_a_causal_lm_from_lazy_safetensors_slices(tiny_base_path):
    """Checked against transformers 5.24.0: `from_pretrained(None, config=..., state_dict=...)` accepts safetensors'
    lazy slices and reads each one (tests/test_streaming.py: bit for bit the stock quantized load)."""
    stock = AutoModelForCausalLM.from_pretrained(tiny_base_path)
    with safe_open(tiny_base_path / "model.safetensors", framework="pt", backend="pread") as reader:
        state_dict = {key: reader.get_slice(key) for key in reader.keys()}
        model = causal_lm_from_state_dict(stock.config, state_dict, dtype=torch.float32)
    assert type(model) is type(stock)
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), stock.state_dict().items(), strict=True):
        assert torch.equal(ours, theirs), name


def test_transformers_tensorboard_callback_logs_where_pinned(tmp_path):
    """Checked against transformers 5.24.0: the TensorBoard callback reads TENSORBOARD_LOGGING_DIR when created."""
    before = os.environ.get("TENSORBOARD_LOGGING_DIR")
    with tensorboard_logs_in(tmp_path):
        callback = TensorBoardCallback()
    assert Path(callback.logging_dir).parent == tmp_path / "runs"  # runs/<date>_<host>, as transformers names it
    assert os.environ.get("TENSORBOARD_LOGGING_DIR") == before


class CountingModel(torch.nn.Module):
    """A one-parameter model whose loss the Trainer can train and evaluate."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x, labels=None):
        return {"loss": ((self.w * x - labels) ** 2).mean()}


def test_transformers_evaluations_during_training_report_ours_for_the_best_checkpoint_and_early_stopping(tmp_path):
    """Checked against transformers 5.24.0: with `evaluate_with`, the evaluations at each `eval_steps` report our
    metrics (and the Trainer's own loop does not run); `metric_for_best_model` picks the best checkpoint by them,
    `EarlyStoppingCallback` stops on them, and they are logged. Ours are 0.5, 0.9, 0.8, ... at evaluations 1, 2, 3:
    best at step 2, stopped at step 3."""
    assert "self.evaluate(" in inspect.getsource(Trainer._evaluate)
    values = iter([0.5, 0.9, 0.8, 0.7, 0.6])
    rows = Dataset.from_list([{"x": [1.0], "labels": [2.0]}] * 4)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=2, eval_strategy="steps", eval_steps=1,
        save_steps=1, load_best_model_at_end=True, metric_for_best_model="eval_ours", greater_is_better=True,
        report_to=[], use_cpu=True, learning_rate=0.01,
    )  # fmt: skip
    trainer = Trainer(model=CountingModel(), args=args, train_dataset=rows, eval_dataset=rows)
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=1))
    evaluate_with(trainer, lambda: {"eval_ours": next(values)})
    trainer.train()
    assert trainer.state.global_step == 3
    assert trainer.state.best_metric == 0.9 and Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    logged = [e for e in trainer.state.log_history if "eval_ours" in e]
    assert [(e["step"], e["eval_ours"]) for e in logged] == [(1, 0.5), (2, 0.9), (3, 0.8)]
    assert not any("eval_loss" in e or "eval_runtime" in e for e in trainer.state.log_history)  # no loop of its own


# --- accelerate: the launch environment, evaluation before training -----------------------------------------


LAUNCH_VARIABLES = (
    "ACCELERATE_USE_FSDP",
    "FSDP_VERSION",
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE",
)


def test_accelerate_launch_sets_the_variables_read_here(monkeypatch):
    """Checked against accelerate 1.15.0: `accelerate launch` tells each process about FSDP and ZeRO through these
    environment variables."""
    source = inspect.getsource(accelerate.utils.launch)
    for variable in LAUNCH_VARIABLES:
        assert f'current_env["{variable}"]' in source, variable
        monkeypatch.delenv(variable, raising=False)
    assert (fsdp_enabled(), fsdp_version(), parameters_sharded()) == (False, 1, False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert (fsdp_enabled(), fsdp_version(), parameters_sharded()) == (True, 2, True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert parameters_sharded()


def test_accelerate_turns_fsdp_on_for_gpu_like_devices_only():
    """Checked against accelerate 1.15.0 and 1.16.0, what `fsdp_on_cpu_too` works around: the FSDP state is set only
    inside the branch for GPU-like distributed types, so CPU processes silently run DDP. The two-process run in
    test_distributed.py checks that the workaround shards and trains."""
    from accelerate.state import AcceleratorState

    source = inspect.getsource(AcceleratorState.__init__)
    gpu_branch = source[source.index("elif self.distributed_type in [") : source.index("DistributedType.FSDP\n")]
    assert "DistributedType.MULTI_GPU" in gpu_branch and "MULTI_CPU" not in gpu_branch


def test_accelerate_default_config_is_where_launch_looks():
    """Checked against accelerate 1.15.0: `accelerate launch` without --config_file reads this path when it exists."""
    from accelerate.commands import launch

    assert "default_config_file" in inspect.getsource(launch)
    assert default_config_file().name == "default_config.yaml"


# --- bitsandbytes: the import notice, CPU repacking, 4-bit codes ---------------------------------------------


def quantized_linear(weight: torch.Tensor) -> torch.nn.Module:
    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
    return layer.to("cpu")


def test_bitsandbytes_hub_kernel_notice_is_filtered_and_nothing_else():
    """Checked against bitsandbytes 0.50.2: its CPU ops module logs the notice with this text, on this logger."""
    ops = importlib.import_module(CPU_OPS_LOGGER)
    assert ops.logger.name == CPU_OPS_LOGGER and HUB_KERNEL_NOTICE in inspect.getsource(ops)
    quiet_hub_kernel_notice()
    logger = logging.getLogger(CPU_OPS_LOGGER)

    def record(message: str, *args) -> logging.LogRecord:
        return logger.makeRecord(CPU_OPS_LOGGER, logging.WARNING, __file__, 1, message, args, None)

    assert not logger.filter(record("Failed to load %s", f"gemm {HUB_KERNEL_NOTICE}"))
    assert logger.filter(record("another warning"))


def test_bitsandbytes_cpu_repacking_is_switched_off_for_training():
    """Checked against bitsandbytes 0.50.2: a CPU `Linear4bit` on an AVX512-BF16 machine repacks its weight for
    inference on its first eval-mode, no-grad forward (`packing_format_for_cpu`), unless its switch is off."""
    torch.manual_seed(0)
    weight = torch.randn(64, 64) / 8
    layers = {switched_off: quantized_linear(weight) for switched_off in (False, True)}
    assert all(hasattr(layer, CPU_REPACKING_SWITCH) for layer in layers.values())
    keep_4bit_layout_trainable(layers[True])
    assert getattr(layers[True], CPU_REPACKING_SWITCH) is False
    x = torch.randn(2, 64)
    for layer in layers.values():
        layer.eval()
        with torch.no_grad():
            layer(x)
    assert not getattr(layers[True].weight.quant_state, "packing_format_for_cpu", False)
    if getattr(layers[False], CPU_REPACKING_SWITCH):  # this CPU has AVX512-BF16: the library still repacks
        assert getattr(layers[False].weight.quant_state, "packing_format_for_cpu", False)
    layers[True].train()
    y = layers[True](x.requires_grad_(True))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bitsandbytes_4bit_codes_read_as_values():
    """Checked against bitsandbytes 0.50.2: a 4-bit weight holds packed codes (zero is not code 0) and its
    `quant_state` dequantizes them."""
    zero = quantized_linear(torch.zeros(16, 16))
    assert zero.weight.dtype == torch.uint8 and zero.weight.any()  # the codes of zero are not zero
    assert not dense_weight(zero).any() and dense_weight(zero).shape == (16, 16)
    plain = torch.nn.Linear(4, 4)
    assert dense_weight(plain) is plain.weight


# --- glibc ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(glibc() is None, reason="not glibc")
def test_glibc_knows_the_malloc_parameters_used():
    """Checked against glibc 2.36: mallopt returns 1 when it accepts a parameter (0 for an unknown one)."""
    assert glibc().mallopt(M_MMAP_THRESHOLD, INITIAL_MMAP_THRESHOLD) == 1
    pin_malloc_mmap_threshold()
    trim_malloc_heap()


# --- versions: every worked-around library has a tested range, and leaving it is one line ---------------------


def test_every_library_that_integrations_touches_has_a_tested_upper_bound():
    imported = set()
    for module in Path(lmdiff_ft.integrations.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names} - {"torch", "packaging"}
    assert third_party <= set(WORKED_AROUND), third_party - set(WORKED_AROUND)
    ranges = versions.tested_ranges()
    assert set(ranges) == set(WORKED_AROUND)
    assert all(">=" in spec and "<" in spec.replace("<=", "") for spec in ranges.values()), ranges


def test_a_library_outside_its_tested_range_is_one_line_and_the_command_still_runs(monkeypatch, capsys):
    installed = {"transformers": "5.99.0"}
    monkeypatch.setattr(versions, "version", lambda name: installed.get(name) or importlib.metadata.version(name))
    assert main(["sft", "no-such-task.yaml"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "lmdiff-ft: warning: transformers 5.99.0 is outside the range lmdiff-ft was tested with (>=5.24,<5.25); "
        "if something misbehaves, install a tested one: pip install 'transformers>=5.24,<5.25'",
        "lmdiff-ft sft: error: no-such-task.yaml: task file not found",
    ]
    installed.clear()
    assert versions.untested_versions() == []


def test_allowing_untested_versions_silences_the_lines(monkeypatch):
    monkeypatch.setattr(versions, "version", lambda name: "99.0")
    assert len(versions.untested_versions()) == len(WORKED_AROUND)
    monkeypatch.setenv("LMDIFF_FT_ALLOW_UNTESTED", "1")
    assert versions.untested_versions() == []
