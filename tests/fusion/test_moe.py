"""The MoE layer: sparse compute (counted), equality with the dense reference formula, load balancing."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import fusion
from fusion.moe import GroupedExperts, MoE


def make_moe(num_experts=8, top_k=1, dim=32, hidden=24, seed=0, **kw):
    torch.manual_seed(seed)
    config = fusion.DecoderConfig(vocab_size=10, hidden_size=dim, intermediate_size=hidden, num_experts=num_experts,
                                  top_k=top_k, num_heads=4, num_kv_heads=2, head_dim=8, **kw)
    moe = MoE(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


def dense_reference(moe: MoE, x):
    """The Meta/HF formula: every expert on every token, inputs scaled by sigmoid(top-k logits), 0 elsewhere."""
    logits = moe.router(x)
    top = torch.topk(logits, moe.top_k, dim=-1)
    scores = torch.full_like(logits, float("-inf")).scatter(1, top.indices, top.values).sigmoid()  # [N, E]
    out = moe.shared_expert(x)
    for e in range(moe.num_experts):
        xe = x * scores[:, e:e + 1]
        gate, up = (xe @ moe.experts.gate_up_proj[e]).chunk(2, dim=-1)
        out = out + (F.silu(gate) * up) @ moe.experts.down_proj[e]
    return out


@pytest.mark.parametrize("num_experts,top_k", [(8, 1), (8, 2), (1, 1)])  # one expert takes a path with no sort
def test_matches_dense_reference(num_experts, top_k):
    moe = make_moe(num_experts=num_experts, top_k=top_k)
    x = torch.randn(50, 32, requires_grad=True)
    ours, reference = moe(x), dense_reference(moe, x)
    assert (ours - reference).abs().max().item() <= 1e-5
    grad_out = torch.randn_like(ours)
    params = [x, moe.router.weight, moe.experts.gate_up_proj, moe.experts.down_proj]
    for g, g_ref in zip(torch.autograd.grad(ours, params, grad_out), torch.autograd.grad(reference, params, grad_out)):
        assert (g - g_ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("top_k", [1, 2])
def test_no_expert_computes_on_tokens_not_routed_to_it(top_k, monkeypatch):
    moe = make_moe(num_experts=8, top_k=top_k)
    x = torch.randn(64, 32)
    seen = {}
    real_loop = GroupedExperts._forward_loop

    def spy(self, x_sorted, counts):
        for e, rows in enumerate(x_sorted.split(counts.tolist())):
            seen[e] = rows.shape[0]
        return real_loop(self, x_sorted, counts)

    monkeypatch.setattr(GroupedExperts, "_forward_loop", spy)
    with FlopCounterMode(display=False) as counter:
        moe(x)
    chosen = moe.last_chosen
    for e in range(8):  # each expert saw exactly the tokens routed to it
        assert seen[e] == int((chosen == e).sum())
    assert sum(seen.values()) == 64 * top_k
    assert moe.last_counts.tolist() == [seen[e] for e in range(8)]
    # and the matmul FLOPs are the sparse ones: router + shared expert + k experts per token, nothing more
    N, D, F_ = 64, 32, 24
    expected = 2 * N * D * 8 + 2 * N * 3 * D * F_ + top_k * 2 * N * 3 * D * F_
    assert counter.get_total_flops() == expected


def test_grouped_matmul_path_equals_loop():
    """The torch._grouped_mm path (used on SM90 GPUs; it also runs on CPU) gives the loop's result and gradients
    (its own backward, by grouped matmuls; an expert with no rows gets a zero gradient)."""
    experts = make_moe(num_experts=5).experts
    counts = torch.tensor([7, 0, 19, 1, 13])
    x = torch.randn(int(counts.sum()), 32)
    weight = torch.randn(x.shape)  # (a loss whose gradient differs per row)
    results = []
    for forward in (experts._forward_loop, experts._forward_grouped_mm):
        experts.zero_grad()
        rows = x.clone().requires_grad_()
        try:
            out = forward(rows, counts)
        except RuntimeError as err:  # builds without a CPU _grouped_mm
            pytest.skip(f"torch._grouped_mm is not available on this CPU build: {err}")
        (out * weight).sum().backward()
        results.append((out.detach(), rows.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()))
    for loop, grouped in zip(*results):
        torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)
    assert not results[1][2][1].any() and not results[1][3][1].any()  # expert 1 has no rows
    flops = []
    for forward in (experts._forward_loop, experts._forward_grouped_mm):  # the FLOPs of the real rows, both ways
        with FlopCounterMode(display=False) as counter:
            forward(x.clone().requires_grad_(), counts).sum().backward()
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] > 0


def test_bf16_autocast_over_float32_weights_takes_the_grouped_matmul_path(monkeypatch):
    """Training runs bf16 autocast over float32 weights: the experts then compute in bf16, so a GPU with grouped
    matmuls (SM90+) takes that path (it was asked about the float32 input and always fell back to the loop);
    the grouped path under autocast gives the loop's forward and gradients (bf16 rounding)."""
    import fusion.moe

    moe = make_moe(num_experts=4)
    x = torch.randn(40, 32)
    asked = []
    monkeypatch.setattr(fusion.moe, "_grouped_mm_available", lambda device, dtype: asked.append(dtype) or False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moe(x)
    moe(x)
    assert asked == [torch.bfloat16, torch.float32]
    results = {}
    for grouped in (False, True):  # (CPU builds with a bf16 torch._grouped_mm run that path here)
        monkeypatch.setattr(fusion.moe, "_grouped_mm_available", lambda device, dtype, grouped=grouped: grouped)
        moe.zero_grad()
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = moe(x)
            out.float().square().sum().backward()
        except RuntimeError as err:  # builds without a CPU _grouped_mm
            pytest.skip(f"torch._grouped_mm is not available on this CPU build: {err}")
        results[grouped] = (out.float(), moe.experts.gate_up_proj.grad.clone(), moe.experts.down_proj.grad.clone())
    for loop, grouped in zip(results[False], results[True]):
        assert torch.allclose(grouped, loop, rtol=2e-2, atol=2e-2 * loop.abs().max().item())


def test_expert_bias_moves_selection_not_gate_values():
    moe = make_moe(num_experts=4)
    x = torch.randn(40, 32)
    with torch.no_grad():
        moe.expert_bias[2] = 10.0
        chosen, gates, scores = moe.route(x)
    assert (chosen == 2).all()
    assert torch.allclose(gates[:, 0], torch.sigmoid(moe.router(x))[:, 2].detach())


def test_bias_update_from_token_counts():
    moe = make_moe(num_experts=4, load_balance_coeff=0.01).train()
    moe.tokens_per_expert.copy_(torch.tensor([30.0, 10.0, 0.0, 0.0]))
    moe.update_expert_bias()
    bias = moe.expert_bias
    assert bias[0] < 0 and bias[1] < 0 and bias[2] > 0 and bias[3] > 0  # over-used down, under-used up
    assert abs(bias.sum().item()) < 1e-7
    assert moe.tokens_per_expert.sum() == 0  # counts restart after each update
    x = torch.randn(20, 32)
    moe(x)
    assert moe.tokens_per_expert.sum() == 20  # counted again during training forwards
    with torch.no_grad():  # e.g. generating with a model left in train mode: not a training forward
        moe(x)
    assert moe.tokens_per_expert.sum() == 20 and moe.aux_loss is None


def test_aux_loss_is_optional_and_trains_the_router():
    moe = make_moe(num_experts=4, aux_loss_coef=0.01).train()
    moe(torch.randn(30, 32))
    assert moe.aux_loss is not None and moe.aux_loss.item() > 0
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    off = make_moe(num_experts=4).train()
    off(torch.randn(30, 32))
    assert off.aux_loss is None
    with torch.no_grad():  # a forward that cannot train (generating in train mode): no loss to add
        moe(torch.randn(30, 32))
    assert moe.aux_loss is None


def test_decoder_reports_tokens_per_expert_and_aux_loss():
    torch.manual_seed(0)
    config = fusion.DecoderConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                  head_dim=8, intermediate_size=16, num_experts=4, top_k=2, aux_loss_coef=0.1,
                                  interleave_moe_layer_step=2)
    model = fusion.Decoder(config).train()
    x = torch.randint(0, 50, (3, 7))
    out = model(x, labels=x)
    counts = model.tokens_per_expert()
    assert len(counts) == 1 and int(counts[0].sum()) == 3 * 7 * 2
    assert out.aux_loss is not None and out.loss > out.aux_loss


