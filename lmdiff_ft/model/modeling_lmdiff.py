"""LM-Diff: a Llama decoder whose layers add adaptive RMSNorm, differential attention, causal token
mixing and a squeeze-and-excitation gate. Every step is strictly causal and exact under the cache.

One decoder layer, with x the residual stream, m the padding mask and ρ(v) = v / rms(v) in fp32:

    c  = causal masked mean of ρ(x)                       (running sum + count in the cache)
    h  = w ⊙ ρ(x) ⊙ (1 + fc_gamma(c))                      adaptive RMSNorm
    a  = o_proj(A1·v − λ·A2·v)                             differential attention, λ from `diff_lambda`
    a  = a + causal_depthwise_conv(m ⊙ a)                  token mixing (last K−1 inputs in the cache)
    x' = x + a
    y  = mlp(w' ⊙ ρ(x') ⊙ (1 + fc_gamma'(c)))
    y  = y ⊙ 2·sigmoid(fc2(relu(fc1(causal masked mean of y))))   SE gate (running sum in the cache)
    out = x' + y

Rows packed with several sequences (position_ids restarting at 0, TRL's padding-free packing) are kept
apart: attention runs per sequence and the means and the conv restart at each one (`PackedSequences`).

The layout (`.model`, `.lm_head`, `GradientCheckpointingLayer`, `GenerationMixin`) follows
`modeling_llama.py` so that PEFT, TRL and `generate` treat this model like any transformers LM.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    repeat_kv,
    rotate_half,
)
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from ..integrations.bitsandbytes import dense_weight
from ..integrations.transformers import DynamicLayerWithStates
from .configuration_lmdiff import LmDiffConfig
from .remote_code import AUTO_MAP, write_remote_code

RunningMean = tuple[torch.Tensor, torch.Tensor]  # (sum [B, D], count [B, 1]) in fp32


def lambda_init(layer_idx: int) -> float:
    """The Differential Transformer's depth schedule for λ (0-based layer index)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """ρ(x) = x / sqrt(mean(x²) + eps), computed and returned in fp32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def causal_masked_mean(
    values: torch.Tensor,
    token_mask: torch.Tensor | None,
    past: RunningMean | None,
    packed: "PackedSequences | None" = None,
) -> tuple[torch.Tensor, RunningMean]:
    """Mean over the non-padding positions s ≤ t, for every t, continuing from `past`.

    values [B, T, D] in any dtype, summed in fp32; token_mask [B, T], or None when nothing is padding
    (which saves the masking pass). Returns the fp32 means [B, T, D] and the running (sum, count) after
    the last position, which is all a cache needs to continue exactly. With packed rows the mean restarts
    at each sequence.
    """
    batch, length, _ = values.shape
    if packed is not None:
        totals = values.cumsum(dim=1, dtype=torch.float32)
        totals_before = F.pad(totals, (0, 0, 1, 0))  # [B, T+1, D]: the sum of the positions before index i
        starts = torch.arange(length, device=values.device) - packed.positions  # where each sequence begins
        sums = totals - totals_before.gather(1, starts.unsqueeze(-1).expand_as(totals))
        counts = (packed.positions + 1).unsqueeze(-1).to(torch.float32)
    elif token_mask is None:
        sums = values.cumsum(dim=1, dtype=torch.float32)
        counts = torch.arange(1, length + 1, device=values.device, dtype=torch.float32).view(1, length, 1)
    else:
        mask = token_mask.to(values.dtype).unsqueeze(-1)
        sums = (values * mask).cumsum(dim=1, dtype=torch.float32)
        counts = mask.cumsum(dim=1, dtype=torch.float32)
    if past is not None:
        sums = sums + past[0].unsqueeze(1)
        counts = counts + past[1].unsqueeze(1)
    return sums / counts.clamp(min=1.0), (sums[:, -1], counts[:, -1].expand(batch, 1))


