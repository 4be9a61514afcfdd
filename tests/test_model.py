"""The architecture guarantees of README "Architecture": Llama equivalence, causality, cache exactness."""

import pytest
import torch
from conftest import TINY, randomize_lmdiff_parameters, tiny_llama, tiny_lmdiff_config
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, DynamicCache, StaticCache

from lmdiff_ft.model import LmDiffForCausalLM, modeling_lmdiff
from lmdiff_ft.model.convert import convert_llama_model, is_lmdiff_only


def padded_batch(seed: int = 0, length: int = 12):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, TINY["vocab_size"], (3, length), generator=generator)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    tokens[mask == 0] = TINY["pad_token_id"]
    return tokens, mask


@torch.no_grad()
def test_all_components_off_is_llama():
    llama = tiny_llama()
    config = tiny_lmdiff_config(use_diff_attn=False, use_adaptive_norm=False, use_token_mixing=False, use_se_gate=False)
    model = LmDiffForCausalLM(config).eval()
    model.load_state_dict(llama.state_dict(), strict=True)
    tokens, mask = padded_batch()
    expected = llama(tokens, attention_mask=mask).logits
    got = model(tokens, attention_mask=mask).logits
    valid = mask.bool()
    assert (expected - got)[valid].abs().max().item() <= 1e-6


@torch.no_grad()
def test_conversion_preserves_logits():
    llama = tiny_llama()
    model = convert_llama_model(llama).eval()
    tokens, mask = padded_batch()
    diff = llama(tokens, attention_mask=mask).logits - model(tokens, attention_mask=mask).logits
    assert diff[mask.bool()].abs().max().item() <= 1e-5
    # λ ≡ 0 exactly at conversion, but it is not a constant: the vectors are random.
    lam = model.model.layers[0].self_attn.diff_lambda
    assert lam().item() == 0.0
    assert lam.lambda_q1.abs().sum() > 0


def new_parameters_without_gradient(model, tokens, mask) -> set[str]:
    model.zero_grad()
    model(tokens, attention_mask=mask, labels=tokens).loss.backward()
    new = {n: p for n, p in model.named_parameters() if is_lmdiff_only(n)}
    return {n for n, p in new.items() if p.grad is None or p.grad.abs().sum() == 0}


def test_every_new_parameter_gets_a_gradient_after_conversion():
    model = convert_llama_model(tiny_llama()).train()
    tokens, mask = padded_batch()
    names = [n for n, _ in model.named_parameters() if is_lmdiff_only(n)]
    kinds = [
        "q2_proj",
        "k2_proj",
        "lambda_q1",
        "lambda_k1",
        "lambda_q2",
        "lambda_k2",
        "fc_gamma",
        "conv",
        "se_gate.fc1",
        "se_gate.fc2",
    ]
    assert all(any(k in n for n in names) for k in kinds)

    # Step 0: λ, fc_gamma, conv and SE fc2 have gradients. q2/k2 only act through λ·A2·v and SE fc1 only
    # through fc2, and both multipliers are exactly 0 for the model to equal Llama, so their gradient is
    # exactly 0 at step 0, as LoRA's A is behind B = 0 (README, "Conversion").
    zero_at_init = new_parameters_without_gradient(model, tokens, mask)
    assert zero_at_init and all(any(k in n for k in ("q2_proj", "k2_proj", "se_gate.fc1")) for n in zero_at_init)

    # One optimizer step moves λ and fc2 off zero, and from then on every new parameter learns.
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert new_parameters_without_gradient(model, tokens, mask) == set()


@pytest.mark.parametrize("padding", [False, True])
@torch.no_grad()
def test_causality_with_random_new_parameters(random_lmdiff, padding):
    tokens, mask = padded_batch(length=16)
    if not padding:
        mask = torch.ones_like(mask)
    t = 9
    changed = tokens.clone()
    changed[:, t:] = torch.randint(3, TINY["vocab_size"], changed[:, t:].shape)
    before = random_lmdiff(tokens, attention_mask=mask).logits[:, :t]
    after = random_lmdiff(changed, attention_mask=mask).logits[:, :t]
    assert torch.equal(before, after) or (before - after).abs().max().item() < 1e-6
    # ...and the future does matter where it should
    assert (
        random_lmdiff(changed, attention_mask=mask).logits[:, t:]
        - random_lmdiff(tokens, attention_mask=mask).logits[:, t:]
    ).abs().max() > 1e-3


