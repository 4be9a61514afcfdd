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
apart: attention runs per sequence and the means and the conv restart at each one (`PackedSequences`). A custom
4-D attention mask (a shared prefix with branches) is followed by the means and the conv too (`TokenGraph`).

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
from transformers.cache_utils import Cache, DynamicCache
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
from transformers.utils import can_return_tuple, is_torchdynamo_compiling
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from ..integrations.bitsandbytes import dense_weight
from ..integrations.transformers import DynamicLayerWithStates, StaticLayerWithStates, with_layers_of
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
    layout: "Layout" = None,
) -> tuple[torch.Tensor, RunningMean]:
    """Mean over the non-padding positions s ≤ t, for every t, continuing from `past`.

    values [B, T, D] in any dtype, summed in fp32; token_mask [B, T], or None when nothing is padding
    (which saves the masking pass). Returns the fp32 means [B, T, D] and the running (sum, count) after
    the last position, which is all a cache needs to continue exactly. With packed rows the mean restarts
    at each sequence; under a custom 4-D mask it runs over the tokens each token sees.
    """
    batch, length, _ = values.shape
    if isinstance(layout, TokenGraph):
        sees = layout.sees.to(torch.float32)
        sums = torch.bmm(sees, values.float())  # [B, T, D]: the sum over the tokens each one sees
        counts = sees.sum(-1, keepdim=True)
    elif isinstance(layout, PackedSequences):
        totals = values.cumsum(dim=1, dtype=torch.float32)
        totals_before = F.pad(totals, (0, 0, 1, 0))  # [B, T+1, D]: the sum of the positions before index i
        starts = torch.arange(length, device=values.device) - layout.positions  # where each sequence begins
        sums = totals - totals_before.gather(1, starts.unsqueeze(-1).expand_as(totals))
        counts = (layout.positions + 1).unsqueeze(-1).to(torch.float32)
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


def padding_of(attention_mask: torch.Tensor | None, look: bool = True) -> torch.Tensor | None:
    """The boolean [B, past + new] padding mask, or None when no position is padding: the masked means and the conv
    then skip their masking passes, and SDPA can use its causal flag. `look=False` (a compiled decode step, which must
    not branch on data) keeps the mask without looking; masking with ones changes nothing."""
    if attention_mask is None or (look and bool(attention_mask.all())):
        return None
    return attention_mask.bool()


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


def packed_sequences(position_ids: torch.Tensor) -> PackedSequences | None:
    """The layout of rows that hold several sequences end to end (position_ids restarting at 0 inside a row,
    as TRL's padding-free packing sends them); None when each row is one sequence. Asked only of batches without
    padding: left-padded batches also restart their position_ids, and there the padding mask says what to skip.
    """
    if position_ids.shape[1] < 2:
        return None
    steps = position_ids[:, 1:] - position_ids[:, :-1]
    if bool((steps == 1).all()):
        return None
    restarts = position_ids[:, 1:][steps != 1]
    if bool((restarts != 0).any()) or bool((position_ids[:, 0] != 0).any()):
        raise ValueError("packed sequences need position_ids that count 0, 1, 2, … within each sequence")
    return PackedSequences.from_positions(position_ids)


@dataclass(frozen=True)
class TokenGraph:
    """A custom 4-D attention mask: which tokens each token sees, e.g. a shared prefix followed by several branches
    in one row (their position_ids repeat). Attention takes the mask as it is; the means run over the tokens each
    token sees, and the conv's tap k reads the seen token whose position is k before its own, so every branch
    computes what it would alone. Without a cache: the running sums follow one sequence."""

    sees: torch.Tensor  # [B, T, T] bool, with each token seeing itself
    positions: torch.Tensor  # [B, T]

    @classmethod
    def from_mask(cls, mask: torch.Tensor, positions: torch.Tensor) -> "TokenGraph":
        """`mask` [B, 1, T, T]: boolean (True = attend), additive float (0 = attend), or integer (nonzero = attend)."""
        batch, heads, queries, keys = mask.shape
        if heads != 1 or queries != keys:
            raise ValueError(
                f"a 4-D attention mask must be [batch, 1, tokens, tokens] over the whole sequence (no cache), "
                f"got {list(mask.shape)}"
            )
        sees = mask if mask.dtype == torch.bool else (mask == 0 if mask.is_floating_point() else mask != 0)
        sees = sees[:, 0] | torch.eye(queries, dtype=torch.bool, device=mask.device)
        return cls(sees=sees, positions=positions.expand(batch, queries))

    def earlier(self, inputs: torch.Tensor, steps_back: int) -> torch.Tensor:
        """[B, T, D]: for each token, the input of the token it sees at `steps_back` positions before its own (0 if
        none)."""
        target = self.positions - steps_back
        pick = self.sees & (self.positions[:, None, :] == target[:, :, None])
        return torch.bmm(pick.to(inputs.dtype), inputs)

    def attention_mask(self, additive_dtype: torch.dtype | None) -> torch.Tensor:
        """[B, 1, T, T] in the convention of `build_attention_mask`."""
        allowed = self.sees[:, None]
        return allowed if additive_dtype is None else additive_mask(allowed, additive_dtype)