def padding_token_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The new tokens' [B, T] padding mask, or None when no position (past or new) is padding: the masked
    means and the conv then skip their masking passes."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask[:, -length:]


@dataclass(frozen=True)
class PackedSequences:
    """Where the sequences of a packed batch lie. The causal means and the conv restart where `positions`
    does; attention runs on each sequence alone: its tokens are gathered into one padded row per sequence
    ([S, L], L the longest), attended with SDPA's causal flag, and scattered back. That costs S·L² where a
    [T, T] block-diagonal mask over the packed row would cost T²."""

    positions: torch.Tensor  # [B, T] each token's position within its own sequence
    gather: torch.Tensor  # [S, L] flat index (into batch × length) of each sequence's tokens; tails repeat
    scatter: torch.Tensor  # [batch × length] flat index into S × L of each token

    @classmethod
    def from_positions(cls, positions: torch.Tensor) -> "PackedSequences":
        flat = positions.reshape(-1)
        starts = (flat == 0).nonzero().squeeze(1)  # every row starts a sequence (checked), so rows never mix
        ends = torch.cat([starts[1:], starts.new_tensor([flat.numel()])])
        longest = int((ends - starts).max())
        offsets = torch.arange(longest, device=flat.device)
        gather = torch.minimum(starts[:, None] + offsets[None, :], ends[:, None] - 1)  # padding repeats the last
        sequence = (flat == 0).cumsum(0) - 1
        return cls(positions=positions, gather=gather, scatter=sequence * longest + flat)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **sdpa_kwargs) -> torch.Tensor:
        """SDPA per sequence; [B, heads, T, d] in, [B, T, heads, d] out (as transformers' attention functions
        return it). A padded tail only follows its sequence's real tokens, so the causal flag already keeps it out
        of their attention."""
        batch, _, length, head_dim = query.shape
        sequences, longest = self.gather.shape

        def per_sequence(x: torch.Tensor) -> torch.Tensor:
            tokens = x.transpose(1, 2).reshape(batch * length, -1, head_dim)
            return tokens[self.gather.reshape(-1)].view(sequences, longest, -1, head_dim).transpose(1, 2)

        output = F.scaled_dot_product_attention(
            per_sequence(query), per_sequence(key), per_sequence(value), is_causal=True, **sdpa_kwargs
        )
        output = output.transpose(1, 2).reshape(sequences * longest, -1, head_dim)[self.scatter]
        return output.view(batch, length, -1, head_dim)


def packed_sequences(position_ids: torch.Tensor, token_mask: torch.Tensor | None) -> PackedSequences | None:
    """The layout of rows that hold several sequences end to end (position_ids restarting at 0 inside a row,
    as TRL's padding-free packing sends them); None when each row is one sequence.

    Left-padded batches also restart their position_ids; there the padding mask already says what to skip.
    """
    if token_mask is not None or position_ids.shape[1] < 2:
        return None
    steps = position_ids[:, 1:] - position_ids[:, :-1]
    if bool((steps == 1).all()):
        return None
    restarts = position_ids[:, 1:][steps != 1]
    if bool((restarts != 0).any()) or bool((position_ids[:, 0] != 0).any()):
        raise ValueError("packed sequences need position_ids that count 0, 1, 2, … within each sequence")
    return PackedSequences.from_positions(position_ids)