def decode_in_chunks(model, tokens, mask, chunk_sizes, cache=None):
    cache = DynamicCache(config=model.config) if cache is None else cache
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, start = [], 0
    for size in chunk_sizes:
        end = start + size
        out = model(
            tokens[:, start:end],
            attention_mask=mask[:, :end],
            position_ids=positions[:, start:end],
            cache=cache,
            use_cache=True,
        )
        logits.append(out.logits)
        cache = out.cache
        start = end
    return torch.cat(logits, dim=1)


def new_cache(kind: str, config) -> DynamicCache | StaticCache:
    """The caches users and `generate` make from a config (with Llama's layers; the forward swaps in LM-Diff's)."""
    return DynamicCache(config=config) if kind == "dynamic" else StaticCache(config=config, max_cache_len=20)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("chunks", [[12, 1, 1, 1, 1], [1] * 16, [5, 3, 7, 1], [16]])
@torch.no_grad()
def test_cache_matches_full_forward(random_lmdiff, chunks, kind):
    tokens, mask = padded_batch(length=16)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = random_lmdiff(tokens, attention_mask=mask, position_ids=positions).logits
    cached = decode_in_chunks(random_lmdiff, tokens, mask, chunks, new_cache(kind, random_lmdiff.config))
    assert (full - cached)[mask.bool()].abs().max().item() <= 1e-4


@torch.no_grad()
def test_static_cache_holds_every_state_in_place_and_reset_starts_over(random_lmdiff):
    """A static cache's tensors keep their storage from step to step (what a compiled decode step relies on), and
    `reset` (zeroed states) decodes exactly like a new cache."""
    tokens, mask = padded_batch(length=16)
    cache = StaticCache(config=random_lmdiff.config, max_cache_len=20)
    first = decode_in_chunks(random_lmdiff, tokens[:, :12], mask[:, :12], [12], cache)
    layer = cache.layers[0]
    assert isinstance(layer, modeling_lmdiff.LmDiffStaticCacheLayer) and layer.keys.shape[2] == 20

    def storage():
        return [t.data_ptr() for t in (layer.keys, layer.values, layer.conv_state, *layer.context, *layer.squeeze)]

    before = storage()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    random_lmdiff(tokens[:, 12:13], attention_mask=mask[:, :13], position_ids=positions[:, 12:13], cache=cache)
    assert storage() == before
    assert int(cache.get_seq_length()) == 13

    cache.reset()
    assert int(cache.get_seq_length()) == 0 and not any(t.any() for t in (layer.conv_state, *layer.context))
    again = decode_in_chunks(random_lmdiff, tokens[:, :12], mask[:, :12], [12], cache)
    assert torch.equal(first, again)


@torch.no_grad()
def test_a_cache_filled_by_another_model_is_refused(random_lmdiff):
    tokens, mask = padded_batch()
    llama_cache = tiny_llama()(tokens, attention_mask=mask, use_cache=True).past_key_values
    with pytest.raises(TypeError, match="needs an empty DynamicCache or StaticCache.*of DynamicLayer"):
        random_lmdiff(tokens, attention_mask=mask, cache=llama_cache)


