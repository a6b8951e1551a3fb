"""fusion.Decoder against transformers' Llama4ForCausalLM: same weights, same logits (float32, <= 1e-4).

Sequences are longer than the attention chunk and run past the temperature threshold (small
`attention_chunk_size` and `floor_scale`), so chunking, NoPE layers and temperature tuning are all
exercised. Both directions: HF folder -> fusion, and fusion -> HF folder -> transformers.
"""
import inspect
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import fusion
import fusion.hf_llama4
from fusion.errors import CheckpointError

transformers = pytest.importorskip("transformers")
from transformers import Llama4ForCausalLM, Llama4TextConfig  # noqa: E402

SEQ = 24  # > 2 chunks of 8; temperature scale > 1 from position 3 on (floor_scale 4)
ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
        "original_max_position_embeddings": 16}


def hf_config(moe_step=1, qk_norm=True, top_k=1, layers=4):
    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=32, intermediate_size_mlp=48,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  num_local_experts=4, num_experts_per_tok=top_k, interleave_moe_layer_step=moe_step,
                  use_qk_norm=qk_norm, attention_chunk_size=8, floor_scale=4, attn_scale=0.5,
                  attn_temperature_tuning=True, no_rope_layer_interval=4, max_position_embeddings=256,
                  initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if "rope_parameters" in inspect.signature(Llama4TextConfig.__init__).parameters or \
            hasattr(Llama4TextConfig, "rope_parameters"):
        kwargs["rope_parameters"] = {"rope_theta": 10000.0, **ROPE}
    else:  # transformers 4.5x
        kwargs.update(rope_theta=10000.0, rope_scaling=ROPE)
    config = Llama4TextConfig(**kwargs)
    config._attn_implementation = "sdpa"
    return config