Layout = PackedSequences | TokenGraph | None  # how a row's tokens form sequences, when not simply one sequence


def zero_init(module: nn.Module) -> nn.Module:
    """Mark a layer to start at exactly zero (see `_init_weights`): the neutral point of a new component."""
    module._zero_init = True
    return module


def build_attention_mask(
    padding: torch.Tensor | None,
    query_positions: torch.Tensor,
    key_length: int,
    additive_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Boolean [B, 1, q, k] mask (True = attend), or with `additive_dtype` (eager attention, which adds the mask to
    its scores) 0 where a query attends and the dtype's minimum elsewhere.

    query_positions [q]: each new token's place among the keys (offset by a static cache's fill level, a 0-d tensor,
    so no shape or branch depends on data). key_length: past + new, or a static cache's length, whose slots after the
    queries are masked like the future. padding [B, key_length]: True for real tokens, or None when none is padding.

    Each query may always attend to itself: a padding query would otherwise see nothing, and SDPA would
    return NaN there, which the masked means (0 · NaN) would then spread.
    """
    key_positions = torch.arange(key_length, device=query_positions.device)
    allowed = (key_positions[None, :] <= query_positions[:, None])[None]  # [1, q, k]
    if padding is not None:
        itself = key_positions[None, :] == query_positions[:, None]
        allowed = (allowed & padding[:, None, :]) | itself[None]  # [B, q, k]
    allowed = allowed[:, None]
    return allowed if additive_dtype is None else additive_mask(allowed, additive_dtype)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as eager attention adds it to its scores: 0 where attending, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class LmDiffLayerStates:
    """What an LM-Diff cache layer holds besides keys and values: the token-mixing conv's last K−1 inputs and the
    running (sum, count) of the context and of the SE squeeze."""

    extra_states = ("conv_state", "context", "squeeze")
    conv_state: torch.Tensor | None
    context: RunningMean | None
    squeeze: RunningMean | None


class LmDiffCacheLayer(LmDiffLayerStates, DynamicLayerWithStates):
    """One layer's decoding state: keys and values of both attention branches (stacked on the head axis,
    [k1; k2] and [v; v]) and the states above (which follow the batch through beam search, and cannot be
    cropped)."""


class LmDiffStaticCacheLayer(LmDiffLayerStates, StaticLayerWithStates):
    """The same state in a static cache (`cache_implementation="static"`, `torch.compile`): keys and values
    preallocated for the cache's length, and the conv window and running sums, which have a fixed size anyway,
    written in place."""


CacheLayer = LmDiffCacheLayer | LmDiffStaticCacheLayer


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
        if is_torchdynamo_compiling():
            return False  # the check reads values; computing γ = 0 is exact too
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
        cache: CacheLayer | None = None,
        layout: Layout = None,
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
        if isinstance(layout, PackedSequences):  # each sequence alone, whatever the implementation (no maps)
            output = layout.attend(
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
        cache: CacheLayer | None = None,
        layout: Layout = None,
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
            cache.write_state("conv_state", window[:, window.shape[1] - (self.kernel_size - 1) :])
        weight = self.conv.weight[:, 0]  # [D, K]; tap k multiplies the input K−1−k steps back
        mixed = hidden_states + self.conv.bias
        for k in range(self.kernel_size):
            shifted, steps_back = window[:, k : k + length], self.kernel_size - 1 - k
            if isinstance(layout, PackedSequences) and steps_back > 0:  # never reach back into the previous sequence
                shifted = shifted * (layout.positions >= steps_back).unsqueeze(-1).to(shifted.dtype)
            elif isinstance(layout, TokenGraph) and steps_back > 0:  # the branch's own earlier token
                shifted = layout.earlier(inputs, steps_back)
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
        cache: CacheLayer | None = None,
        layout: Layout = None,
    ) -> torch.Tensor:
        past = cache.squeeze if cache is not None else None
        squeeze, running = causal_masked_mean(hidden_states, token_mask, past, layout)
        if cache is not None:
            cache.write_state("squeeze", running)
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
        cache: CacheLayer | None = None,
        layout: Layout = None,
        **kwargs,
    ) -> torch.Tensor:
        context = normed = None
        if self.use_adaptive_norm:
            normed = rms_normalize(hidden_states, self.variance_epsilon)
            past = cache.context if cache is not None else None
            context, running = causal_masked_mean(normed, token_mask, past, layout)
            if cache is not None:
                cache.write_state("context", running)

        attended, _ = self.self_attn(
            self.input_layernorm(hidden_states, context, normed),
            position_embeddings,
            attention_mask,
            cache,
            layout,
            **kwargs,
        )
        if self.token_mixing is not None:
            attended = self.token_mixing(attended, token_mask, cache, layout)
        hidden_states = hidden_states + attended

        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states, context))
        if self.se_gate is not None:
            mlp_out = self.se_gate(mlp_out, token_mask, cache, layout)
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
    _can_compile_fullgraph = True  # a decode step with a static cache has no data-dependent branch (see forward)
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
        batch, length = inputs_embeds.shape[:2]
        if attention_mask is not None and attention_mask.dim() not in (2, 4):
            raise ValueError("LM-Diff takes a 2-D padding mask [batch, past + new tokens] or a 4-D custom mask")
        if self.gradient_checkpointing and self.training:
            use_cache = False
        layout = graph = None
        if attention_mask is not None and attention_mask.dim() == 4:  # who sees whom, given token by token
            if position_ids is None:
                position_ids = torch.arange(length, device=inputs_embeds.device)[None]
            layout = graph = TokenGraph.from_mask(attention_mask, position_ids)
            attention_mask = None
        # A compiled decode step (a cache given) keeps the mask without looking at it: no branch on data.
        padding = padding_of(attention_mask, look=not (cache is not None and is_torchdynamo_compiling()))
        if position_ids is not None and padding is None and graph is None:
            layout = packed_sequences(position_ids.expand(batch, -1))
        if layout is not None:
            if cache is not None:
                raise ValueError(
                    "packed sequences (position_ids restarting within a row) and 4-D masks cannot use a cache"
                )
            use_cache = False  # a cache holding several sequences could not be continued
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None:  # generate's DynamicCache/StaticCache come with Llama's layers: LM-Diff's go in
            cache = with_layers_of(cache, self.config.num_hidden_layers, LmDiffCacheLayer, LmDiffStaticCacheLayer)

        # The keys attention sees: past + new, or all of a static cache's slots (its fill level is then a 0-d tensor).
        past_length = cache.get_seq_length() if cache is not None else 0
        static = cache is not None and isinstance(cache.layers[0], LmDiffStaticCacheLayer)
        key_length = cache.get_max_length() if static else past_length + length
        query_positions = torch.arange(length, device=inputs_embeds.device) + past_length
        if position_ids is None:
            position_ids = query_positions[None]
        token_mask = None  # the new tokens' padding, for the masked means and the conv
        if padding is not None:
            if padding.shape[-1] != key_length and not (static and padding.shape[-1] < key_length):
                raise ValueError(
                    f"attention_mask covers {padding.shape[-1]} positions, expected past + new = {key_length}"
                )
            padding = F.pad(padding, (0, key_length - padding.shape[-1]))  # a static cache's unwritten slots
            token_mask = padding[:, query_positions]
        eager = self.config._attn_implementation == "eager"
        causal_mask = None  # SDPA's causal flag says it all (or, for one query, there is nothing to mask)
        if graph is not None:
            causal_mask = graph.attention_mask(inputs_embeds.dtype if eager else None)
        elif eager or padding is not None or static or not (past_length == 0 or length == 1):
            additive = inputs_embeds.dtype if eager else None
            causal_mask = build_attention_mask(padding, query_positions, key_length, additive)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for i, decoder_layer in enumerate(self.layers):
            hidden_states = decoder_layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                token_mask=token_mask,
                cache=cache.layers[i] if cache is not None else None,
                layout=layout,
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

    def create_masks_for_generate(
        self, attention_mask: torch.Tensor | None, cache: Cache, **kwargs
    ) -> torch.Tensor | None:
        """The mask `generate` hands each step when its cache is static (and so may be compiled): where other models
        take a 4-D causal mask there, LM-Diff's forward takes the 2-D padding mask, which its running means and conv
        need. Laid over all of the cache's slots (0 past the tokens so far), it has one shape at every step, so a
        compiled step never recompiles. (`generate` looks this method up on the model; transformers 5.24.)"""
        if attention_mask is None:
            return None
        return F.pad(attention_mask, (0, cache.get_max_length() - attention_mask.shape[-1]))

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
    "LmDiffCacheLayer",
    "LmDiffForCausalLM",
    "LmDiffForQuestionAnswering",
    "LmDiffForSequenceClassification",
    "LmDiffForTokenClassification",
    "LmDiffModel",
    "LmDiffPreTrainedModel",
    "LmDiffStaticCacheLayer",
    "build_attention_mask",
    "causal_masked_mean",
    "lambda_init",
]
