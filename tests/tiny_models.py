"""The small random models the tests build (imported as `from tests.tiny_models import tiny_fusion_model`)."""
import torch

import fusion
from vision import VisionEncoderConfig


def tiny_fusion_model(tok, seed: int = 0, num_frames: int | None = None, image_position_embedding: bool = False,
                      **decoder) -> fusion.FusionModel:
    """A 2-layer MoE decoder with a 1-layer 32-px vision tower, in eval mode; `decoder` overrides its config."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                    intermediate_size=64, num_experts=4, attention_chunk_size=16, floor_scale=8, nope_interval=2,
                    initializer_range=0.1)
    settings.update(decoder)
    extra = {} if num_frames is None else {"video": fusion.VideoSettings(num_frames=num_frames)}
    config = fusion.FusionConfig(decoder=fusion.DecoderConfig(**settings), **extra,
                                 image_position_embedding=image_position_embedding,
                                 vision=VisionEncoderConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2))
    return fusion.FusionModel(config, tok).eval()


# Llama 4's control tokens in its tokenizer.json, in its order (a few of each group; llama4-reference.md §6), then
# filler tokens: what a Hugging Face Llama 4 checkpoint's tokenizer holds, without fusion's own video markers
LLAMA4_CONTROL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|header_start|>",
    "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>", "<|finetune_right_pad|>", "<|image_start|>", "<|image_end|>",
    "<|tile_x_separator|>", "<|tile_y_separator|>", "<|image|>", "<|patch|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(4)))


def llama4_style_tokenizer(folder, texts, base_vocab_size: int = 300):
    """Write `folder/tokenizer.json` laid out as a Hugging Face Llama 4 checkpoint's (byte-level BPE trained on
    `texts`, then `LLAMA4_CONTROL_TOKENS`, and a post-processor that puts <|begin_of_text|> first); returns
    {token: id} of the control tokens."""
    from pathlib import Path

    from tokenizers import AddedToken, processors

    from tokenizer.bpe import train_byte_level_bpe

    bpe = train_byte_level_bpe(texts, vocab_size=base_vocab_size, min_frequency=2)
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA4_CONTROL_TOKENS])
    bos = bpe.token_to_id("<|begin_of_text|>")
    bpe.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    Path(folder).mkdir(parents=True, exist_ok=True)
    bpe.save(str(Path(folder) / "tokenizer.json"))
    return {t: bpe.token_to_id(t) for t in LLAMA4_CONTROL_TOKENS}


def tiny_llama4_checkpoint(folder, texts, seed: int = 0):
    """A tiny Hugging Face Llama 4 text checkpoint in `folder` (transformers' Llama4ForCausalLM, 2 layers, MoE in
    both, one NoPE) with a `llama4_style_tokenizer` trained on `texts`; returns the tokenizer's control-token ids."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    ids = llama4_style_tokenizer(folder, texts)
    vocab = max(ids.values()) + 1
    config = Llama4TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=32, intermediate_size_mlp=48,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
                              attention_chunk_size=64, floor_scale=64, no_rope_layer_interval=2,
                              max_position_embeddings=512, initializer_range=0.1,
                              pad_token_id=ids["<|finetune_right_pad|>"], bos_token_id=ids["<|begin_of_text|>"],
                              eos_token_id=ids["<|eot|>"])
    torch.manual_seed(seed)
    Llama4ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return ids
