"""The streaming quantized loader gives exactly transformers' quantized model, without mapping the checkpoint."""

import gc
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmdiff_ft.adapters.presets import attach_adapters
from lmdiff_ft.base import loading, streaming
from lmdiff_ft.base.loading import load_base
from lmdiff_ft.base.quantization import is_quantized, quantization_config
from lmdiff_ft.base.streaming import load_quantized_streaming
from lmdiff_ft.errors import UserError
from lmdiff_ft.schema.task import AdapterConfig

QUANTIZATIONS = [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")]
FULL_PRECISION_KINDS = ("diff_lambda", "layernorm.weight", "token_mixing.conv", "se_gate", "subln", "norm.weight")


def stock_load(path, quantization: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.float32,
        quantization_config=quantization_config(quantization, torch.float32),
        device_map={"": "cpu"},
    )


def tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(3, vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def assert_same_model(streamed: torch.nn.Module, stock: torch.nn.Module) -> None:
    """Same modules, same quantized tensors and quantization state, same flags and configs."""
    assert {n: type(m) for n, m in streamed.named_modules()} == {n: type(m) for n, m in stock.named_modules()}
    streamed_state, stock_state = streamed.state_dict(), stock.state_dict()
    assert streamed_state.keys() == stock_state.keys()
    for name, tensor in stock_state.items():
        assert streamed_state[name].dtype == tensor.dtype, name
        assert torch.equal(streamed_state[name], tensor), name
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        assert getattr(streamed, flag, None) == getattr(stock, flag, None), flag
    assert type(streamed.hf_quantizer) is type(stock.hf_quantizer)
    assert streamed.config.to_dict() == stock.config.to_dict()
    assert streamed.generation_config.to_dict() == stock.generation_config.to_dict()
    assert streamed.get_memory_footprint() == stock.get_memory_footprint()


@pytest.mark.parametrize("quantization, linear_class", QUANTIZATIONS)
def test_streaming_load_equals_the_stock_quantized_load(tiny_base_path, quantization, linear_class):
    streamed = load_quantized_streaming(tiny_base_path, quantization, torch.float32, "cpu")
    stock = stock_load(tiny_base_path, quantization)
    assert type(streamed.model.layers[0].self_attn.q_proj).__name__ == linear_class
    assert_same_model(streamed, stock)

    batch = tokens(stock.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=batch).logits, stock(input_ids=batch).logits)
    generated = {
        name: model.generate(batch[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        for name, model in (("streamed", streamed), ("stock", stock))
    }
    assert torch.equal(generated["streamed"], generated["stock"])


def test_streaming_load_reads_a_sharded_checkpoint(tiny_base_path, tmp_path):
    stock = stock_load(tiny_base_path, "nf4")
    AutoModelForCausalLM.from_pretrained(tiny_base_path).save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(streaming.checkpoint_files(tmp_path)) > 1
    streamed = load_quantized_streaming(tmp_path, "nf4", torch.float32, "cpu")
    batch = tokens(stock.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=batch).logits, stock(input_ids=batch).logits)


@pytest.mark.parametrize("quantization, linear_class", QUANTIZATIONS)
def test_sensitive_tensors_stay_full_precision(tiny_base_path, quantization, linear_class):
    model = load_quantized_streaming(tiny_base_path, quantization, torch.float32, "cpu")
    layer = model.model.layers[0]
    assert type(layer.self_attn.q_proj).__name__ == linear_class
    assert type(layer.input_layernorm.fc_gamma).__name__ == linear_class
    assert type(layer.se_gate.fc1) is torch.nn.Linear and type(model.lm_head) is torch.nn.Linear
    for name, param in model.named_parameters():
        if any(kind in name for kind in FULL_PRECISION_KINDS) or name.endswith("bias"):
            assert param.dtype == torch.float32, name


def mappings_of(path) -> int:
    gc.collect()  # models of earlier tests may still hold stock mappings until collected
    files = [str(file.resolve()) for file in streaming.checkpoint_files(path)]
    return sum(line.endswith(tuple(files)) for line in Path("/proc/self/maps").read_text().splitlines())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_streaming_load_leaves_no_mapping_of_the_checkpoint(tiny_base_path):
    before = mappings_of(tiny_base_path)
    stock = stock_load(tiny_base_path, "nf4")
    assert mappings_of(tiny_base_path) > before  # why this module exists: the stock load keeps the file mapped
    del stock
    before = mappings_of(tiny_base_path)
    streamed = load_quantized_streaming(tiny_base_path, "nf4", torch.float32, "cpu")
    assert mappings_of(tiny_base_path) == before and streamed.is_loaded_in_4bit


def test_load_base_streams_quantized_bases(tiny_base_path, monkeypatch):
    calls = []
    real = loading.load_quantized_streaming
    monkeypatch.setattr(loading, "load_quantized_streaming", lambda *args: calls.append(args) or real(*args))
    loaded = load_base(str(tiny_base_path), quantization="int8")
    assert [args[1] for args in calls] == ["int8"] and loaded.model.is_loaded_in_8bit
    load_base(str(tiny_base_path), quantization="none")
    assert len(calls) == 1


def test_qlora_training_step_on_a_streamed_base(tiny_base_path):
    model = load_quantized_streaming(tiny_base_path, "nf4", torch.float32, "cpu")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = attach_adapters(model, AdapterConfig(r=8, alpha=16, dropout=0.0), gradient_checkpointing=True)
    assert is_quantized(peft_model.get_base_model())
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    batch = tokens(model.config.vocab_size)
    peft_model.train()
    losses = []
    for _ in range(3):
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert any(not torch.equal(before[n], p) for n, p in trainable.items() if "lora_B" in n)
    assert any(not torch.equal(before[n], p) for n, p in trainable.items() if "diff_lambda" in n)
    base = {
        n.replace(".base_layer", "").replace(".original_module", ""): p
        for n, p in peft_model.get_base_model().named_parameters()
        if "lora_" not in n and "modules_to_save" not in n
    }
    for name, value in frozen.items():
        assert torch.equal(value, base[name]), name


def test_a_checkpoint_without_safetensors_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="no model.safetensors"):
        streaming.checkpoint_files(tmp_path)