def test_expert_backward_is_exact():
    """The hand-written expert backward (buffers, no autograd) passes gradcheck, empty experts included."""
    from fusion.moe import looped_experts

    torch.manual_seed(0)
    x = torch.randn(9, 6, dtype=torch.double, requires_grad=True)
    gate_up = torch.randn(4, 6, 10, dtype=torch.double, requires_grad=True)
    down = torch.randn(4, 5, 6, dtype=torch.double, requires_grad=True)
    counts = torch.tensor([3, 0, 6, 0])
    assert torch.autograd.gradcheck(lambda a, b, c: looped_experts(a, b, c, counts)[0], (x, gate_up, down))


def test_the_experts_loop_is_a_well_formed_custom_op():
    """torch.library's own checks of the experts' loop as torch.compile sees it: its schema, its shapes without
    data (the fake kernel dynamo and AOTAutograd trace), and the gradients its registered backward gives."""
    from fusion.moe import looped_experts

    torch.manual_seed(0)
    x = torch.randn(9, 6, requires_grad=True)
    gate_up = torch.randn(4, 6, 10, requires_grad=True)
    down = torch.randn(4, 5, 6, requires_grad=True)
    torch.library.opcheck(looped_experts, (x, gate_up, down, torch.tensor([3, 0, 6, 0])))


