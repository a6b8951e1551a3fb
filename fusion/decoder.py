"""The Llama 4 text decoder: pre-norm blocks of attention and (MoE or dense) SwiGLU, a final RMSNorm
and an untied LM head. Interop with Hugging Face checkpoints lives in `hf_llama4.py`, sampling in
`generation.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import Attention, AttentionPlan, build_attention_mask
from .decoder_config import DecoderConfig
from .kv_cache import DecoderCache
from .moe import MoE, FeedForward
from .rope import attention_temperature, rope_angles, rope_inverse_frequencies

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    """y = (x / rms(x)) computed in float32, cast back to x's dtype, then times the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig, index: int):
        super().__init__()
        self.index = index
        self.is_moe = config.is_moe_layer(index)
        self.kind = "chunked" if config.is_chunked_layer(index) else "full"
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, index)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = MoE(config) if self.is_moe else FeedForward(config.hidden_size,
                                                                        config.intermediate_size_mlp)

    @property
    def counts_real_tokens(self) -> bool:
        """An MoE layer whose balance counts real tokens only (it then needs to know which they are)."""
        return self.is_moe and not self.feed_forward.count_padding

    def forward(self, x, rope, temperature, plan, kv=None, valid=None):
        h = x + self.attention(self.attention_norm(x), rope, temperature, plan, kv)
        if valid is not None:  # `valid`: the real tokens, for the experts' balance
            return h + self.feed_forward(self.ffn_norm(h), valid)
        return h + self.feed_forward(self.ffn_norm(h))


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # [B, T, vocab] (or the last `logits_to_keep` positions; [N, vocab] with `logits_at`)
    loss: torch.Tensor | None = None  # mean cross-entropy over supervised tokens (+ aux loss if enabled)
    aux_loss: torch.Tensor | None = None  # the MoE balance loss, already scaled by aux_loss_coef
    hidden_states: torch.Tensor | None = None  # final-norm output [B, T, D]


