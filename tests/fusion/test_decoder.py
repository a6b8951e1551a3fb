"""Decoder behaviour: cached decoding, chunked and NoPE attention, RoPE, padding, packing, training."""
import math
import re

import pytest
import torch

import fusion
from fusion.attention import build_attention_mask
from fusion.rope import apply_rope, attention_temperature, rope_angles, rope_inverse_frequencies


def small_config(**overrides):
    base = dict(vocab_size=97, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                intermediate_size=32, intermediate_size_mlp=48, num_experts=4, top_k=1, attention_chunk_size=8,
                floor_scale=4, attn_scale=0.5, nope_interval=4, initializer_range=0.1)
    base.update(overrides)
    return fusion.DecoderConfig(**base)


def make_decoder(seed=0, **overrides):
    torch.manual_seed(seed)
    return fusion.Decoder(small_config(**overrides)).eval()


def ids(batch=2, length=30, seed=1):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- cached decoding -------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt_len", [1, 5, 8, 13, 20])
def test_step_by_step_decoding_equals_full_forward(prompt_len):
    """Prefill, then one token at a time through the cache, across several chunk boundaries (chunk 8)."""
    model = make_decoder()
    x = ids(length=30)
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(batch_size=2, max_length=30)
        steps = [model(x[:, :prompt_len], cache=cache).logits]
        for t in range(prompt_len, 30):
            steps.append(model(x[:, t:t + 1], cache=cache).logits)
    cached = torch.cat(steps, dim=1)
    assert (cached - full).abs().max().item() <= 1e-4


def test_chunked_cache_keeps_only_one_chunk():
    model = make_decoder()
    cache = model.new_cache(batch_size=1, max_length=100)
    assert cache.tables["chunked"].num_slots == 8  # the RoPE layers keep no more than their chunk
    assert cache.tables["full"].num_slots == 100  # NoPE layers keep the whole history
    assert cache.layers[0].k.shape[2] == 8 + 1  # + the write-only trash slot


def test_cache_overflow_is_a_clear_error():
    model = make_decoder()
    cache = model.new_cache(batch_size=1, max_length=4)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache is full"):
        model(ids(batch=1, length=6), cache=cache)


# -- chunked and NoPE attention --------------------------------------------------------------------
def test_chunk_mask_is_aligned_to_absolute_positions():
    pos = torch.arange(12)[None]
    mask = build_attention_mask(pos, pos, chunk_size=4)[0, 0]
    expected = torch.zeros(12, 12, dtype=torch.bool)
    for q in range(12):
        for k in range(12):
            expected[q, k] = k <= q and k // 4 == q // 4
    assert torch.equal(mask, expected)
    # with positions starting at 6 the chunks still start at multiples of 4 (not at the first token)
    pos = torch.arange(6, 14)[None]
    mask = build_attention_mask(pos, pos, chunk_size=4)[0, 0]
    assert mask[1, 0] and not mask[2, 1]  # positions 6,7 share a chunk; 8 starts a new one


def test_rope_layers_do_not_see_past_their_chunk_but_nope_layers_do():
    """Changing token 0 changes the output at position 9 (chunk 1) only through the NoPE layer."""
    x = ids(batch=1, length=12)
    x2 = x.clone()
    x2[0, 0] = (x[0, 0] + 1) % 97
    all_rope = make_decoder(nope_interval=0, num_layers=2)
    with torch.no_grad():
        d = (all_rope(x).logits - all_rope(x2).logits).abs()[0].amax(-1)
    assert d[:8].max() > 1e-3 and d[8:].max() <= 1e-5  # chunked everywhere: nothing leaks into the next chunk
    # (not exactly 0: a different token changes how many rows each expert gets, hence the float rounding)
    with_nope = make_decoder(nope_interval=2, num_layers=2)  # layer 1 is NoPE
    with torch.no_grad():
        d = (with_nope(x).logits - with_nope(x2).logits).abs()[0].amax(-1)
    assert d[8:].min() > 1e-4  # the NoPE layer carries token 0 into later chunks


def test_nope_pattern_matches_reference():
    c = small_config(num_layers=8, nope_interval=4)
    assert [i for i in range(8) if c.is_nope_layer(i)] == [3, 7]
    assert [i for i in range(8) if small_config(num_layers=8, nope_interval=0).is_nope_layer(i)] == []
    assert [i for i in range(8) if small_config(num_layers=8, interleave_moe_layer_step=2).is_moe_layer(i)] == [1, 3, 5, 7]
    model = make_decoder(num_layers=8)
    assert [layer.attention.use_rope for layer in model.layers] == [True, True, True, False] * 2
    assert [layer.attention.use_qk_norm for layer in model.layers] == [True, True, True, False] * 2
    assert [layer.attention.use_temperature for layer in model.layers] == [False, False, False, True] * 2


