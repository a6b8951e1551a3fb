"""`DecoderConfig`: every switch of the Llama 4 text decoder, as one JSON-serialisable dataclass."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vision.checks import is_finite_number, is_whole_number


@dataclass
class RopeScaling:
    """Llama-3-style RoPE frequency scaling (Scout: factor 16, low 1, high 1, original length 8192)."""

    factor: float = 16.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 8192


@dataclass
class DecoderConfig:
    """Shape and behaviour of the decoder. Defaults are a small model; `scout()` gives the real sizes.

    Layer patterns (0-based layer index `i`, as in Meta's and Hugging Face's Llama 4):
    - NoPE layer when `nope_interval > 0 and (i + 1) % nope_interval == 0`; the others use RoPE.
      `nope_interval = 0` means RoPE everywhere.
    - MoE layer when `num_experts > 0 and i % interleave_moe_layer_step == interleave_moe_layer_step - 1`
      (step 1: every layer; step 2: layers 1, 3, 5, ...); the others use a dense SwiGLU of width
      `intermediate_size_mlp`.
    - Chunked attention (`attention_chunk_size`, aligned to absolute positions) on RoPE layers;
      NoPE layers attend to the whole causal history. `None` turns chunking off.
    """

    vocab_size: int = 32000
    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 1024  # routed and shared experts
    intermediate_size_mlp: int = 2048  # dense SwiGLU layers
    num_experts: int = 16
    top_k: int = 1
    interleave_moe_layer_step: int = 1
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    nope_interval: int = 4
    attention_chunk_size: int | None = 8192
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    # Load balancing. The expert bias moves only which expert is chosen, never the gate value;
    # it is updated from token counts once per optimizer step (0 disables the update).
    load_balance_coeff: float = 1e-3
    aux_loss_coef: float = 0.0  # optional auxiliary balance loss (0 = off)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # free-form notes carried through save/load

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        problems = _range_problems(self)
        if not problems:  # (the relations between settings, once each is a number in its range)
            if self.num_heads % self.num_kv_heads:
                problems.append(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                                f"({self.num_kv_heads})")
            if self.head_dim % 2:
                problems.append(f"head_dim ({self.head_dim}) must be even for RoPE")
            if self.num_experts and not 1 <= self.top_k <= self.num_experts:
                problems.append(f"top_k ({self.top_k}) must be between 1 and num_experts ({self.num_experts})")
        if problems:
            raise ValueError("invalid DecoderConfig: " + "; ".join(problems))

    # -- layer patterns ------------------------------------------------------------------------
    def is_nope_layer(self, i: int) -> bool:
        return self.nope_interval > 0 and (i + 1) % self.nope_interval == 0

    def is_moe_layer(self, i: int) -> bool:
        step = self.interleave_moe_layer_step
        return self.num_experts > 0 and i % step == step - 1

    def is_chunked_layer(self, i: int) -> bool:
        return self.attention_chunk_size is not None and not self.is_nope_layer(i)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DecoderConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    @classmethod
    def scout(cls, **overrides) -> "DecoderConfig":
        """Llama 4 Scout 17Bx16E text sizes (for reference and shape checks; not for CPU use)."""
        base = dict(
            vocab_size=202048, hidden_size=5120, num_layers=48, num_heads=40, num_kv_heads=8, head_dim=128,
            intermediate_size=8192, intermediate_size_mlp=16384, num_experts=16, top_k=1,
            interleave_moe_layer_step=1, rope_scaling=RopeScaling(), nope_interval=4, attention_chunk_size=8192,
            use_qk_norm=True, max_position_embeddings=10485760, bos_token_id=200000,
            eos_token_id=[200001, 200007, 200008], pad_token_id=200018,
        )
        base.update(overrides)
        return cls(**base)


# The least value of each whole-number setting (a model with 0 layers, heads or experts' width builds and runs,
# computing nothing useful; 0 kv heads divided by zero).
_WHOLE_MINIMUM = {"vocab_size": 1, "hidden_size": 1, "num_layers": 1, "num_heads": 1, "num_kv_heads": 1,
                  "head_dim": 1, "intermediate_size": 1, "intermediate_size_mlp": 1, "num_experts": 0,
                  "top_k": 1, "interleave_moe_layer_step": 1, "nope_interval": 0, "max_position_embeddings": 1}
# The real-number settings: those that must be above 0 (a negative rms_norm_eps gives NaNs), and those that may be 0.
_POSITIVE = ("rope_theta", "floor_scale", "rms_norm_eps")
_NOT_NEGATIVE = ("attn_scale", "initializer_range", "load_balance_coeff", "aux_loss_coef")


def _range_problems(config: DecoderConfig) -> list[str]:
    """Each setting that is not a number of its kind in its range, said as what it must be."""
    problems = [f"{name} must be a whole number >= {least}, got {getattr(config, name)!r}"
                for name, least in _WHOLE_MINIMUM.items()
                if not (is_whole_number(getattr(config, name)) and getattr(config, name) >= least)]
    problems += [f"{name} must be a number above 0, got {getattr(config, name)!r}" for name in _POSITIVE
                 if not (is_finite_number(getattr(config, name)) and getattr(config, name) > 0)]
    problems += [f"{name} must be a number >= 0, got {getattr(config, name)!r}" for name in _NOT_NEGATIVE
                 if not (is_finite_number(getattr(config, name)) and getattr(config, name) >= 0)]
    chunk = config.attention_chunk_size
    if chunk is not None and not (is_whole_number(chunk) and chunk >= 1):
        problems.append(f"attention_chunk_size must be a whole number >= 1, or None for no chunking, got {chunk!r}")
    return problems