class Decoder(nn.Module):
    """Llama 4 text decoder (iRoPE, chunked attention, MoE with a shared expert).

    `forward` accepts token ids or embeddings (the fused model writes image features into the
    embeddings), per-sample positions, a padding mask, packed-document segment ids and a KV cache.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # RoPE frequencies: a plain float32 tensor, not a buffer, so `model.to(bfloat16)` cannot round it.
        self.inv_freq = torch.empty(config.head_dim // 2)
        self.reset_parameters()

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def unallocated(cls, config: DecoderConfig) -> "Decoder":
        """A decoder of `config` on the meta device: its shapes, no memory, nothing initialised. Its weights are
        to be read from a checkpoint once `allocate`d (after FSDP2 has sharded it, where it is to be sharded)."""
        with torch.device("meta"):
            return cls(config)

    def allocate(self, device) -> "Decoder":
        """The tensors of an `unallocated` decoder (sharded or not) allocated on `device`, not initialised (every
        weight is to be written), and its buffers computed (RoPE's frequencies, a zero balancing state); self."""
        self.to_empty(device=device)
        self.reset_buffers()
        return self

    @torch.no_grad()
    def reset_buffers(self):
        """RoPE frequencies (float32) and the MoE balancing state, in place on the model's device."""
        device = self.embed_tokens.weight.device
        c = self.config
        self.inv_freq = rope_inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
        for moe in self.moe_layers():
            moe.expert_bias = torch.zeros(moe.num_experts, device=device)
            moe.tokens_per_expert = torch.zeros(moe.num_experts, device=device)

    @torch.no_grad()
    def reset_parameters(self):
        """Normal(0, std) init; output projections scaled by depth (std / sqrt(2 (layer + 1)))."""
        std = self.config.initializer_range
        for layer in self.layers:
            depth_std = std / math.sqrt(2 * (layer.index + 1))
            for name, p in layer.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif "o_proj" in name or "down_proj" in name:
                    nn.init.trunc_normal_(p, std=depth_std, a=-3 * depth_std, b=3 * depth_std)
                else:
                    nn.init.trunc_normal_(p, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.embed_tokens.weight, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.lm_head.weight, std=std, a=-3 * std, b=3 * std)
        self.norm.weight.fill_(1.0)
        self.reset_buffers()

    @classmethod
    def from_hf(cls, path, dtype: torch.dtype | None = None, device=None) -> "Decoder":
        """Load the text weights of a Hugging Face Llama 4 checkpoint folder (see `hf_llama4.load_hf_decoder`)."""
        from .hf_llama4 import load_hf_decoder

        return load_hf_decoder(path, dtype=dtype, device=device)

    def save_hf(self, path) -> None:
        """Write a `Llama4ForCausalLM` folder that transformers loads (see `hf_llama4.save_hf_decoder`)."""
        from .hf_llama4 import save_hf_decoder

        save_hf_decoder(self, path)

    # -- forward -------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_length: int) -> DecoderCache:
        p = self.embed_tokens.weight
        return DecoderCache(self.config, batch_size, max_length, dtype=p.dtype, device=p.device)

    def moe_layers(self) -> list[MoE]:
        return [layer.feed_forward for layer in self.layers if layer.is_moe]

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, branch_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: DecoderCache | None = None,
                logits_to_keep: int | None = None, logits_at: torch.Tensor | None = None) -> DecoderOutput:
        """
        input_ids [B, T] or inputs_embeds [B, T, D] (exactly one).
        attention_mask [B, T]: 1 for real tokens, 0 for padding (left padding for generation).
        positions [B, T]: absolute positions; default: count of real tokens before each one (continuing
            the cache's positions), so left-padded samples each start at 0.
        segment_ids [B, T]: packed samples (each a contiguous run of one id); tokens attend only within
            their own segment. Default positions restart at each segment.
        branch_ids [B, T]: a shared prefix (0) followed by branches (1, 2, ...) that each see the prefix
            and themselves only, e.g. one image with several questions (see `data.collate.share_prefix`);
            they need their positions (each branch continues from the prefix), as `data.collate` gives them.
        labels [B, T]: next-token targets aligned with the inputs (shifted inside); -100 is ignored.
        logits_to_keep: logits of the last n positions only (generation).
        logits_at [B, T] bool: logits only where True, as [N, vocab] in row-major order (training: the
            positions whose next token is supervised; the LM head and its float32 softmax then skip the
            image, prompt and padding tokens, which for a 200k vocabulary is most of a step's memory).
        """
        if logits_to_keep is not None and logits_at is not None:
            raise ValueError("Decoder.forward: pass at most one of logits_to_keep and logits_at")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Decoder.forward: pass exactly one of input_ids and inputs_embeds")
        x = input_ids if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        valid = (torch.ones(B, T, dtype=torch.bool, device=x.device) if attention_mask is None
                 else attention_mask.to(device=x.device, dtype=torch.bool))
        if inputs_embeds is None:  # padding may hold any id (-1, -100, ...): embed it as 0, it is masked anyway
            x = self.embed_tokens(input_ids if attention_mask is None else input_ids.masked_fill(~valid, 0))
        default_positions = positions is None
        if positions is None and branch_ids is not None:
            raise ValueError("Decoder.forward: branch_ids need their positions (each branch continues from the "
                             "shared prefix); pass the positions that fusion.data.collate builds with them")
        if positions is None and segment_ids is not None:
            index = torch.arange(T, device=x.device).expand(B, T)
            segments = segment_ids.to(x.device)
            starts = torch.ones(B, T, dtype=torch.bool, device=x.device)
            starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
            positions = index - torch.where(starts, index, 0).cummax(dim=1).values  # restart at each segment
        elif positions is None:
            start = cache.next_positions if cache is not None else torch.zeros(B, 1, dtype=torch.long,
                                                                                 device=x.device)
            positions = start + (valid.long().cumsum(1) - 1).clamp(min=0)
        if (segment_ids is not None or branch_ids is not None) and cache is not None:
            raise ValueError("Decoder.forward: segment_ids and branch_ids (packing) cannot be combined with a KV cache")

        plans = self._attention_plans(positions, valid, segment_ids, branch_ids, cache,
                                      plain=default_positions and attention_mask is None and cache is None
                                      and segment_ids is None and branch_ids is None)
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        rope = rope_angles(positions, self.inv_freq)
        temperature = (attention_temperature(positions, self.config.floor_scale, self.config.attn_scale)
                       if self.config.attn_temperature_tuning else None)
        for i, layer in enumerate(self.layers):
            counts_real = attention_mask is not None and self.training and layer.counts_real_tokens
            x = layer(x, rope, temperature, plans[layer.kind], cache.layers[i] if cache is not None else None,
                      valid if counts_real else None)
        if cache is not None:
            last = torch.where(valid, positions, -1).max(dim=1, keepdim=True).values
            cache.next_positions = torch.maximum(cache.next_positions, last + 1)

        hidden = self.norm(x)
        if logits_at is not None:
            kept = hidden[logits_at.to(hidden.device, torch.bool)]
        else:
            kept = hidden if logits_to_keep is None else hidden[:, -logits_to_keep:]
        logits = self.lm_head(kept)
        aux = self._aux_loss()  # in training with a coefficient > 0 only; with or without labels
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, logits_at)
            if aux is not None:
                loss = loss + aux
        return DecoderOutput(logits=logits, loss=loss, aux_loss=aux, hidden_states=hidden)

    def _aux_loss(self):
        """The MoE layers' auxiliary balance losses of the last forward, each times its layer's coefficient
        (the config's, or a training stage's `aux_loss_coef`); None where no layer computed one."""
        terms = [m.aux_loss_coef * m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return torch.stack(terms).sum() if terms else None

    def _attention_plans(self, positions, valid, segment_ids, branch_ids, cache,
                         plain: bool) -> dict[str, AttentionPlan]:
        """One plan per layer kind present ("full" for NoPE / unchunked, "chunked" for chunked RoPE layers)."""
        chunk = self.config.attention_chunk_size
        plans = {}
        for kind in {layer.kind for layer in self.layers}:
            chunk_size = chunk if kind == "chunked" else None
            if cache is None:
                if plain and (chunk_size is None or positions.shape[1] <= chunk_size):
                    plans[kind] = AttentionPlan(is_causal=True)  # the fast path: no mask tensor at all
                else:
                    mask = build_attention_mask(positions, positions, chunk_size=chunk_size, k_valid=valid,
                                                q_segments=segment_ids, k_segments=segment_ids,
                                                q_branches=branch_ids, k_branches=branch_ids)
                    plans[kind] = AttentionPlan(mask=mask)
                continue
            table = cache.tables[kind]
            slots, all_kept = table.assign(positions, valid)
            old_positions = table.positions[:, :table.num_slots].clone()
            table.write(slots, torch.where(valid, positions, -1))
            if all_kept:  # keys: the cache after this write
                k_pos = table.positions[:, :table.num_slots]
            else:  # keys: the cache before this write, then the new tokens
                k_pos = torch.cat((old_positions, torch.where(valid, positions, -1)), dim=1)
            mask = build_attention_mask(positions, k_pos, chunk_size=chunk_size, k_valid=k_pos >= 0)
            plans[kind] = AttentionPlan(mask=mask, slots=slots, concat=not all_kept)
        return plans

    # -- load balancing ------------------------------------------------------------------------
    def update_expert_bias(self):
        """Call once per optimizer step (see `attach_load_balancing`)."""
        for moe in self.moe_layers():
            moe.update_expert_bias()

    @torch.no_grad()
    def uncount_last_forward(self):
        """Take the last forward's tokens back out of the load-balancing counts (a forward that must not count,
        such as a stand-in batch of sharded training)."""
        for moe in self.moe_layers():
            moe.tokens_per_expert -= moe.last_counted.to(moe.tokens_per_expert.dtype)

    def tokens_per_expert(self) -> list[torch.Tensor]:
        """Tokens routed to each expert in the last forward, one [E] tensor per MoE layer."""
        return [moe.last_counts for moe in self.moe_layers()]

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        """Greedy or sampled decoding with a KV cache; see `fusion.generation.generate` for the options.
        `stop_ids` defaults to the config's `eos_token_id` (as loaded from a Hugging Face config.json);
        `stop_ids=()` never stops early."""
        from .generation import generate

        if kwargs.get("stop_ids") is None and self.config.eos_token_id is not None:
            kwargs["stop_ids"] = self.config.eos_token_id  # an int or a list, as config.json writes it
        return generate(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T]: the target of position t is labels[:, t+1]; the last position gets -100 (ignored)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, logits_at: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy; labels[:, t+1] is the target of logits[:, t]; -100 is ignored.

    `logits` are [B, T, vocab], or [N, vocab] at the positions `logits_at` marks (see `Decoder.forward`).
    """
    # shift the labels, not the logits: slicing the logits would copy them
    targets = next_token_targets(labels.to(logits.device))
    targets = targets.flatten() if logits_at is None else targets[logits_at.to(logits.device, torch.bool)]
    return F.cross_entropy(logits.flatten(0, -2).float(), targets, ignore_index=IGNORE_INDEX)


def attach_load_balancing(optimizer: torch.optim.Optimizer, decoder: Decoder):
    """Update the experts' selection bias from the token counts before each optimizer step."""
    return optimizer.register_step_pre_hook(lambda *_: decoder.update_expert_bias())
