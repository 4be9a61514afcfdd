"""Each workaround in lmdiff_ft/integrations/ against the library it works around: it must still apply, and do
what it says. A failure here means the library changed; re-check the workaround against the new version."""

import inspect

import torch
import trl.trainer.utils as trl_utils
from conftest import tiny_lmdiff_config
from trl.kernels import chunked_logprob

from lmdiff_ft.integrations.trl import score_labelled_positions_only
from lmdiff_ft.modeling import LmDiffForCausalLM

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