def test_temperature_formula():
    pos = torch.tensor([[0, 8190, 8191, 2 ** 20 - 1]])
    s = attention_temperature(pos, floor_scale=8192, attn_scale=0.1)[0]
    assert s[0] == 1 and s[1] == 1
    assert s[2].item() == pytest.approx(1 + 0.1 * math.log(2))
    assert s[3].item() == pytest.approx(1 + 0.1 * math.log(129))


def test_rope_rotates_interleaved_pairs():
    inv_freq = rope_inverse_frequencies(4, theta=100.0)
    x = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 1, 4)
    cos, sin = rope_angles(torch.tensor([[3]]), inv_freq)
    out = apply_rope(x, cos, sin).flatten()
    a0, a1 = 3 * inv_freq[0], 3 * inv_freq[1]
    # pair (x0, x1) = (1, 0) rotates to (cos a0, sin a0); pair (x2, x3) = (0, 1) to (-sin a1, cos a1)
    expected = torch.tensor([math.cos(a0), math.sin(a0), -math.sin(a1), math.cos(a1)])
    assert torch.allclose(out, expected, atol=1e-6)


def test_llama3_scaling_divides_only_long_wavelengths():
    from fusion.decoder_config import RopeScaling

    plain = rope_inverse_frequencies(128, 5e5)
    scaled = rope_inverse_frequencies(128, 5e5, RopeScaling(16, 1, 1, 8192))
    long_wave = 2 * math.pi / plain > 8192
    assert torch.allclose(scaled[long_wave], plain[long_wave] / 16)
    assert torch.equal(scaled[~long_wave], plain[~long_wave])
    assert 0 < long_wave.sum() < 64


# -- padding, positions, packing -------------------------------------------------------------------
def test_left_padding_gives_each_sample_its_own_positions():
    model = make_decoder()
    a, b = ids(batch=1, length=11, seed=2), ids(batch=1, length=6, seed=3)
    padded = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(padded)
    mask[1, :5] = 0
    with torch.no_grad():
        batch = model(padded, attention_mask=mask).logits
        alone = model(b).logits
    assert (batch[1, 5:] - alone[0]).abs().max().item() <= 1e-5
    assert (batch[0] - model(a).logits[0]).abs().max().item() <= 1e-5


def test_packed_samples_do_not_see_each_other():
    model = make_decoder()
    a, b = ids(batch=1, length=10, seed=4), ids(batch=1, length=14, seed=5)
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 10 + [1] * 14])
    positions = torch.cat([torch.arange(10), torch.arange(14)])[None]
    with torch.no_grad():
        out = model(packed, segment_ids=segments, positions=positions).logits
        assert (out[0, :10] - model(a).logits[0]).abs().max().item() <= 1e-5
        assert (out[0, 10:] - model(b).logits[0]).abs().max().item() <= 1e-5
        # without positions, they restart at each segment (they counted on across the row: b saw other
        # chunks and temperatures than alone); a row's padding (segment -1) after them changes nothing
        padded = torch.cat([packed, torch.zeros(1, 3, dtype=torch.long)], dim=1)
        default = model(padded, segment_ids=torch.cat([segments, torch.full((1, 3), -1)], dim=1),
                        attention_mask=torch.tensor([[1] * 24 + [0] * 3])).logits
        assert (default[0, :24] - out[0]).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="branch_ids need their positions"):
        model(packed, branch_ids=torch.zeros_like(packed))


def test_loss_ignores_masked_labels():
    model = make_decoder()
    x = ids(batch=2, length=12)
    labels = x.clone()
    labels[:, :6] = -100
    out = model(x, labels=labels)
    logits = out.logits[:, :-1]
    manual = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 97), x[:, 6:].reshape(-1))
    assert out.loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_logits_at_computes_the_marked_positions_only_with_the_same_loss_and_gradients():
    """Training asks for the logits of the supervised positions only: the same numbers as the full
    logits there, the same loss, the same gradients; and it cannot be mixed with logits_to_keep."""
    model = make_decoder().train()
    x = ids(batch=2, length=12)
    labels = x.clone()
    labels[0, :7] = -100
    labels[1, :3] = -100
    labels[1, 9:] = -100  # padding-like tail
    at = fusion.decoder.next_token_targets(labels) != -100
    full = model(x, labels=labels)
    full_grads = torch.autograd.grad(full.loss, list(model.parameters()), allow_unused=True)
    part = model(x, labels=labels, logits_at=at)
    part_grads = torch.autograd.grad(part.loss, list(model.parameters()), allow_unused=True)
    assert part.logits.shape == (int(at.sum()), 97) and int(at.sum()) == 5 + 6
    assert (part.logits - full.logits[at]).abs().max().item() <= 1e-6
    assert part.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)
    for a, b in zip(full_grads, part_grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a - b).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match="at most one of logits_to_keep and logits_at"):
        model(x, logits_to_keep=1, logits_at=at)