@torch.no_grad()
def test_generate_with_and_without_cache_agree(random_lmdiff):
    tokens, mask = padded_batch(length=10)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = random_lmdiff.generate(tokens, use_cache=True, **kwargs)
    without = random_lmdiff.generate(tokens, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


@torch.no_grad()
def test_beam_search_reorders_every_state(random_lmdiff):
    tokens, mask = padded_batch(length=10)
    kwargs = dict(
        attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, early_stopping=True
    )
    with_cache = random_lmdiff.generate(tokens, use_cache=True, **kwargs)
    without = random_lmdiff.generate(tokens, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("num_beams", [1, 3])
@torch.no_grad()
def test_generate_with_a_static_cache_matches_the_dynamic_one(random_lmdiff, num_beams):
    """`cache_implementation="static"`: greedy and beam search give the same tokens and scores as the default cache.
    Also notices when `generate` stops asking the model for its mask (`create_masks_for_generate`): it would then
    hand the forward a 4-D mask with the cache, which LM-Diff refuses."""
    tokens, mask = padded_batch(length=10)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, num_beams=num_beams)
    kwargs.update(return_dict_in_generate=True, output_scores=True)
    dynamic = random_lmdiff.generate(tokens, **kwargs)
    static = random_lmdiff.generate(tokens, cache_implementation="static", **kwargs)
    assert isinstance(dynamic.past_key_values, DynamicCache) and isinstance(static.past_key_values, StaticCache)
    assert isinstance(static.past_key_values.layers[0], modeling_lmdiff.LmDiffStaticCacheLayer)
    assert torch.equal(dynamic.sequences, static.sequences)
    for a, b in zip(dynamic.scores, static.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@torch.no_grad()
def test_a_custom_4d_mask_keeps_branches_apart(implementation):
    """A shared prefix and three branches in one row (a 4-D mask, position_ids repeating): every branch's logits are
    those of its sequence alone, so the means and the conv follow the mask too. Boolean and additive masks."""
    torch.manual_seed(0)
    model = LmDiffForCausalLM(tiny_lmdiff_config(attn_implementation=implementation)).eval()
    randomize_lmdiff_parameters(model)
    sequences = torch.tensor([[10, 11, 12, 13, 20], [10, 11, 12, 14, 21], [10, 11, 12, 15, 22]])
    alone = model(sequences).logits[:, 3:]  # each branch's two tokens
    row = torch.cat([sequences[0, :3], sequences[:, 3:].flatten()])[None]  # prefix, then (13 20) (14 21) (15 22)
    positions = torch.tensor([[0, 1, 2, 3, 4, 3, 4, 3, 4]])
    branch = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3])
    sees = torch.tril(torch.ones(9, 9, dtype=torch.bool)) & (
        (branch[None, :] == 0) | (branch[:, None] == branch[None, :])
    )
    for mask in (sees[None, None], torch.zeros(1, 1, 9, 9).masked_fill(~sees, torch.finfo(torch.float32).min)):
        shared = model(row, attention_mask=mask, position_ids=positions).logits[0, 3:].view(3, 2, -1)
        torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot use a cache"):
        model(row, attention_mask=sees[None, None], position_ids=positions, cache=DynamicCache(config=model.config))
    with pytest.raises(ValueError, match=r"must be \[batch, 1, tokens, tokens\]"):
        model(row, attention_mask=sees[None, None, :, :8].expand(1, 2, 9, 8), position_ids=positions)


@torch.no_grad()
def test_sampling_is_seeded(random_lmdiff):
    tokens, mask = padded_batch(length=6)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(
            random_lmdiff.generate(
                tokens,
                attention_mask=mask,
                max_new_tokens=6,
                do_sample=True,
                top_p=0.9,
                temperature=0.8,
                pad_token_id=0,
            )
        )
    assert torch.equal(runs[0], runs[1])


@torch.no_grad()
def test_save_load_round_trip(random_lmdiff, tmp_path):
    random_lmdiff.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LmDiffForCausalLM
    tokens, mask = padded_batch()
    assert torch.equal(random_lmdiff(tokens, attention_mask=mask).logits, loaded(tokens, attention_mask=mask).logits)


