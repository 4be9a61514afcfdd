"""`torch.compile` of the model traces, runs forward and backward, and matches eager mode; with a static cache
`generate` compiles the decode step as one graph."""

import pytest
import torch
from conftest import TINY, randomize_lmdiff_parameters, tiny_lmdiff_config
from transformers.generation import CompileConfig

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


@pytest.mark.slow
@torch.no_grad()
def test_generate_compiles_the_decode_step_as_one_graph():
    """With a static cache, `generate` compiles the decode step (here forced on CPU, `fullgraph=True`: any graph break
    raises), matches eager decoding, and a second call with other prompts of the same shape does not recompile."""
    torch.manual_seed(0)
    model = LmDiffForCausalLM(tiny_lmdiff_config(num_hidden_layers=2)).eval()
    randomize_lmdiff_parameters(model)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, TINY["vocab_size"], (2, 7), generator=generator) for _ in range(2)]
    mask = torch.ones_like(prompts[0])
    mask[1, :3] = 0  # left padding: the compiled step sees the padding mask (no data-dependent branch on it)
    compile_config = CompileConfig(fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    kwargs.update(return_dict_in_generate=True, output_scores=True)

    torch.compiler.reset()
    for i, prompt in enumerate(prompts):
        eager = model.generate(prompt, **kwargs)
        stance = "fail_on_recompile" if i else "default"
        with torch.compiler.set_stance(stance):
            compiled = model.generate(prompt, cache_implementation="static", compile_config=compile_config, **kwargs)
        assert hasattr(model, "_compiled_call")
        assert torch.equal(compiled.sequences, eager.sequences)
        for a, b in zip(compiled.scores, eager.scores, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