def zero_init(module: nn.Module) -> nn.Module:
    """Mark a layer to start at exactly zero (see `_init_weights`): the neutral point of a new component."""
    module._zero_init = True
    return module


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    query_length: int,
    past_length: int,
    device: torch.device,
    additive_dtype: torch.dtype | None = None,
) -> torch.Tensor | None:
    """Boolean [B, 1, q, k] mask (True = attend), or None when SDPA's own causal flag is enough.

    With `additive_dtype` (eager attention, which adds the mask to its scores and has no causal flag) always a
    mask, in that dtype: 0 where a query attends, the dtype's minimum elsewhere.

    Each query may always attend to itself: a padding query would otherwise see nothing, and SDPA would
    return NaN there, which the masked means (0 · NaN) would then spread.
    """
    has_padding = attention_mask is not None and not bool(attention_mask.all())
    if additive_dtype is not None:
        allowed = build_attention_mask(attention_mask, query_length, past_length, device)
        if allowed is None:
            key_pos = torch.arange(past_length + query_length, device=device)
            allowed = key_pos[None, None, None, :] <= key_pos[past_length:, None]
        zeros = torch.zeros(allowed.shape, dtype=additive_dtype, device=allowed.device)
        return zeros.masked_fill(~allowed, torch.finfo(additive_dtype).min)
    if not has_padding and (past_length == 0 or query_length == 1):
        return None
    key_length = past_length + query_length
    key_pos = torch.arange(key_length, device=device)
    query_pos = torch.arange(past_length, key_length, device=device)
    allowed = key_pos[None, :] <= query_pos[:, None]
    if has_padding:
        if attention_mask.shape[-1] != key_length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions, expected past + new = {key_length}"
            )
        allowed = allowed[None] & attention_mask.bool()[:, None, :]
        allowed = allowed | (key_pos[None, :] == query_pos[:, None])[None]
        return allowed[:, None]
    return allowed[None, None]


class LmDiffCacheLayer(DynamicLayerWithStates):
    """One layer's decoding state: keys and values of both attention branches (stacked on the head axis,
    [k1; k2] and [v; v]), the token-mixing conv's last K−1 inputs, and the running sums of the context and
    the SE squeeze (which follow the batch through beam search, and cannot be cropped)."""

    extra_states = ("conv_state", "context", "squeeze")
    conv_state: torch.Tensor | None
    context: RunningMean | None
    squeeze: RunningMean | None


class LmDiffCache(Cache):
    """The model's cache: one `LmDiffCacheLayer` per decoder layer."""

    def __init__(self, config: LmDiffConfig):
        super().__init__(layers=[LmDiffCacheLayer() for _ in range(config.num_hidden_layers)])


