"""The benchmarks' naive yardstick (bench/naive_lmdiff.py) computes the same function as the model."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, randomize_lmdiff_parameters, tiny_lmdiff_config

from lmdiff_ft.model import LmDiffForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives at the repository root
from bench.naive_lmdiff import NaiveLmDiffForCausalLM  # noqa: E402


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("subln", [True, False])
@torch.no_grad()
def test_naive_reference_matches_the_model(padding, subln):
    torch.manual_seed(0)
    config = tiny_lmdiff_config(use_subln=subln)
    model = LmDiffForCausalLM(config).eval()
    randomize_lmdiff_parameters(model)
    naive = NaiveLmDiffForCausalLM(config).eval()
    naive.load_state_dict(model.state_dict(), strict=True)

    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, TINY["vocab_size"], (2, 16), generator=generator)
    mask = torch.ones_like(tokens)
    if padding:
        mask[1, :5] = 0
        tokens[mask == 0] = TINY["pad_token_id"]
    expected = model(tokens, attention_mask=mask, labels=tokens)
    got = naive(tokens, attention_mask=mask, labels=tokens)
    assert (expected.logits - got.logits)[mask.bool()].abs().max().item() <= 1e-4
    if not padding:
        assert torch.allclose(expected.loss, got.loss, atol=1e-5)
