"""`torch.compile` of the model traces, runs forward and backward, and matches eager mode."""

import pytest
import torch
from conftest import TINY, randomize_lmdiff_parameters, tiny_lmdiff_config

from lmdiff_ft.model import LmDiffForCausalLM


def loss_and_grads(model: LmDiffForCausalLM, call, tokens: torch.Tensor, mask: torch.Tensor):
    """Run `call` (the model, or its compiled wrapper) forward and backward; read the grads off `model`."""
    model.zero_grad()
    out = call(tokens, attention_mask=mask, labels=tokens)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.slow
def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model = LmDiffForCausalLM(tiny_lmdiff_config(num_hidden_layers=1)).train()
    randomize_lmdiff_parameters(model)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, TINY["vocab_size"], (2, 12), generator=generator)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0  # left padding: exercises the masked means, the conv masking and the boolean SDPA mask

    eager_logits, eager_loss, eager_grads = loss_and_grads(model, model, tokens, mask)
    logits, loss, grads = loss_and_grads(model, torch.compile(model), tokens, mask)

    assert (logits - eager_logits)[mask.bool()].abs().max().item() <= 1e-4
    assert torch.allclose(loss, eager_loss, atol=1e-5)
    assert grads.keys() == eager_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        assert torch.allclose(grad, eager_grads[name], atol=1e-4, rtol=1e-3), name