class LmDiffAdaptiveRMSNorm(nn.Module):
    """h = w ⊙ ρ(x) ⊙ (1 + fc_gamma(c)); without `fc_gamma` it is Llama's RMSNorm, bit for bit."""

    def __init__(self, config: LmDiffConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(config.hidden_size))
        self.variance_epsilon = config.rms_norm_eps
        self.fc_gamma: nn.Module | None = None
        if config.use_adaptive_norm:
            if config.adaptive_norm_rank is None:
                self.fc_gamma = zero_init(nn.Linear(config.hidden_size, config.hidden_size, bias=True))
            else:
                self.fc_gamma = nn.Sequential(
                    nn.Linear(config.hidden_size, config.adaptive_norm_rank, bias=False),
                    zero_init(nn.Linear(config.adaptive_norm_rank, config.hidden_size, bias=True)),
                )

    def forward(
        self, hidden_states: torch.Tensor, context: torch.Tensor | None, normed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`normed` = ρ(hidden_states) when the caller already has it (the layer needs it for the context)."""
        if normed is None:
            normed = rms_normalize(hidden_states, self.variance_epsilon)
        if self.fc_gamma is not None and not self._gamma_is_frozen_zero():
            gamma = self.fc_gamma(context.to(hidden_states.dtype))
            normed = torch.addcmul(normed, normed, gamma)  # ρ ⊙ (1 + γ) in one pass, in fp32
        return self.weight * normed.to(hidden_states.dtype)

    def _gamma_is_frozen_zero(self) -> bool:
        """True when fc_gamma is a frozen Linear (plain or quantized) whose weight and bias are exactly zero: a
        converted base before its adaptive norm is trained, and so during training with every preset but
        `adaptive_norm`. Then γ ≡ 0 and skipping fc_gamma is exact, which saves two D×D products per token and
        layer (forward and backward: ~8% of a SmolLM2-size training step). Checked once per change of the
        tensors (their version counters move on every in-place write: loading, merging, an optimizer step)."""
        fc = self.fc_gamma
        if not isinstance(fc, nn.Linear) or any(p.requires_grad for p in fc.parameters()):
            return False  # trained (directly or through an adapter: PEFT's layers are no nn.Linear) or low rank
        tensors = [fc.weight] + ([fc.bias] if fc.bias is not None else [])
        if fc.weight.is_meta:
            return False  # shapes only (FLOP counting): no values to look at
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if getattr(self, "_zero_checked", None) != key:
            self._zero_checked = key
            self._is_zero = not any(bool(t.any()) for t in [dense_weight(fc), *tensors[1:]])
        return self._is_zero


class LmDiffLambda(nn.Module):
    """The four λ vectors of one layer, in a module of their own so adapters can train them by name:
    λ = exp(⟨λ_q1, λ_k1⟩) − exp(⟨λ_q2, λ_k2⟩) + λ_base, a scalar computed once per layer and step."""

    def __init__(self, config: LmDiffConfig, layer_idx: int):
        super().__init__()
        self.lambda_q1 = nn.Parameter(torch.zeros(config.head_dim))
        self.lambda_k1 = nn.Parameter(torch.zeros(config.head_dim))
        self.lambda_q2 = nn.Parameter(torch.zeros(config.head_dim))
        self.lambda_k2 = nn.Parameter(torch.zeros(config.head_dim))
        self.lambda_base = lambda_init(layer_idx) if config.lambda_base is None else config.lambda_base

    def forward(self) -> torch.Tensor:
        first = torch.exp(torch.dot(self.lambda_q1.float(), self.lambda_k1.float()))
        second = torch.exp(torch.dot(self.lambda_q2.float(), self.lambda_k2.float()))
        return first - second + self.lambda_base


def differential_eager_attention_forward(
    module: "LmDiffAttention",
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's eager attention, with the two branches' softmax maps combined into A1 − λ·A2 before the values:
    the map returned is then the one that really mixes v (and carries its gradient). [B, T, heads, d] out."""
    scores = torch.matmul(query, repeat_kv(key, module.num_key_value_groups).transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if module.use_diff_attn:
        first, second = weights.chunk(2, dim=1)
        weights = torch.addcmul(first, second, module.diff_lambda().to(weights.dtype), value=-1.0)
        value = value.chunk(2, dim=1)[0]  # [v; v]
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, repeat_kv(value, module.num_key_value_groups))
    return output.transpose(1, 2).contiguous(), weights


def sdpa_attention_forward(
    module: "LmDiffAttention",
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """One SDPA call with grouped-query heads left to the kernel, also with a padding mask. transformers' own SDPA
    function copies keys and values out to every query head when there is a mask, and keeps the copies for the
    backward pass: the main job's peak RSS was 3.39 GB with it, 3.22 GB with this. [B, T, heads, d] out, no maps."""
    output = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        is_causal=attention_mask is None and query.shape[2] > 1,
        scale=scaling,
        enable_gqa=module.num_key_value_groups > 1,
    )
    return output.transpose(1, 2), None


# LM-Diff's own eager and SDPA; any other name goes to the functions registered with transformers' AttentionInterface
ATTENTION_FUNCTIONS = {"eager": differential_eager_attention_forward, "sdpa": sdpa_attention_forward}


class LmDiffAttention(nn.Module):
    """Differential attention: A1·v − λ·A2·v, both softmax maps in one attention call by stacking the heads of
    the two branches (queries [q1; q2], keys [k1; k2], values [v; v], so also in the cache), with GQA as in
    Llama. RoPE is one pass over all query and key heads, in the projections' own [B, T, heads, d] layout.

    The implementation is chosen as in any transformers model (`config._attn_implementation`): SDPA by default (no
    T×T tensor outside the kernel; on GPUs PyTorch picks its flash kernel), eager, which also returns the maps (the
    differential map A1 − λ·A2 per head is what `output_attentions=True` gives), or a function registered with
    transformers' `AttentionInterface`."""

    def __init__(self, config: LmDiffConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = True
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads  # the same for the stacked branches
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        hidden, bias = config.hidden_size, config.attention_bias

        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)

        self.use_diff_attn = config.use_diff_attn
        if self.use_diff_attn:
            self.q2_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
            self.k2_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
            self.diff_lambda = LmDiffLambda(config, layer_idx)
            self.subln = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.use_subln else None
            self.subln_scale = 1.0 - lambda_init(layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: LmDiffCacheLayer | None = None,
        packed: PackedSequences | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        queries, keys = [self.q_proj], [self.k_proj]
        if self.use_diff_attn:
            queries, keys = [self.q_proj, self.q2_proj], [self.k_proj, self.k2_proj]
        projected = [proj(hidden_states) for proj in queries + keys]
        # this process's query heads: all of them, or its share under tensor parallelism (the plan shards by heads)
        query_heads = sum(p.shape[-1] for p in projected[: len(queries)]) // self.head_dim
        query_key = torch.cat(projected, dim=-1).view(batch, length, -1, self.head_dim)  # q1 [, q2], k1 [, k2]
        cos, sin = (t.unsqueeze(2) for t in position_embeddings)
        query_key = (query_key * cos + rotate_half(query_key) * sin).transpose(1, 2)  # RoPE, then [B, heads, T, d]
        query, key = query_key.split([query_heads, query_key.shape[1] - query_heads], dim=1)
        value = self.v_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        if self.use_diff_attn:
            # v for both branches. Duplicated before the cache, so a decode step copies one token's v, not
            # the whole cached v; the cache holds v twice, which keeps both maps in one SDPA call.
            value = torch.cat([value, value], dim=1)
        if cache is not None:
            key, value = cache.update(key, value)

        dropout = self.attention_dropout if self.training else 0.0
        weights = None  # the maps [B, heads, T, past + T], from eager attention only
        if packed is not None:  # each sequence alone, whatever the implementation (no maps)
            output = packed.attend(
                query, key, value, dropout_p=dropout, scale=self.scaling, enable_gqa=self.num_key_value_groups > 1
            )  # [B, T, heads, d]
        else:
            implementation = self.config._attn_implementation
            attention = ATTENTION_FUNCTIONS.get(implementation) or ALL_ATTENTION_FUNCTIONS.get_interface(
                implementation, differential_eager_attention_forward
            )
            output, weights = attention(
                self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
            )  # output [B, T, heads, d]: both branches' heads, or (eager) already A1·v − λ·A2·v

        if self.use_diff_attn:
            if output.shape[2] == query_heads:
                first, second = output.chunk(2, dim=2)
                output = torch.addcmul(first, second, self.diff_lambda().to(first.dtype), value=-1.0)  # A1·v − λ·A2·v
            if self.subln is not None:
                output = self.subln_scale * self.subln(output)
        output = output.reshape(batch, length, -1)
        return self.o_proj(output), weights


class LmDiffTokenMixing(nn.Module):
    """u = a + causal_depthwise_conv(m ⊙ a): a K-tap depthwise conv that only looks back (zeros before the
    first token, or the cached last K−1 inputs while decoding).

    `conv` holds the weights (the name adapters and checkpoints use) but the conv runs as K shifted
    multiply-adds in the [B, T, D] layout: no transposes, and on CPU 3x faster than oneDNN's depthwise conv
    in training and ~100x faster on a decode step's 3-wide input (where oneDNN takes tens of ms)."""

    def __init__(self, config: LmDiffConfig):
        super().__init__()
        self.kernel_size = config.conv_kernel_size
        hidden = config.hidden_size
        self.conv = zero_init(nn.Conv1d(hidden, hidden, self.kernel_size, groups=hidden, bias=True))

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None,
        cache: LmDiffCacheLayer | None = None,
        packed: PackedSequences | None = None,
    ) -> torch.Tensor:
        batch, length, hidden = hidden_states.shape
        inputs = hidden_states
        if token_mask is not None:
            inputs = inputs * token_mask.unsqueeze(-1).to(inputs.dtype)
        if cache is not None and cache.conv_state is not None:
            history = cache.conv_state
        else:
            history = inputs.new_zeros(batch, self.kernel_size - 1, hidden)
        window = torch.cat([history, inputs], dim=1)  # [B, K−1+T, D]
        if cache is not None:
            cache.conv_state = window[:, window.shape[1] - (self.kernel_size - 1) :]
        weight = self.conv.weight[:, 0]  # [D, K]; tap k multiplies the input K−1−k steps back
        mixed = hidden_states + self.conv.bias
        for k in range(self.kernel_size):
            shifted, steps_back = window[:, k : k + length], self.kernel_size - 1 - k
            if packed is not None and steps_back > 0:  # never reach back into the previous sequence
                shifted = shifted * (packed.positions >= steps_back).unsqueeze(-1).to(shifted.dtype)
            mixed = torch.addcmul(mixed, shifted, weight[:, k])
        return mixed


class LmDiffSEGate(nn.Module):
    """y' = y ⊙ 2·sigmoid(fc2(relu(fc1(s)))), s the causal masked mean of y: a channel gate that, unlike a
    whole-sequence squeeze, never lets a token see the future and is the same while decoding."""

    def __init__(self, config: LmDiffConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.se_hidden_size, bias=True)
        self.fc2 = zero_init(nn.Linear(config.se_hidden_size, config.hidden_size, bias=True))

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None,
        cache: LmDiffCacheLayer | None = None,
        packed: PackedSequences | None = None,
    ) -> torch.Tensor:
        past = cache.squeeze if cache is not None else None
        squeeze, running = causal_masked_mean(hidden_states, token_mask, past, packed)
        if cache is not None:
            cache.squeeze = running
        gate = 2.0 * torch.sigmoid(self.fc2(F.relu(self.fc1(squeeze.to(hidden_states.dtype)))))
        return hidden_states * gate.to(hidden_states.dtype)


class LmDiffDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LmDiffConfig, layer_idx: int):
        super().__init__()
        self.variance_epsilon = config.rms_norm_eps
        self.use_adaptive_norm = config.use_adaptive_norm
        self.input_layernorm = LmDiffAdaptiveRMSNorm(config)
        self.self_attn = LmDiffAttention(config, layer_idx)
        self.token_mixing = LmDiffTokenMixing(config) if config.use_token_mixing else None
        self.post_attention_layernorm = LmDiffAdaptiveRMSNorm(config)
        self.mlp = LlamaMLP(config)
        self.se_gate = LmDiffSEGate(config) if config.use_se_gate else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        cache: LmDiffCacheLayer | None = None,
        packed: PackedSequences | None = None,
        **kwargs,
    ) -> torch.Tensor:
        context = normed = None
        if self.use_adaptive_norm:
            normed = rms_normalize(hidden_states, self.variance_epsilon)
            past = cache.context if cache is not None else None
            context, running = causal_masked_mean(normed, token_mask, past, packed)
            if cache is not None:
                cache.context = running

        attended, _ = self.self_attn(
            self.input_layernorm(hidden_states, context, normed),
            position_embeddings,
            attention_mask,
            cache,
            packed,
            **kwargs,
        )
        if self.token_mixing is not None:
            attended = self.token_mixing(attended, token_mask, cache, packed)
        hidden_states = hidden_states + attended

        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states, context))
        if self.se_gate is not None:
            mlp_out = self.se_gate(mlp_out, token_mask, cache, packed)
        return hidden_states + mlp_out