def randomize_(model, seed=0):
    """Give every weight (norms included) a distinct random value, so any mapping mistake shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm weights
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def make_hf(tmp_path, **kw):
    torch.manual_seed(0)
    model = randomize_(Llama4ForCausalLM(hf_config(**kw)).eval())
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def tokens(seed=1, batch=2):
    return torch.randint(3, 128, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


CASES = [dict(moe_step=1, qk_norm=True, top_k=1), dict(moe_step=2, qk_norm=True, top_k=1),
         dict(moe_step=1, qk_norm=False, top_k=2), dict(moe_step=2, qk_norm=False, top_k=2),
         dict(moe_step=1, qk_norm=True, top_k=2), dict(moe_step=2, qk_norm=False, top_k=1)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "step{moe_step}-qk{qk_norm}-top{top_k}".format(**c))
def test_from_hf_matches_transformers(tmp_path, case):
    hf = make_hf(tmp_path, **case)
    ours = fusion.Decoder.from_hf(tmp_path).eval()
    assert ours.config.interleave_moe_layer_step == case["moe_step"]
    assert ours.config.is_nope_layer(3) and not ours.config.is_nope_layer(2)
    ids = tokens()
    with torch.no_grad():
        diff = (ours(ids).logits - hf_logits(hf, ids)).abs().max().item()
    assert diff <= 1e-4, f"max |logit difference| {diff}"


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: "step{moe_step}-qk{qk_norm}-top{top_k}".format(**c))
def test_save_hf_loads_in_transformers(tmp_path, case):
    torch.manual_seed(0)
    config = fusion.hf_llama4.decoder_config_from_hf(hf_config(**case).to_dict())
    ours = randomize_(fusion.Decoder(config).eval(), seed=3)
    ours.save_hf(tmp_path)
    hf = Llama4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = tokens(seed=2)
    with torch.no_grad():
        diff = (ours(ids).logits - hf_logits(hf, ids)).abs().max().item()
    assert diff <= 1e-4, f"max |logit difference| {diff}"


def _rewrite_config(folder, edit):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps(edit(cfg)))


def test_transformers_4_5x_config_layout(tmp_path):
    """Released Llama 4 checkpoints carry `rope_theta` + `rope_scaling` (transformers 4.5x), not `rope_parameters`."""
    hf = make_hf(tmp_path)

    def to_4_5x(cfg):
        params = cfg.pop("rope_parameters", None)
        if params is not None:
            cfg["rope_theta"] = params.pop("rope_theta")
            cfg["rope_scaling"] = params
        cfg.pop("layer_types", None)
        return cfg

    _rewrite_config(tmp_path, to_4_5x)
    assert "rope_scaling" in json.loads((tmp_path / "config.json").read_text())
    ours = fusion.Decoder.from_hf(tmp_path).eval()
    assert ours.config.rope_scaling.factor == 4.0 and ours.config.rope_theta == 10000.0
    ids = tokens()
    with torch.no_grad():
        assert (ours(ids).logits - hf_logits(hf, ids)).abs().max().item() <= 1e-4


def test_conditional_generation_sharded_layout(tmp_path):
    """The `language_model` of a Llama4ForConditionalGeneration folder, sharded, with vision weights beside it."""
    hf = make_hf(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    renamed = {("language_model." + k): v for k, v in state.items()}
    renamed["vision_model.class_embedding"] = torch.zeros(8)  # ignored by the text decoder
    names = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: renamed[k].contiguous() for k in keys}, tmp_path / shard)
        weight_map.update({k: shard for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _rewrite_config(tmp_path, lambda cfg: {"architectures": ["Llama4ForConditionalGeneration"],
                                           "model_type": "llama4", "text_config": cfg})
    ours = fusion.Decoder.from_hf(tmp_path).eval()
    ids = tokens()
    with torch.no_grad():
        assert (ours(ids).logits - hf_logits(hf, ids)).abs().max().item() <= 1e-4


def _edit_weights(folder, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def test_missing_weights_are_named(tmp_path):
    make_hf(tmp_path)
    _edit_weights(tmp_path, lambda state: state.pop("model.layers.1.self_attn.q_proj.weight"))
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.q_proj.weight"):
        fusion.Decoder.from_hf(tmp_path)


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    make_hf(tmp_path)
    key = "model.layers.1.self_attn.q_proj.weight"
    _edit_weights(tmp_path, lambda state: state.update({key: state[key][:1]}))  # a plain copy would broadcast it
    with pytest.raises(CheckpointError, match=r"q_proj.weight has shape \(1, .*config.json gives"):
        fusion.Decoder.from_hf(tmp_path)


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        fusion.Decoder.from_hf(tmp_path)


def test_save_hf_warns_about_expert_bias(tmp_path):
    config = fusion.hf_llama4.decoder_config_from_hf(hf_config().to_dict())
    ours = fusion.Decoder(config)
    ours.moe_layers()[0].expert_bias[0] = 0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours.save_hf(tmp_path)
    assert any("bias" in str(w.message) for w in caught)


def test_tied_embeddings_use_the_embedding_as_head(tmp_path):
    """`tie_word_embeddings=True` folders have no `lm_head.weight`: the head is the embedding."""
    torch.manual_seed(0)
    config = hf_config()
    config.tie_word_embeddings = True
    hf = randomize_(Llama4ForCausalLM(config).eval())
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    ours = fusion.Decoder.from_hf(tmp_path).eval()
    ids = tokens()
    with torch.no_grad():
        assert (ours(ids).logits - hf_logits(hf, ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("where", ["top", "text_config"])
def test_quantization_config_is_refused(tmp_path, where):
    make_hf(tmp_path)
    quant = {"quant_method": "fbgemm_fp8"}
    if where == "top":
        _rewrite_config(tmp_path, lambda cfg: {**cfg, "quantization_config": quant})
    else:
        _rewrite_config(tmp_path, lambda cfg: {"model_type": "llama4",
                                               "text_config": {**cfg, "quantization_config": quant}})
    with pytest.raises(CheckpointError, match="quantized checkpoints are not supported.*bf16"):
        fusion.Decoder.from_hf(tmp_path)


def test_float8_weights_are_refused(tmp_path):
    """A float8 tensor must not be silently cast to the model dtype (its scale would be lost)."""
    make_hf(tmp_path)
    key = "model.layers.0.feed_forward.experts.gate_up_proj"
    _edit_weights(tmp_path, lambda state: state.update({key: state[key].to(torch.float8_e4m3fn)}))
    with pytest.raises(CheckpointError, match=f"{key}.*float8.*quantized checkpoints are not supported"):
        fusion.Decoder.from_hf(tmp_path)


def test_save_hf_replaces_a_sharded_checkpoint(tmp_path):
    """Saving over a transformers sharded folder: the stale index and its shards go, the new weights load."""
    torch.manual_seed(0)
    old = randomize_(Llama4ForCausalLM(hf_config()).eval())
    old.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    index = tmp_path / "model.safetensors.index.json"
    shards = set(json.loads(index.read_text())["weight_map"].values())
    assert len(shards) > 1
    (tmp_path / "notes.safetensors").write_text("not listed in the index")
    config = fusion.hf_llama4.decoder_config_from_hf(hf_config().to_dict())
    new = randomize_(fusion.Decoder(config).eval(), seed=5)
    new.save_hf(tmp_path)
    assert not index.exists() and not any((tmp_path / s).exists() for s in shards)
    assert (tmp_path / "notes.safetensors").exists()  # only the index's own shards are removed
    back = fusion.Decoder.from_hf(tmp_path).eval()
    ids = tokens()
    with torch.no_grad():
        assert (back(ids).logits - new(ids).logits).abs().max().item() <= 1e-5


def test_single_file_is_preferred_over_an_index(tmp_path):
    """As in transformers: when both exist, `model.safetensors` is read, not the index's shards."""
    hf = make_hf(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: torch.zeros_like(v) for k, v in state.items()}, tmp_path / "stale.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "stale.safetensors" for k in state}}))
    ours = fusion.Decoder.from_hf(tmp_path).eval()
    ids = tokens()
    with torch.no_grad():
        assert (ours(ids).logits - hf_logits(hf, ids)).abs().max().item() <= 1e-4