def test_flop_counting_sees_the_experts_matmuls_forward_and_backward():
    """FlopCounterMode cannot look inside the experts' custom op; its registered formulas count the matmuls
    of the rows each expert computes: 3 of [M, D] x [D, F] forward, 6 backward."""
    from fusion.moe import looped_experts

    x = torch.randn(11, 6, requires_grad=True)
    gate_up, down = torch.randn(4, 6, 10, requires_grad=True), torch.randn(4, 5, 6, requires_grad=True)
    with FlopCounterMode(display=False) as forward:
        out, _ = looped_experts(x, gate_up, down, torch.tensor([3, 0, 6, 2]))
    with FlopCounterMode(display=False) as backward:
        out.sum().backward()
    assert forward.get_total_flops() == 3 * 2 * 11 * 6 * 5
    assert backward.get_total_flops() == 6 * 2 * 11 * 6 * 5


def test_experts_under_bfloat16_autocast():
    moe = make_moe(num_experts=4)
    x = torch.randn(20, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    y.float().sum().backward()
    assert moe.experts.gate_up_proj.grad.dtype == torch.float32
    reference = dense_reference(moe, x)
    assert (y.float() - reference).abs().max().item() < 0.03 * reference.abs().max().item()  # bf16 rounding


def test_balancing_state_stays_float32_in_a_bf16_model():
    """A model cast to bf16 (from_pretrained(dtype=torch.bfloat16), then trained in a user's own loop) keeps
    exact token counts and a float32 bias: in bf16 a count of 1603 would read 1600 and the bias's small
    steps would round away."""
    moe = make_moe(num_experts=4).to(torch.bfloat16).train()
    assert moe.router.weight.dtype == torch.bfloat16
    assert moe.expert_bias.dtype == moe.tokens_per_expert.dtype == torch.float32
    counted = torch.zeros(4, dtype=torch.long)
    for seed in range(20):
        moe(torch.randn(300, 32, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16))
        counted += moe.last_counts
    assert torch.equal(moe.tokens_per_expert, counted.float())
    moe.update_expert_bias()
    assert moe.expert_bias.dtype == torch.float32 and moe.expert_bias.abs().sum() > 0


def test_padding_does_not_count_for_the_balance_unless_asked():
    """Right-padded training batches: padding is routed (all of it tends to one expert) but the bias counts
    and the aux loss see real tokens only, the same as the batch without padding; `count_padding` (the
    recipe's `moe_count_padding: true`) counts every routed token, as before 2026-12."""
    torch.manual_seed(0)
    config = fusion.DecoderConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                  head_dim=8, intermediate_size=16, num_experts=4, top_k=1, aux_loss_coef=0.1,
                                  interleave_moe_layer_step=2)
    model = fusion.Decoder(config).train()
    moe = model.moe_layers()[0]
    ids = torch.randint(1, 50, (1, 6))
    model(ids)
    alone, alone_aux = moe.tokens_per_expert.clone(), moe.aux_loss.detach()
    moe.tokens_per_expert.zero_()
    padded = torch.cat([ids, torch.zeros(1, 10, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 10)], 1).long()
    model(padded, attention_mask=mask)
    assert torch.equal(moe.tokens_per_expert, alone) and int(moe.last_counts.sum()) == 16
    assert torch.allclose(moe.aux_loss, alone_aux)
    moe.tokens_per_expert.zero_()
    moe.count_padding = True
    model(padded, attention_mask=mask)
    assert int(moe.tokens_per_expert.sum()) == 16
    model.uncount_last_forward()
    assert int(moe.tokens_per_expert.sum()) == 0


