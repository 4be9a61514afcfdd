"""Shared tiny models (everything fp32, a few hundred thousand parameters), and the suite's environment."""

import os

# The suite never reaches a hub or an analytics host; set before anything imports huggingface_hub or gradio.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lmdiff_ft  # noqa: F401  (registers the lmdiff model type)
from lmdiff_ft.model import LmDiffConfig, LmDiffForCausalLM
from lmdiff_ft.model.convert import is_lmdiff_only

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_lmdiff_config(**overrides) -> LmDiffConfig:
    return LmDiffConfig(**{**TINY, "se_reduction": 4, **overrides})


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


@torch.no_grad()
def randomize_lmdiff_parameters(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Move every LM-Diff-only parameter away from its neutral init, so tests exercise the real paths."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if is_lmdiff_only(name):
            param.copy_(torch.randn(param.shape, generator=generator) * std)


@pytest.fixture
def random_lmdiff() -> LmDiffForCausalLM:
    """An LM-Diff with every component on and every new parameter random (incl. subln, low-rank off)."""
    torch.manual_seed(0)
    model = LmDiffForCausalLM(tiny_lmdiff_config()).eval()
    randomize_lmdiff_parameters(model)
    return model


TINY_BASE_DIMS = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


@pytest.fixture(scope="session")
def tiny_base_path(tmp_path_factory):
    """A tiny LM-Diff checkpoint + tokenizer on disk, as `lmdiff-ft tiny-base` writes it."""
    from lmdiff_ft.base.tiny import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("bases") / "tiny", seed=0, vocab_size=512, **TINY_BASE_DIMS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI=true) a skipped test fails: a skip there means .ci/run did not install a prerequisite, and the
    test a user relies on silently did not run."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome, report.longrepr = "failed", f"skipped in CI, where every prerequisite is installed: {reason}"
