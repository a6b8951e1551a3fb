"""`compile: true`'s decoder blocks under dynamo: each one whole graph, eager results."""
import pytest
import torch

import fusion
from fusion.compilation import compile_decoder_blocks
from fusion.distributed import DistContext, apply_fsdp2


@pytest.fixture
def traced_only(monkeypatch):
    """Blocks compiled as `compile_decoder_blocks` compiles them (dynamic shapes), through dynamo's "eager"
    backend: the graphs dynamo captures and where it breaks them are those inductor would get, without the
    minutes inductor takes to build kernels on a small CPU."""
    import torch._dynamo

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compile_module(self, backend="eager", **kwargs))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


@pytest.mark.parametrize("sharded", [False, True], ids=["one-process", "fsdp2"])
@pytest.mark.parametrize("experts, grouped_mm", [(0, False), (4, False), (4, True)],
                         ids=["dense", "moe", "moe-grouped-mm"])
def test_decoder_blocks_compile_whole_and_train_as_eager(traced_only, tmp_path, monkeypatch, experts, grouped_mm,
                                                         sharded):
    """A block (RoPE and chunked, or NoPE and full; dense, or MoE with 4 experts) with fewer K/V heads than query
    heads is one graph, also compiled then sharded by FSDP2 as the trainer does, and its losses, gradients and
    experts' token counts are the eager blocks'. No break at attention (dynamo reads a sharded block's whole
    numbers as symbolic ones, which once made the grouped-query flag a symbolic bool that
    scaled_dot_product_attention refuses), nor at routing (the tokens per expert were once counted by bincount,
    whose size depends on the data, and the experts' loop read them as Python numbers: it is a custom op now).
    The same with the experts as grouped matmuls (`torch._grouped_mm`, taken on SM90+ GPUs; forced here, on a
    CPU, where torch builds have it): their padded layout's size comes from the data, so they are a custom op too.
    """
    import torch.distributed as dist

    from fusion import moe

    if grouped_mm:
        if not hasattr(torch, "_grouped_mm"):
            pytest.skip("this torch has no torch._grouped_mm")
        monkeypatch.setattr(moe, "_grouped_mm_available", lambda device, dtype: True)

    config = fusion.DecoderConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                  head_dim=8, intermediate_size=24, intermediate_size_mlp=48, num_experts=experts,
                                  interleave_moe_layer_step=1, attention_chunk_size=8, nope_interval=2)
    torch.manual_seed(0)
    eager, compiled = fusion.Decoder(config).train(), fusion.Decoder(config).train()
    compiled.load_state_dict(eager.state_dict())
    assert compile_decoder_blocks(compiled) == 2
    if sharded:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        apply_fsdp2(compiled, list(compiled.layers), DistContext())
    try:
        for length in (12, 19):  # a second length reuses the dynamic-shape graph
            tokens = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(length))
            losses = []
            for model in (eager, compiled):
                model.zero_grad()
                loss = model(tokens, labels=tokens).loss
                loss.backward()
                losses.append(loss.item())
            assert losses[1] == pytest.approx(losses[0], rel=1e-5)
            for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
                grad = q.grad.full_tensor() if sharded else q.grad
                torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        counts = [[c.tolist() for c in model.tokens_per_expert()] for model in (eager, compiled)]
        assert counts[1] == counts[0] and len(counts[0]) == (2 if experts else 0)
        balance = [[b.tolist() for name, b in model.named_buffers() if name.endswith(".tokens_per_expert")]
                   for model in (eager, compiled)]  # what the balancing has counted over both forwards
        assert balance[1] == balance[0]
    finally:
        if sharded:
            dist.destroy_process_group()
    assert dict(traced_only["graph_break"]) == {}
    assert traced_only["stats"]["unique_graphs"] == 2  # one per kind of block, for every length