def test_other_model_type_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*'llama'.*llama4"):
        fusion.Decoder.from_hf(tmp_path)


def test_missing_config_key_is_named(tmp_path):
    make_hf(tmp_path)

    def drop_hidden_size(cfg):
        del cfg["hidden_size"]
        return cfg

    _rewrite_config(tmp_path, drop_hidden_size)
    with pytest.raises(CheckpointError, match="config.json.*'hidden_size'"):
        fusion.Decoder.from_hf(tmp_path)


def test_save_hf_refuses_fractional_floor_scale(tmp_path):
    """transformers' Llama4TextConfig takes an integer floor_scale; 5.x refuses a folder with 4.5."""
    config = fusion.hf_llama4.decoder_config_from_hf(hf_config().to_dict())
    config.floor_scale = 4.5
    with pytest.raises(CheckpointError, match="floor_scale 4.5"):
        fusion.Decoder(config).save_hf(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_a_config_without_attention_chunk_size_chunks_as_transformers_does(tmp_path):
    """transformers reads a missing attention_chunk_size as 8192 (chunked RoPE layers); so does from_hf,
    while an explicit null means no chunking."""
    make_hf(tmp_path)

    def drop_chunk(cfg):
        cfg.pop("attention_chunk_size", None)
        (cfg.get("text_config") or {}).pop("attention_chunk_size", None)
        return cfg

    _rewrite_config(tmp_path, drop_chunk)
    assert fusion.Decoder.from_hf(tmp_path).config.attention_chunk_size == Llama4TextConfig().attention_chunk_size
    _rewrite_config(tmp_path, lambda cfg: {**cfg, "attention_chunk_size": None})
    assert fusion.Decoder.from_hf(tmp_path).config.attention_chunk_size is None


def test_the_readme_way_reads_a_checkpoint_into_an_fsdp2_sharded_decoder(tmp_path):
    """The README's script: a decoder built on the meta device, sharded by FSDP2 and filled by
    `open_hf_decoder_weights(...).copy_into` gives the logits of `Decoder.from_hf` (one process, gloo)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import fully_shard

    config = fusion.hf_llama4.decoder_config_from_hf(hf_config().to_dict())
    randomize_(fusion.Decoder(config), seed=3).save_hf(tmp_path / "llama4")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with fusion.hf_llama4.open_hf_decoder_weights(tmp_path / "llama4") as weights:
            with torch.device("meta"):
                decoder = fusion.Decoder(weights.config)
            for layer in decoder.layers:
                fully_shard(layer)
            fully_shard(decoder)
            decoder.to_empty(device="cpu")
            weights.copy_into(decoder)
        decoder.reset_buffers()
        assert all(isinstance(p, DTensor) for p in decoder.parameters())
        whole = fusion.Decoder.from_hf(tmp_path / "llama4").eval()
        ids = tokens(seed=2)
        with torch.no_grad():
            diff = (decoder.eval()(ids).logits - whole(ids).logits).abs().max().item()
        assert diff <= 1e-6, f"max |logit difference| {diff}"
    finally:
        dist.destroy_process_group()
