"""Llama checkpoint → LM-Diff checkpoint, function-preserving at step 0.

Every Llama tensor is copied. The new parameters start where the layer computes exactly what Llama
computed, yet each still receives a gradient: fc_gamma = 0; q2/k2 = copies of q/k; λ_q1, λ_k1 random
and λ_q2, λ_k2 exact copies of them with λ_base = 0 (so λ ≡ 0 but ∂λ/∂λ_q1 ≠ 0); subln off; conv = 0;
SE fc1 random and fc2 = 0 (gate 2·σ(0) = 1). The result is checked on a probe batch before writing.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .errors import UserError
from .loading import hub_snapshot
from .modeling import LmDiffConfig, LmDiffForCausalLM
from .modeling.modeling_lmdiff import LmDiffAdaptiveRMSNorm, LmDiffSEGate
from .outputs import atomic_output_dir

LMDIFF_DEFAULTS = {"use_subln": False, "lambda_base": 0.0}


@dataclass
class ConversionReport:
    max_abs_logit_diff: float
    dropped_tensors: list[str]
    num_parameters: int


def lmdiff_config_from_llama(llama_config: LlamaConfig, **overrides) -> LmDiffConfig:
    """All of Llama's fields, plus LM-Diff's components switched on in their conversion setting."""
    fields = llama_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        fields.pop(key, None)
    fields.update(LMDIFF_DEFAULTS)
    fields.update(overrides)
    fields["architectures"] = ["LmDiffForCausalLM"]
    return LmDiffConfig(**fields)


@torch.no_grad()
def convert_llama_model(llama: LlamaForCausalLM, seed: int = 0, **config_overrides) -> LmDiffForCausalLM:
    """Build an LM-Diff model that computes what `llama` computes (see module docstring)."""
    config = lmdiff_config_from_llama(llama.config, **config_overrides)
    model = LmDiffForCausalLM(config).to(dtype=llama.dtype)
    missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    if unexpected:
        raise RuntimeError(f"Llama tensors with no place in LM-Diff: {unexpected}")

    generator = torch.Generator().manual_seed(seed)

    def randn_like(t: torch.Tensor, std: float) -> torch.Tensor:
        return (torch.randn(t.shape, generator=generator) * std).to(t.dtype)

    for layer in model.model.layers:
        attn = layer.self_attn
        if config.use_diff_attn:
            attn.q2_proj.load_state_dict(attn.q_proj.state_dict())
            attn.k2_proj.load_state_dict(attn.k_proj.state_dict())
            lam = attn.diff_lambda
            lam.lambda_q1.copy_(randn_like(lam.lambda_q1, config.lambda_init_std))
            lam.lambda_k1.copy_(randn_like(lam.lambda_k1, config.lambda_init_std))
            lam.lambda_q2.copy_(lam.lambda_q1)
            lam.lambda_k2.copy_(lam.lambda_k1)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            zero_adaptive_norm(norm)
        if layer.token_mixing is not None:
            layer.token_mixing.conv.weight.zero_()
            layer.token_mixing.conv.bias.zero_()
        if layer.se_gate is not None:
            neutral_se_gate(layer.se_gate, randn_like, config.initializer_range)
    missing_llama = [k for k in missing if not is_lmdiff_only(k)]
    if missing_llama:
        raise RuntimeError(f"LM-Diff tensors that Llama did not provide: {missing_llama}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def zero_adaptive_norm(norm: LmDiffAdaptiveRMSNorm) -> None:
    if norm.fc_gamma is None:
        return
    for linear in norm.fc_gamma.modules():
        if isinstance(linear, torch.nn.Linear):
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()


def neutral_se_gate(se: LmDiffSEGate, randn_like, std: float) -> None:
    se.fc1.weight.copy_(randn_like(se.fc1.weight, std))
    se.fc1.bias.zero_()
    se.fc2.weight.zero_()
    se.fc2.bias.zero_()


LMDIFF_ONLY_MARKERS = ("q2_proj", "k2_proj", "diff_lambda", "fc_gamma", "token_mixing", "se_gate", "subln")


def is_lmdiff_only(name: str) -> bool:
    return any(marker in name for marker in LMDIFF_ONLY_MARKERS)


def checkpoint_tensor_names(directory: Path) -> list[str]:
    """Names of every tensor in a checkpoint's safetensors files (read from headers, no weights loaded)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
        hint = (
            f" (found {', '.join(pickles)}: pickle files are not loaded, convert them to safetensors)"
            if pickles
            else ""
        )
        raise UserError(f"{directory}: no *.safetensors weights{hint}")
    names = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names.extend(f.keys())
    return names