@torch.no_grad()
def test_low_rank_adaptive_norm_and_kernel_size_are_honoured():
    model = LmDiffForCausalLM(tiny_lmdiff_config(adaptive_norm_rank=8, conv_kernel_size=5)).eval()
    randomize_lmdiff_parameters(model)
    norm = model.model.layers[0].input_layernorm.fc_gamma
    assert norm[0].weight.shape == (8, TINY["hidden_size"])
    assert model.model.layers[0].token_mixing.conv.weight.shape[-1] == 5
    tokens, mask = padded_batch(length=16)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = model(tokens, attention_mask=mask, position_ids=positions).logits
    assert (full - decode_in_chunks(model, tokens, mask, [4] * 4))[mask.bool()].abs().max() <= 1e-4


def test_gradient_checkpointing_matches(random_lmdiff):
    tokens, mask = padded_batch()
    random_lmdiff.train()
    plain = random_lmdiff(tokens, attention_mask=mask, labels=tokens).loss
    plain.backward()
    grads = {n: p.grad.clone() for n, p in random_lmdiff.named_parameters() if p.grad is not None}
    random_lmdiff.zero_grad()
    random_lmdiff.gradient_checkpointing_enable()
    checkpointed = random_lmdiff(tokens, attention_mask=mask, labels=tokens).loss
    checkpointed.backward()
    assert torch.allclose(plain, checkpointed)
    for name, grad in grads.items():
        assert torch.allclose(grad, dict(random_lmdiff.named_parameters())[name].grad, atol=1e-6), name


@pytest.mark.parametrize("rank", [None, 8])
def test_a_model_built_from_scratch_starts_with_neutral_components(rank):
    model = LmDiffForCausalLM(tiny_lmdiff_config(adaptive_norm_rank=rank))
    for layer in model.model.layers:
        last_gamma = layer.input_layernorm.fc_gamma if rank is None else layer.input_layernorm.fc_gamma[-1]
        for zero in (last_gamma, layer.token_mixing.conv, layer.se_gate.fc2):
            assert zero.weight.abs().max() == 0 and zero.bias.abs().max() == 0
        assert layer.se_gate.fc1.weight.abs().max() > 0
        lam = layer.self_attn.diff_lambda
        assert 0.05 < lam.lambda_q1.std() < 0.2 and not torch.equal(lam.lambda_q1, lam.lambda_q2)


@torch.no_grad()
def test_packed_row_matches_its_sequences_run_apart(random_lmdiff):
    """TRL's padding-free packing sends one row of several sequences with position_ids restarting at 0:
    attention, the causal means and the conv must each stay within their own sequence."""
    generator = torch.Generator().manual_seed(3)
    lengths = [5, 9, 1, 4]
    sequences = [torch.randint(3, TINY["vocab_size"], (1, n), generator=generator) for n in lengths]
    apart = torch.cat([random_lmdiff(sequence).logits for sequence in sequences], dim=1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = random_lmdiff(torch.cat(sequences, dim=1), position_ids=positions, use_cache=True)
    assert (packed.logits - apart).abs().max().item() <= 1e-5
    assert packed.cache is None  # a cache of several sequences could not be continued
    # ...and without the restarts the same tokens are one sequence, which is not the same function
    assert (random_lmdiff(torch.cat(sequences, dim=1)).logits - apart).abs().max().item() > 1e-3

    # two packed rows in one batch: rows never mix either
    second_lengths = [10, 3, 6]
    second = [torch.randint(3, TINY["vocab_size"], (1, n), generator=generator) for n in second_lengths]
    second_apart = torch.cat([random_lmdiff(sequence).logits for sequence in second], dim=1)
    rows = torch.cat([torch.cat(sequences, dim=1), torch.cat(second, dim=1)])
    second_positions = torch.cat([torch.arange(n) for n in second_lengths])[None]
    both = random_lmdiff(rows, position_ids=torch.cat([positions, second_positions])).logits
    assert (both - torch.cat([apart, second_apart])).abs().max().item() <= 1e-5


def test_packed_position_ids_must_restart_at_zero(random_lmdiff):
    tokens = torch.randint(3, TINY["vocab_size"], (1, 6))
    with pytest.raises(ValueError, match="count 0, 1, 2"):
        random_lmdiff(tokens, position_ids=torch.tensor([[0, 1, 2, 1, 2, 3]]))
    with pytest.raises(ValueError, match="cannot use a cache"):
        random_lmdiff(
            tokens, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]), cache=DynamicCache(config=random_lmdiff.config)
        )