class LmDiffPreTrainedModel(PreTrainedModel):
    config: LmDiffConfig
    config_class = LmDiffConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LmDiffDecoderLayer"]
    _keep_in_fp32_modules = ["diff_lambda"]
    _supports_sdpa = True
    # Attention functions registered with transformers' `AttentionInterface` run too; they get SDPA's mask convention
    # (boolean [B, 1, q, k], True = attend, or None for a plain causal mask).
    _supports_attention_backend = True
    _is_stateful = True  # the running sums cannot be rewound, so no assisted decoding
    _can_record_outputs = {"hidden_states": LmDiffDecoderLayer, "attentions": LmDiffAttention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Llama's init, plus the LM-Diff parts at their neutral point: adaptive norm off (fc_gamma = 0),
        token mixing off (conv = 0), SE gate = 1 (fc2 = 0). λ vectors are small random vectors."""
        if getattr(module, "_zero_init", False):  # marked by `zero_init`: children are initialised first
            init.zeros_(module.weight)
            init.zeros_(module.bias)
            return
        super()._init_weights(module)
        if isinstance(module, LmDiffLambda):
            for vector in (module.lambda_q1, module.lambda_k1, module.lambda_q2, module.lambda_k2):
                init.normal_(vector, mean=0.0, std=self.config.lambda_init_std)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own `LmDiffCache` on the first forward with use_cache

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs) -> None:
        """transformers' `save_pretrained`, plus this model's code and an `auto_map`: the checkpoint also loads with
        `trust_remote_code=True` where lmdiff_ft is not installed (see `remote_code.py`)."""
        self.config.auto_map = AUTO_MAP
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            write_remote_code(save_directory)


class LmDiffModel(LmDiffPreTrainedModel):
    def __init__(self, config: LmDiffConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LmDiffDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if cache is not None and not isinstance(cache, LmDiffCache):
            raise TypeError(f"LM-Diff needs an LmDiffCache, got {type(cache).__name__}")

        batch, length = inputs_embeds.shape[:2]
        past_length = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("LM-Diff takes a 2-D padding mask [batch, past + new tokens]")
        token_mask = padding_token_mask(attention_mask, length)
        packed = None
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + length, device=inputs_embeds.device)[None]
        else:
            packed = packed_sequences(position_ids.expand(batch, -1), token_mask)
        if packed is not None:
            if cache is not None:
                raise ValueError("packed sequences (position_ids restarting within a row) cannot use a cache")
            use_cache = False  # a cache holding several sequences could not be continued
        eager = self.config._attn_implementation == "eager"
        causal_mask = build_attention_mask(
            attention_mask, length, past_length, inputs_embeds.device, inputs_embeds.dtype if eager else None
        )
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = LmDiffCache(self.config)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for i, decoder_layer in enumerate(self.layers):
            hidden_states = decoder_layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                token_mask=token_mask,
                cache=cache.layers[i] if cache is not None else None,
                packed=packed,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class LmDiffForCausalLM(LmDiffPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # as Llama's: each rank projects its share of the vocabulary

    def __init__(self, config: LmDiffConfig):
        super().__init__(config)
        self.model = LmDiffModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class LmDiffForSequenceClassification(GenericForSequenceClassification, LmDiffPreTrainedModel):
    """A score per sequence from the last non-padding token (reward models, classifiers), as Llama's."""


class LmDiffForQuestionAnswering(GenericForQuestionAnswering, LmDiffPreTrainedModel):
    base_model_prefix = "transformer"  # the name transformers' generic head gives its backbone


class LmDiffForTokenClassification(GenericForTokenClassification, LmDiffPreTrainedModel):
    """A label per token."""


__all__ = [
    "LmDiffCache",
    "LmDiffForCausalLM",
    "LmDiffForQuestionAnswering",
    "LmDiffForSequenceClassification",
    "LmDiffForTokenClassification",
    "LmDiffModel",
    "LmDiffPreTrainedModel",
    "build_attention_mask",
    "causal_masked_mean",
    "lambda_init",
]