def test_input_errors_are_clear():
    model = make_decoder()
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="invalid DecoderConfig: num_heads"):
        small_config(num_heads=5)


@pytest.mark.parametrize("setting, value, says", [
    ("num_kv_heads", 0, "num_kv_heads must be a whole number >= 1, got 0"),  # was a ZeroDivisionError
    ("num_layers", 0, "num_layers must be a whole number >= 1, got 0"),  # built a decoder with no layers
    ("num_heads", 0, "num_heads must be a whole number >= 1"),  # ran, attending to nothing
    ("head_dim", 0, "head_dim must be a whole number >= 1"),
    ("intermediate_size", 0, "intermediate_size must be a whole number >= 1"),
    ("hidden_size", 2.5, "hidden_size must be a whole number >= 1, got 2.5"),  # was torch's "tuple of ints"
    ("num_layers", True, "num_layers must be a whole number >= 1, got True"),
    ("num_experts", -1, "num_experts must be a whole number >= 0, got -1"),
    ("rms_norm_eps", -1e-5, "rms_norm_eps must be a number above 0"),  # gave NaN logits
    ("rope_theta", "1e4", "rope_theta must be a number above 0, got '1e4'"),  # YAML reads 1e4 as a string
    ("floor_scale", 0, "floor_scale must be a number above 0"),
    ("attn_scale", float("nan"), "attn_scale must be a number >= 0"),
    ("attention_chunk_size", 0, "attention_chunk_size must be a whole number >= 1, or None"),
])
def test_a_setting_out_of_its_range_is_named_before_anything_is_built(setting, value, says):
    with pytest.raises(ValueError, match=re.escape(f"invalid DecoderConfig: {says}")):
        small_config(**{setting: value})
    small_config(**{setting: None} if setting == "attention_chunk_size" else {})  # its default and None are fine


def test_training_step_reduces_loss_and_updates_every_part():
    model = make_decoder().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    fusion.attach_load_balancing(opt, model)
    x = ids(batch=4, length=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(15):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
    assert any(m.expert_bias.abs().sum() > 0 for m in model.moe_layers())  # the balancing hook ran


def test_cpu_bf16_attention_is_computed_in_float32():
    """Under CPU bf16 autocast the decoder attends in float32 (faster there) and returns bf16."""
    from fusion.attention import AttentionPlan, attend

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 10, 8) for _ in range(3))
    plan = AttentionPlan(is_causal=True)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), plan, enable_gqa=False)
    assert out.dtype == torch.bfloat16
    upcast = torch.nn.functional.scaled_dot_product_attention(q.bfloat16().float(), k.bfloat16().float(),
                                                              v.bfloat16().float(), is_causal=True)
    assert torch.equal(out, upcast.bfloat16())  # float32 attention of the bf16 inputs, rounded once
    assert torch.allclose(out.float(), exact, atol=0.05)


def test_the_training_loss_adds_the_balance_loss_times_its_coefficient():
    """In training, the loss is the next-token cross-entropy plus `aux_loss_coef` times each MoE layer's Switch
    balance loss E * sum_e f_e * p_e (f: share of the tokens routed to e, p: mean of its normalised sigmoid
    score), computed here by hand from the router's logits."""
    import torch.nn.functional as F

    model = make_decoder(aux_loss_coef=0.25).train()
    router_logits = []
    hooks = [m.router.register_forward_hook(lambda mod, inputs, out: router_logits.append(out.detach().float()))
             for m in model.moe_layers()]
    x = ids(batch=2, length=12)
    out = model(x, labels=x)
    for hook in hooks:
        hook.remove()
    assert len(router_logits) == len(model.moe_layers()) >= 2
    balance = 0.0
    for logits in router_logits:  # [tokens, 4 experts], top-1 routing, no bias yet
        scores = torch.sigmoid(logits)
        fraction = torch.bincount(scores.argmax(-1), minlength=4).float() / scores.shape[0]
        probability = (scores / scores.sum(-1, keepdim=True)).mean(0)
        balance += 4 * float((fraction * probability).sum())
    cross_entropy = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97).float(), x[:, 1:].reshape(-1))
    assert out.aux_loss.item() == pytest.approx(0.25 * balance, rel=1e-5)
    assert out.loss.item() == pytest.approx(cross_entropy.item() + 0.25 * balance, rel=1e-5)
