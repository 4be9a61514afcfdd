"""Quantized bases, adapter presets, PEFT interoperability, base mismatch errors and merging."""

import pytest
import torch
from conftest import TINY_BASE_DIMS, tiny_llama
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lmdiff_ft.adapters.known_base import base_info, load_adapter, write_base_info
from lmdiff_ft.adapters.presets import attach_adapters, dead_branch_warning, resolve_targets
from lmdiff_ft.base.loading import load_base
from lmdiff_ft.base.tiny import build_tiny_base
from lmdiff_ft.cli import main
from lmdiff_ft.errors import UserError
from lmdiff_ft.model.convert import convert_llama_model, probe_logits
from lmdiff_ft.schema.task import AdapterConfig

FULL_PRECISION_KINDS = ("diff_lambda", "layernorm.weight", "token_mixing.conv", "se_gate", "subln")


def batch(vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab_size, (4, 20), generator=torch.Generator().manual_seed(seed))


def train_steps(model, tokens, steps: int = 20, lr: float = 5e-3) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def save_adapter(model, loaded, directory):
    model.save_pretrained(directory)
    write_base_info(directory, base_info(model.get_base_model(), loaded.path, loaded.fingerprint))


@pytest.mark.parametrize("quantization, linear_class", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_load_keeps_sensitive_tensors_full_precision(tiny_base_path, quantization, linear_class):
    loaded = load_base(str(tiny_base_path), quantization=quantization)
    layer = loaded.model.model.layers[0]
    assert type(layer.self_attn.q_proj).__name__ == linear_class
    assert type(layer.input_layernorm.fc_gamma).__name__ == linear_class
    # the tiny base's fc_gamma starts at exactly zero: seen through the quantized codes, it is skipped once frozen
    assert not layer.input_layernorm._gamma_is_frozen_zero()  # the bias still requires grad until adapters freeze
    loaded.model.requires_grad_(False)
    assert layer.input_layernorm._gamma_is_frozen_zero()
    for name, param in loaded.model.named_parameters():
        if any(kind in name for kind in FULL_PRECISION_KINDS) or name.endswith("bias"):
            assert param.dtype == torch.float32, name
    assert type(layer.se_gate.fc1) is torch.nn.Linear


def test_qlora_training_moves_lambda_and_se_and_leaves_the_base_frozen(tiny_base_path, tmp_path):
    loaded = load_base(str(tiny_base_path), quantization="nf4")
    frozen_before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    adapter = AdapterConfig(presets=["diff_attn", "lambda", "se_gate"], r=8, alpha=16, dropout=0.0)
    model = attach_adapters(loaded.model, adapter, gradient_checkpointing=True)
    tokens = batch(loaded.model.config.vocab_size)
    losses = train_steps(model, tokens)
    assert losses[-1] < losses[0] - 0.5, losses

    wrapped = {
        n.replace(".base_layer", "").replace(".original_module", ""): p
        for n, p in model.get_base_model().named_parameters()
        if "lora_" not in n and "modules_to_save" not in n
    }
    assert wrapped.keys() == frozen_before.keys()
    for name, before in frozen_before.items():
        assert torch.equal(before, wrapped[name]), f"frozen base weight {name} changed"
    trained_lambda = model.get_base_model().model.layers[0].self_attn.diff_lambda.modules_to_save["default"]
    assert not torch.equal(trained_lambda.lambda_q1, frozen_before["model.layers.0.self_attn.diff_lambda.lambda_q1"])

    save_adapter(model, loaded, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        saved_lambda = f.get_tensor("base_model.model.model.layers.0.self_attn.diff_lambda.lambda_q1")
        se_b = f.get_tensor("base_model.model.model.layers.0.se_gate.fc2.lora_B.weight")
    assert torch.equal(saved_lambda, trained_lambda.lambda_q1.detach())
    assert se_b.abs().sum() > 0  # LoRA B starts at zero: non-zero means it trained
    assert any("q2_proj.lora_A" in k for k in keys)


def test_on_a_converted_llama_q2_k2_learn_only_when_lambda_trains():
    """λ starts at exactly 0 after conversion, and q2/k2 act only through λ·A2·v: without `lambda` their LoRA never
    gets a gradient (the default presets include it, and training without it is announced)."""
    converted = convert_llama_model(tiny_llama())
    tokens = batch(converted.config.vocab_size)
    q2_gradient = {}
    for presets in (["diff_attn"], ["diff_attn", "lambda"]):
        model = attach_adapters(convert_llama_model(tiny_llama()), AdapterConfig(presets=presets, r=4, alpha=8))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        total = 0.0
        for _ in range(3):  # the first step moves λ off zero, if it trains; then q2/k2 get gradients
            model(input_ids=tokens, labels=tokens).loss.backward()
            total += sum(p.grad.abs().sum().item() for n, p in model.named_parameters() if "q2_proj.lora_" in n)
            optimizer.step()
            optimizer.zero_grad()
        q2_gradient[len(presets)] = total
    assert q2_gradient[1] == 0.0 and q2_gradient[2] > 0.0
    assert "add lambda" in dead_branch_warning(converted, ["diff_attn"])
    assert dead_branch_warning(converted, ["diff_attn", "lambda"]) is None
    assert dead_branch_warning(converted, ["all"]) is None


def test_a_base_with_lambda_of_its_own_trains_diff_attn_without_a_warning(tiny_base_path):
    loaded = load_base(str(tiny_base_path), quantization="none")
    assert dead_branch_warning(loaded.model, ["diff_attn"]) is None


@torch.no_grad()
def test_adapter_round_trip_through_plain_peft(tiny_base_path, tmp_path):
    loaded = load_base(str(tiny_base_path), quantization="none")
    adapter = AdapterConfig(presets=["diff_attn", "lambda", "se_gate"], r=4, alpha=8, dropout=0.0)
    model = attach_adapters(loaded.model, adapter)  # LoRA and a module saved whole
    with torch.enable_grad():
        train_steps(model, batch(loaded.model.config.vocab_size), steps=3)
    model.eval()
    save_adapter(model, loaded, tmp_path / "adapter")
    expected = probe_logits(model, loaded.model.config.vocab_size)

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_path), tmp_path / "adapter")
    assert torch.equal(probe_logits(plain.eval(), loaded.model.config.vocab_size), expected)

    # merge: a standalone checkpoint that computes base + adapter
    assert main(["merge", str(tiny_base_path), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (probe_logits(merged, loaded.model.config.vocab_size) - expected).abs().max() <= 1e-4
    trained = model.get_base_model().model.layers[1].self_attn.diff_lambda.modules_to_save["default"].lambda_k2
    assert torch.equal(merged.model.layers[1].self_attn.diff_lambda.lambda_k2, trained)


@pytest.fixture(scope="module")
def trained_adapter(tiny_base_path, tmp_path_factory):
    loaded = load_base(str(tiny_base_path), quantization="none")
    model = attach_adapters(loaded.model, AdapterConfig(r=4, alpha=8))
    directory = tmp_path_factory.mktemp("adapters") / "a"
    save_adapter(model, loaded, directory)
    return directory


def test_an_adapter_given_as_the_base_names_its_base(trained_adapter, tiny_base_path, capsys):
    assert main(["inspect", str(trained_adapter)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"lmdiff-ft inspect: error: base: {trained_adapter} is a PEFT adapter (adapter_config.json), "
        f"not a base model; it was made for {tiny_base_path}"
    ]


def test_adapter_on_a_base_with_other_dims_is_refused(trained_adapter, tmp_path):
    other = build_tiny_base(tmp_path / "wide", vocab_size=512, **{**TINY_BASE_DIMS, "hidden_size": 128})
    loaded = load_base(str(other), quantization="none")
    with pytest.raises(UserError, match="hidden_size=64.*this base has hidden_size=128"):
        load_adapter(loaded.model, trained_adapter, loaded.fingerprint)


def test_adapter_on_a_same_shaped_other_base_is_refused(trained_adapter, tmp_path):
    other = build_tiny_base(tmp_path / "seed1", seed=1, vocab_size=512, **TINY_BASE_DIMS)
    loaded = load_base(str(other), quantization="none")
    with pytest.raises(UserError, match="fingerprint"):
        load_adapter(loaded.model, trained_adapter, loaded.fingerprint)


def test_foreign_adapter_without_base_info_gets_a_shape_error(trained_adapter, tmp_path):
    other = build_tiny_base(tmp_path / "deep", vocab_size=512, **{**TINY_BASE_DIMS, "num_hidden_layers": 1})
    (trained_adapter / "lmdiff_base.json").rename(tmp_path / "moved.json")
    try:
        loaded = load_base(str(other), quantization="none")
        with pytest.raises(UserError, match="layers.1.*which this base does not have"):
            load_adapter(loaded.model, trained_adapter, loaded.fingerprint)
    finally:
        (tmp_path / "moved.json").rename(trained_adapter / "lmdiff_base.json")


def test_presets_resolve_to_explicit_modules(tiny_base_path):
    model = load_base(str(tiny_base_path), quantization="none").model
    targets = resolve_targets(model, ["diff_attn", "lambda", "se_gate", "token_mixing"], layers=[1])
    assert "model.layers.1.self_attn.q2_proj" in targets.lora
    assert all(".layers.1." in name for name in targets.lora + targets.saved)
    assert targets.saved == ["model.layers.1.self_attn.diff_lambda", "model.layers.1.token_mixing"]
    with pytest.raises(UserError, match="unknown preset 'se_gates'.*did you mean 'se_gate'"):
        resolve_targets(model, ["se_gates"])
    with pytest.raises(UserError, match="outside this base's layers 0-1"):
        resolve_targets(model, ["diff_attn"], layers=[5])


def test_a_preset_that_matches_nothing_is_an_error(tmp_path):
    base = build_tiny_base(tmp_path / "no-se", vocab_size=512, use_se_gate=False, **TINY_BASE_DIMS)
    model = load_base(str(base), quantization="none").model
    with pytest.raises(UserError, match="'se_gate' matches no module"):
        resolve_targets(model, ["diff_attn", "se_gate"])


def test_inspect_prints_the_tables(tiny_base_path, capsys):
    assert main(["inspect", str(tiny_base_path), "--quantization", "nf4", "--layers", "0-1"]) == 0
    out = capsys.readouterr().out
    assert "per preset" in out and "self_attn.diff_lambda" in out and "memory footprint" in out


def test_two_adapters_with_saved_lambda_load_onto_one_base(trained_adapter, tiny_base_path):
    loaded = load_base(str(tiny_base_path), quantization="none")
    model = load_adapter(loaded.model, trained_adapter, loaded.fingerprint, adapter_name="first")
    model = load_adapter(model, trained_adapter, loaded.fingerprint, adapter_name="second")
    assert {"first", "second"} <= set(model.peft_config)