def resolve_source(src: str) -> Path:
    """A local checkpoint directory, or a Hub id downloaded (safetensors + config + tokenizer only)."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{src}: not a directory (expected a Llama checkpoint directory)")
        return path
    if src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise UserError(f"{src}: no such directory (expected a Llama checkpoint directory or a Hub id org/name)")
    return hub_snapshot(src)


def load_llama_config(directory: Path) -> LlamaConfig:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(f"{directory}: no config.json (expected a Llama checkpoint directory)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_file}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    if model_type != "llama":
        raise UserError(f"{config_file}: model_type is {model_type!r}, expected 'llama'")
    return AutoConfig.from_pretrained(directory)


@torch.no_grad()
def probe_logits(model: torch.nn.Module, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """Logits at the real positions of a probe batch: random tokens, one row left-padded so masking counts."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (2, 24), generator=generator)
    mask = torch.ones_like(tokens)
    mask[1, :5] = 0
    logits = model(input_ids=tokens.to(model.device), attention_mask=mask.to(model.device)).logits.float().cpu()
    return logits[mask.bool()]


def max_logit_difference(reference: torch.nn.Module, candidate: torch.nn.Module, vocab_size: int) -> float:
    return (probe_logits(reference, vocab_size) - probe_logits(candidate, vocab_size)).abs().max().item()


def convert_checkpoint(
    src: str, out: str | Path, drop_unknown: bool = False, tolerance: float = 1e-4, seed: int = 0
) -> ConversionReport:
    """Convert a Llama checkpoint on disk (or on the Hub) and write an LM-Diff checkpoint to `out`."""
    source = resolve_source(src)
    llama_config = load_llama_config(source)
    names = checkpoint_tensor_names(source)
    expected = expected_llama_names(llama_config)
    unknown = sorted(set(names) - expected)
    if unknown and not drop_unknown:
        shown = ", ".join(unknown[:8]) + (f" … (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise UserError(
            f"{source}: {len(unknown)} tensors are not Llama's and would be lost: {shown}. "
            "Pass --drop-unknown to convert without them."
        )

    dtype = llama_config.dtype if isinstance(llama_config.dtype, torch.dtype) else torch.float32
    llama = LlamaForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    model = convert_llama_model(llama, seed=seed).eval()
    diff = max_logit_difference(llama, model, llama_config.vocab_size)
    if not diff <= tolerance:
        raise UserError(
            f"{source}: converted logits differ from Llama's by {diff:.3g} (> {tolerance}); nothing written"
        )
    del llama

    model = model.to(dtype)
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
        except (OSError, ValueError):
            pass  # a checkpoint without tokenizer files converts all the same
        write_model_card(tmp, src, diff, unknown if drop_unknown else [])
    return ConversionReport(diff, unknown if drop_unknown else [], model.num_parameters())


def expected_llama_names(config: LlamaConfig) -> set[str]:
    with torch.device("meta"):
        names = set(LlamaForCausalLM(config).state_dict())
    return names


def write_model_card(directory: Path, src: str, diff: float, dropped: list[str]) -> None:
    dropped_line = f"\nDropped tensors (not Llama's): {', '.join(dropped)}\n" if dropped else ""
    (directory / "README.md").write_text(
        f"""---
library_name: transformers
tags: [lmdiff, lmdiff-ft]
---
# LM-Diff converted from `{src}`

Converted with `lmdiff-ft convert`. Differential attention, adaptive RMSNorm, token mixing and SE gate
start at their function-preserving init: at step 0 this model computes what the source Llama computes
(max |Δlogits| on the probe batch: {diff:.3g}). Fine-tune it to make the new components do work.
{dropped_line}
Load with `import lmdiff_ft; AutoModelForCausalLM.from_pretrained(path)` (no `trust_remote_code`).
"""
    )
