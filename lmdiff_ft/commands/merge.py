"""`lmdiff-ft merge`: fold an adapter into a full-precision copy of its base and write a standalone model.

Merging into a 4-bit base would round the merged weights back to 4 bits and lose most of the update,
so the base is always reloaded unquantized here, whatever the adapter was trained on. λ vectors and
other saved modules replace the base's copies; LoRA deltas are added to the projections.
"""

from pathlib import Path

import torch

from ..adapters.known_base import load_adapter
from ..base.loading import load_base
from ..errors import UserError
from ..model.convert import probe_logits
from ..outputs import atomic_output_dir


def merge_adapter(base: str, adapter_dir: str, out: str, dtype: str = "float32", tolerance: float = 1e-3) -> float:
    """Write base+adapter as one LM-Diff checkpoint; returns max |Δlogits| merged vs adapter on a probe."""
    loaded = load_base(base, quantization="none", dtype=dtype, device=torch.device("cpu"))
    model = load_adapter(loaded.model, Path(adapter_dir), loaded.fingerprint).eval()
    vocab_size = loaded.model.config.vocab_size
    before = probe_logits(model, vocab_size)
    merged = model.merge_and_unload().eval()
    diff = (probe_logits(merged, vocab_size) - before).abs().max().item()
    if not diff <= tolerance:
        raise UserError(f"{adapter_dir}: merged logits differ from base+adapter by {diff:.3g} (> {tolerance})")
    with atomic_output_dir(out) as tmp:
        merged.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
    return diff
