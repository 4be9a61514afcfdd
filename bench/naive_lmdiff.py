"""LM-Diff written the obvious way, kept only as the benchmarks' yardstick.

It computes the same function as `lmdiff_ft.model.LmDiffForCausalLM` (tests/test_naive_reference.py
loads one state dict into both) and has the same module names, so the same LoRA config applies. What
makes it naive: each attention branch builds its explicit T×T score and softmax matrices (with the
key/value heads copied out to every query head), and the causal means and the causal conv are Python
loops over time. No cache, no generation: training forward only.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from lmdiff_ft.model import LmDiffConfig
from lmdiff_ft.model.modeling_lmdiff import lambda_init


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) in fp32."""
    x = x.float()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def loop_causal_mean(values: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the non-padding positions s ≤ t, one time step at a time. values [B, T, D]."""
    total = torch.zeros_like(values[:, 0])
    count = torch.zeros_like(token_mask[:, :1])
    means = []
    for t in range(values.shape[1]):
        weight = token_mask[:, t : t + 1]
        total = total + weight * values[:, t]
        count = count + weight
        means.append(total / torch.clamp(count, min=1.0))
    return torch.stack(means, dim=1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class NaiveRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms(x, self.eps).to(x.dtype)


class NaiveAdaptiveNorm(nn.Module):
    def __init__(self, config: LmDiffConfig):
        super().__init__()
        hidden = config.hidden_size
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = config.rms_norm_eps
        if config.adaptive_norm_rank is None:
            self.fc_gamma = nn.Linear(hidden, hidden)
        else:
            self.fc_gamma = nn.Sequential(
                nn.Linear(hidden, config.adaptive_norm_rank, bias=False), nn.Linear(config.adaptive_norm_rank, hidden)
            )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        gamma = self.fc_gamma(context.to(x.dtype)).float()
        return self.weight * (rms(x, self.eps) * (1.0 + gamma)).to(x.dtype)


class NaiveLambda(nn.Module):
    def __init__(self, config: LmDiffConfig, layer_idx: int):
        super().__init__()
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(torch.zeros(config.head_dim)))
        self.lambda_base = lambda_init(layer_idx) if config.lambda_base is None else config.lambda_base

    def forward(self) -> torch.Tensor:
        first = torch.exp((self.lambda_q1.float() * self.lambda_k1.float()).sum())
        second = torch.exp((self.lambda_q2.float() * self.lambda_k2.float()).sum())
        return first - second + self.lambda_base


class NaiveAttention(nn.Module):
    def __init__(self, config: LmDiffConfig, layer_idx: int):
        super().__init__()
        hidden, heads, kv_heads, d = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        bias = config.attention_bias
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d
        self.q_proj = nn.Linear(hidden, heads * d, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(heads * d, hidden, bias=bias)
        self.q2_proj = nn.Linear(hidden, heads * d, bias=bias)
        self.k2_proj = nn.Linear(hidden, kv_heads * d, bias=bias)
        self.diff_lambda = NaiveLambda(config, layer_idx)
        self.subln = NaiveRMSNorm(d, config.rms_norm_eps) if config.use_subln else None
        self.subln_scale = 1.0 - lambda_init(layer_idx)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, n·d] → [B, H, T, d], key/value heads copied out to every query head."""
        batch, length, _ = x.shape
        x = x.view(batch, length, -1, self.head_dim).transpose(1, 2)
        return x.repeat_interleave(self.heads // x.shape[1], dim=1)

    def branch(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor):
        scores = query @ key.transpose(-1, -2) / self.head_dim**0.5  # [B, H, T, T]
        scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(value.dtype) @ value

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        def roped(proj: nn.Linear) -> torch.Tensor:
            return rotate(self.split(proj(h)), cos, sin)

        value = self.split(self.v_proj(h))
        first = self.branch(roped(self.q_proj), roped(self.k_proj), value, allowed)
        second = self.branch(roped(self.q2_proj), roped(self.k2_proj), value, allowed)
        out = first - self.diff_lambda().to(first.dtype) * second
        if self.subln is not None:
            out = self.subln_scale * self.subln(out)
        return self.o_proj(out.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1))


class NaiveTokenMixing(nn.Module):
    def __init__(self, config: LmDiffConfig):
        super().__init__()
        hidden = config.hidden_size
        self.conv = nn.Conv1d(hidden, hidden, config.conv_kernel_size, groups=hidden)

    def forward(self, a: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        kernel = self.conv.weight[:, 0].t()  # [K, D]
        size = kernel.shape[0]
        inputs = F.pad(a * token_mask.unsqueeze(-1).to(a.dtype), (0, 0, size - 1, 0))
        mixed = [(inputs[:, t : t + size] * kernel).sum(1) + self.conv.bias for t in range(a.shape[1])]
        return a + torch.stack(mixed, dim=1)


class NaiveSEGate(nn.Module):
    def __init__(self, config: LmDiffConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.se_hidden_size)
        self.fc2 = nn.Linear(config.se_hidden_size, config.hidden_size)

    def forward(self, y: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        squeeze = loop_causal_mean(y.float(), token_mask.float()).to(y.dtype)
        return y * (2.0 * torch.sigmoid(self.fc2(F.relu(self.fc1(squeeze)))))


class NaiveMLP(nn.Module):
    def __init__(self, config: LmDiffConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class NaiveDecoderLayer(nn.Module):
    def __init__(self, config: LmDiffConfig, layer_idx: int):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.input_layernorm = NaiveAdaptiveNorm(config)
        self.self_attn = NaiveAttention(config, layer_idx)
        self.token_mixing = NaiveTokenMixing(config)
        self.post_attention_layernorm = NaiveAdaptiveNorm(config)
        self.mlp = NaiveMLP(config)
        self.se_gate = NaiveSEGate(config)

    def forward(self, x, cos, sin, allowed, token_mask):
        context = loop_causal_mean(rms(x, self.eps), token_mask.float())
        a = self.self_attn(self.input_layernorm(x, context), cos, sin, allowed)
        x = x + self.token_mixing(a, token_mask)
        return x + self.se_gate(self.mlp(self.post_attention_layernorm(x, context)), token_mask)


class NaiveLmDiffModel(nn.Module):
    def __init__(self, config: LmDiffConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([NaiveDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = NaiveRMSNorm(config.hidden_size, config.rms_norm_eps)
        theta = config.rope_parameters["rope_theta"]
        exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim
        self.register_buffer("inv_freq", 1.0 / theta**exponents, persistent=False)


class NaiveLmDiffForCausalLM(nn.Module):
    """Same parameters and names as `LmDiffForCausalLM`, default RoPE, every LM-Diff component on."""

    def __init__(self, config: LmDiffConfig):
        super().__init__()
        parts = ("use_diff_attn", "use_adaptive_norm", "use_token_mixing", "use_se_gate")
        if not all(getattr(config, part) for part in parts) or config.rope_parameters["rope_type"] != "default":
            raise ValueError("the naive reference implements every LM-Diff component on, with default RoPE")
        self.config = config
        self.model = NaiveLmDiffModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        batch, length = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        token_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        positions = torch.arange(length, device=x.device, dtype=torch.float32)
        angles = torch.outer(positions, self.model.inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=x.device)
        allowed = ((causal & token_mask.bool()[:, None, :]) | eye)[:, None]  # [B, 1, T, T]
        for layer in self.model.layers:
            x = layer(x, cos, sin, allowed, token_mask)
        logits = self.lm_head(self.model.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits)