def test_a_frozen_zero_fc_gamma_is_skipped_exactly_and_used_again_once_it_changes(monkeypatch):
    """A converted base's fc_gamma is exactly zero and, unless the `adaptive_norm` preset trains it, stays so: the
    model skips its products. Logits and gradients equal those of the computed path; a write to it is noticed."""
    model = LmDiffForCausalLM(tiny_lmdiff_config()).train()
    randomize_lmdiff_parameters(model)
    norms = [m for m in model.modules() if isinstance(m, modeling_lmdiff.LmDiffAdaptiveRMSNorm)]
    with torch.no_grad():
        for norm in norms:
            norm.fc_gamma.weight.zero_()
            norm.fc_gamma.bias.zero_()
            norm.fc_gamma.requires_grad_(False)
    tokens, mask = padded_batch()
    calls = []
    for norm in norms:
        norm.fc_gamma.register_forward_hook(lambda *args: calls.append(1))

    def loss_and_grads():
        model.zero_grad()
        loss = model(tokens, attention_mask=mask, labels=tokens).loss
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    skipped_loss, skipped_grads = loss_and_grads()
    assert not calls
    monkeypatch.setattr(modeling_lmdiff.LmDiffAdaptiveRMSNorm, "_gamma_is_frozen_zero", lambda self: False)
    computed_loss, computed_grads = loss_and_grads()
    assert calls and torch.equal(skipped_loss, computed_loss)
    for name, grad in computed_grads.items():
        assert torch.allclose(grad, skipped_grads[name], atol=1e-7), name
    monkeypatch.undo()

    calls.clear()
    with torch.no_grad():
        norms[0].fc_gamma.bias.fill_(0.5)  # e.g. a merged adapter: in place, so its version counter moves
    assert model(tokens, attention_mask=mask).logits is not None and len(calls) == 1