def test_large_router_logits_choose_as_the_reference_does():
    """Router logits above ~17 all have a float32 sigmoid of exactly 1; the choice must still follow the
    logits (as Meta's and Hugging Face's Llama 4 choose), not tie-break by expert index."""
    moe = make_moe(num_experts=8, top_k=1)
    with torch.no_grad():
        moe.router.weight.mul_(6.0)  # logits in the tens
    x = torch.randn(400, 32)
    x = x[moe.router(x).max(-1).values < 35]  # float64 keeps the ranking up to ~36
    logits = moe.router(x)
    assert ((torch.sigmoid(logits.float()) == 1).sum(-1) >= 2).sum() >= 10  # float32 ties in many rows
    chosen, _, _ = moe.route(x)
    assert torch.equal(chosen[:, 0], logits.argmax(-1))
    assert torch.allclose(moe(x), dense_reference(moe, x), atol=1e-3)


def test_balance_loss_is_one_when_balanced_and_grows_when_one_expert_takes_every_token():
    """The Switch balance loss E * sum_e f_e * p_e with routing set by hand (4 experts, top-1): the token
    along axis e has router logit ln 3 (sigmoid 0.75) for expert e and 0 (sigmoid 0.5) for the others, so it
    goes to e with normalised scores 1/3 for e and 2/9 for each other expert. Spread evenly over the experts:
    f_e = p_e = 1/4, loss 4 * 4 * 1/16 = 1; every token along axis 0: f = (1, 0, 0, 0), p_0 = 1/3, loss 4/3."""
    import math

    moe = make_moe(num_experts=4, top_k=1, aux_loss_coef=0.01).train()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :4] = math.log(3) * torch.eye(4)
    axes = torch.eye(32)[:4]
    moe(axes.repeat(5, 1))  # 5 tokens per expert
    assert moe.last_counts.tolist() == [5, 5, 5, 5]
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    moe(axes[:1].repeat(20, 1))  # all 20 tokens to expert 0
    assert moe.last_counts.tolist() == [20, 0, 0, 0]
    assert moe.aux_loss.item() == pytest.approx(4 / 3, abs=1e-6)
