"""Configuration of LM-Diff: every Llama field, plus one switch and one size per LM-Diff component."""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class LmDiffConfig(LlamaConfig):
    """A `LlamaConfig` with the LM-Diff components (see README, "Architecture").

    With every `use_*` switch off the model computes exactly what `LlamaForCausalLM` computes, which is
    what makes a converted checkpoint function-preserving and the components easy to ablate.

    lambda_base: the constant added to λ. `None` means the depth schedule λ_init(l) = 0.8 − 0.6·exp(−0.3·l)
        of a model built from scratch; a converted Llama uses 0.0 so that λ starts at exactly zero.
    lambda_init_std: std of the four λ vectors at initialisation.
    adaptive_norm_rank: `None` for a full-rank fc_gamma (D×D), else a low-rank D→r→D factorisation.
    """

    model_type = "lmdiff"
    # Llama's tensor-parallel plan plus the second branch's projections, sharded by heads like the first. The rest of
    # LM-Diff stays replicated: fc_gamma, the conv and the SE gate act on the full hidden state (after o_proj's
    # all-reduce). λ and subln are replicated too but act on each head alone, so each rank's gradient of them
    # covers only its own heads and the ranks sum them.
    base_model_tp_plan = {
        **LlamaConfig.base_model_tp_plan,
        "layers.*.self_attn.q2_proj": "colwise",
        "layers.*.self_attn.k2_proj": "colwise",
        "layers.*.self_attn.diff_lambda": "replicated_with_grad_allreduce",
        "layers.*.self_attn.subln": "replicated_with_grad_allreduce",
    }

    use_diff_attn: bool = True
    use_subln: bool = True
    use_adaptive_norm: bool = True
    use_token_mixing: bool = True
    use_se_gate: bool = True
    conv_kernel_size: int = 3
    se_reduction: int = 16
    adaptive_norm_rank: int | None = None
    lambda_base: float | None = None
    lambda_init_std: float = 0.1

    def validate_architecture(self):
        super().validate_architecture()
        if self.conv_kernel_size < 1:
            raise ValueError(f"conv_kernel_size must be >= 1, got {self.conv_kernel_size}")
        if not 1 <= self.se_reduction <= self.hidden_size:
            raise ValueError(f"se_reduction must be in [1, hidden_size], got {self.se_reduction}")
        if self.adaptive_norm_rank is not None and self.adaptive_norm_rank < 1:
            raise ValueError(f"adaptive_norm_rank must be >= 1 or null, got {self.adaptive_norm_rank}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def se_hidden_size(self) -> int:
        return max(1, self.hidden_size // self.se_reduction)


__all__ = ["LmDiffConfig"]