@torch.no_grad()
def test_return_dict_false_gives_the_tuple_of_the_outputs(random_lmdiff):
    tokens, mask = padded_batch()
    as_dict = random_lmdiff(tokens, attention_mask=mask, labels=tokens, use_cache=True)
    as_tuple = random_lmdiff(tokens, attention_mask=mask, labels=tokens, use_cache=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3  # loss, logits, cache (None fields are left out)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)
    hidden = random_lmdiff.model(tokens, attention_mask=mask, return_dict=False)
    assert isinstance(hidden, tuple)
    assert torch.allclose(random_lmdiff.lm_head(hidden[0]), as_dict.logits)


@pytest.mark.parametrize("packed", [False, True])
@torch.no_grad()
def test_eager_attention_matches_sdpa_and_returns_the_differential_maps(random_lmdiff, packed):
    """Eager attention computes what SDPA computes, padded, cached or packed, and gives the maps A1 − λ·A2."""
    tokens, mask = padded_batch(length=16)
    if packed:  # two sequences in each row, as TRL's padding-free packing sends them
        kwargs = dict(position_ids=torch.cat([torch.arange(9), torch.arange(7)])[None].expand(3, -1))
    else:
        kwargs = dict(attention_mask=mask)
    assert random_lmdiff.config._attn_implementation == "sdpa"  # the default
    fast = random_lmdiff(tokens, **kwargs, output_attentions=True)
    assert not fast.attentions  # SDPA gives no maps (and transformers warns)
    random_lmdiff.set_attn_implementation("eager")
    eager = random_lmdiff(tokens, **kwargs, output_attentions=True)
    valid = torch.ones_like(mask).bool() if packed else mask.bool()
    assert (eager.logits - fast.logits)[valid].abs().max().item() <= 1e-5
    if packed:
        assert not eager.attentions  # each sequence is attended alone: no [T, T] map to give
        return
    cached = decode_in_chunks(random_lmdiff, tokens, mask, [5, 3, 7, 1])
    assert (cached - fast.logits)[valid].abs().max().item() <= 1e-4
    layers, heads = TINY["num_hidden_layers"], TINY["num_attention_heads"]
    assert len(eager.attentions) == layers and eager.attentions[0].shape == (3, heads, 16, 16)
    # Recompute layer 1's maps from its input: A1 − λ·A2, causal, padding keys unattended.
    captured = {}
    attn = random_lmdiff.model.layers[1].self_attn
    hook = attn.register_forward_pre_hook(lambda module, args: captured.update(hidden=args[0], rope=args[1]))
    random_lmdiff(tokens, attention_mask=mask)
    hook.remove()
    head_dim, groups = attn.head_dim, attn.num_key_value_groups

    def heads_of(proj):
        x = proj(captured["hidden"]).view(3, 16, -1, head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in captured["rope"])
        return x * cos + modeling_lmdiff.rotate_half(x) * sin

    allowed = torch.ones(16, 16).tril().bool()[None, None] & mask.bool()[:, None, None, :]
    allowed |= torch.eye(16, dtype=torch.bool)[None, None]

    def softmax_map(q_proj, k_proj):
        scores = heads_of(q_proj) @ heads_of(k_proj).repeat_interleave(groups, dim=1).transpose(-1, -2)
        return (scores * attn.scaling).masked_fill(~allowed, float("-inf")).softmax(-1)

    expected = softmax_map(attn.q_proj, attn.k_proj) - attn.diff_lambda() * softmax_map(attn.q2_proj, attn.k2_proj)
    assert (eager.attentions[1] - expected).abs().max().item() <= 1e-5
    assert eager.attentions[1][~allowed.expand_as(expected)].abs().max().item() == 0.0


def test_attention_maps_keep_their_gradient(random_lmdiff):
    random_lmdiff.set_attn_implementation("eager")
    tokens, mask = padded_batch()
    out = random_lmdiff(tokens, attention_mask=mask, output_attentions=True)
    out.attentions[0].retain_grad()
    out.logits.sum().backward()
    assert out.attentions[0].grad is not None and out.attentions[0].grad.abs().sum() > 0


@torch.no_grad()
def test_a_causal_lm_checkpoint_loads_as_a_sequence_classifier_scoring_the_last_real_token(random_lmdiff, tmp_path):
    """As Llama's: reward models and classifiers start from the LM's backbone and score its last non-padding token."""
    random_lmdiff.save_pretrained(tmp_path)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3).eval()
    assert type(classifier).__name__ == "LmDiffForSequenceClassification"
    tokens, mask = padded_batch()
    tokens[0, -2:], mask[0, -2:] = TINY["pad_token_id"], 0  # right padding too: the score is at the last real token
    logits = classifier(tokens, attention_mask=mask).logits
    hidden = random_lmdiff.model(tokens, attention_mask=mask).last_hidden_state
    last = torch.tensor([tokens.shape[1] - 3, tokens.shape[1] - 1, tokens.shape[1] - 1])
    torch.testing.assert_close(logits, classifier.score(hidden[torch.arange(3), last]))


@torch.no_grad()
def test_the_cache_stacks_both_branches_on_the_head_axis(random_lmdiff):
    """README "Cache": keys [B, 2·kv_heads, T, d] = [k1; k2], values [v; v], so that whatever reorders, selects or
    offloads keys and values moves both branches together."""
    tokens, mask = padded_batch()
    cache = random_lmdiff(tokens, attention_mask=mask, use_cache=True).cache
    kv_heads, head_dim = TINY["num_key_value_heads"], TINY["hidden_size"] // TINY["num_attention_heads"]
    layer = cache.layers[0]
    assert layer.keys.shape == layer.values.shape == (3, 2 * kv_heads, tokens.shape[1], head_dim)
    first, second = layer.values.chunk(2, dim=1)
    assert torch.equal(first, second)
    attn = random_lmdiff.model.layers[0].self_attn
    assert not torch.equal(*layer.keys.chunk(2, dim=1))  # k1 and k2 differ (random q2/k2 weights)
    assert attn.k2_proj.weight.shape[0] == kv_heads * head_dim
