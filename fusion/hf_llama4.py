"""Hugging Face Llama 4 checkpoints <-> `fusion.Decoder`, without importing transformers.

Reads the text part of `Llama4ForCausalLM` and `Llama4ForConditionalGeneration` folders
(`config.json` + `model.safetensors` or a sharded `model.safetensors.index.json`), with the config as
written by transformers 4.5x (`rope_theta` + `rope_scaling`) or 5.x (`rope_parameters`). Writes
`Llama4ForCausalLM` folders that both load. Quantized checkpoints (FP8, GPTQ, ...) are refused, not
dequantized: use the bf16 release.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open

from .checkpoint import model_folder_writer, user_path, write_safetensors
from .decoder import Decoder
from .decoder_config import DecoderConfig, RopeScaling
from .distributed import copy_whole_tensors
from .errors import CheckpointError

# Our parameter names -> Hugging Face names, inside one decoder layer.
_LAYER_RENAMES = (
    ("attention_norm.", "input_layernorm."),
    ("attention.", "self_attn."),
    ("ffn_norm.", "post_attention_layernorm."),
)
# Where the text model sits in each kind of checkpoint: (body prefix, lm_head key).
_LAYOUTS = (
    ("model.", "lm_head.weight"),  # Llama4ForCausalLM
    ("language_model.model.", "language_model.lm_head.weight"),  # Llama4ForConditionalGeneration
    ("model.language_model.", "lm_head.weight"),  # ConditionalGeneration, alternative layout
)
# Buffers of Meta's checkpoints that carry no weights.
_DROPPED_SUFFIXES = ("rope.freqs", "freq_cis", "_extra_state", "global_gate_stats_3E", "running_gate_stats_3E",
                     "expert_activation_DE")
_MODEL_TYPES = ("llama4_text", "llama4")  # Llama4ForCausalLM, Llama4ForConditionalGeneration
# Tensors that only quantized checkpoints carry (FP8 scales, GPTQ/AWQ packing, bitsandbytes state).
_QUANTIZED_SUFFIXES = ("_scale", "_scale_inv", "_scale_2", ".qweight", ".qzeros", ".scales", ".g_idx", "_packed",
                       "_zero_point", ".absmax", ".quant_map", ".SCB")
_QUANTIZED_DTYPES = ("F8", "F6", "F4")  # safetensors dtype names: F8_E4M3, F8_E5M2, F4, ...
_NOT_QUANTIZED_ADVICE = ("quantized checkpoints are not supported: use the bf16 release of the model, "
                         "or dequantize the checkpoint first")


def hf_key(name: str, body_prefix: str = "model.", head_key: str = "lm_head.weight") -> str:
    """Our state-dict key -> the Hugging Face key."""
    if name == "lm_head.weight":
        return head_key
    for ours, theirs in _LAYER_RENAMES:
        if name.startswith("layers.") and f".{ours}" in name:
            name = name.replace(f".{ours}", f".{theirs}", 1)
            break
    return body_prefix + name


# -- config -------------------------------------------------------------------------------------
def _rope_settings(cfg: dict) -> tuple[float, RopeScaling | None]:
    """(theta, llama3 scaling or None) from a 5.x `rope_parameters` or a 4.5x `rope_theta`/`rope_scaling`."""
    params = cfg.get("rope_parameters")
    if params is None:
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 500000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 500000.0)))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise CheckpointError(f"unsupported rope type {rope_type!r} (only 'default' and 'llama3' are Llama 4's)")
    return theta, RopeScaling(factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                              high_freq_factor=float(params["high_freq_factor"]),
                              original_max_position_embeddings=int(params["original_max_position_embeddings"]))


def _interval_from_list(flags: list[int], is_set, what: str) -> int:
    """Recover an interval n from per-layer flags that follow `is_set(i, n)`; 0 when none is set."""
    layers = len(flags)
    for n in range(0, layers + 2):
        if all(bool(flags[i]) == is_set(i, n) for i in range(layers)):
            return n
    raise CheckpointError(f"{what} {flags} does not follow a regular interval; fusion supports regular patterns only")


def decoder_config_from_hf(cfg: dict, source: str = "config.json") -> DecoderConfig:
    """A transformers `Llama4TextConfig` dict (or a `Llama4Config` with `text_config`) -> DecoderConfig.

    `source` names the file in errors.
    """
    try:
        return _decoder_config(cfg.get("text_config", cfg))
    except KeyError as err:
        raise CheckpointError(f"{source} lacks {err.args[0]!r}, which a Llama 4 text config needs; "
                              f"give a complete config.json as transformers writes it") from None


def _decoder_config(cfg: dict) -> DecoderConfig:
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act {cfg['hidden_act']!r} is not Llama 4's 'silu'")
    if cfg.get("attention_bias", False):
        raise CheckpointError("attention_bias=True is not supported (Llama 4 attention has no biases)")
    layers = cfg.get("num_hidden_layers", 48)
    theta, scaling = _rope_settings(cfg)
    nope_interval = cfg.get("no_rope_layer_interval", 4)
    if cfg.get("no_rope_layers"):  # 1 = uses RoPE (transformers' naming)
        nope_interval = _interval_from_list(
            [1 - f for f in cfg["no_rope_layers"]], lambda i, n: n > 0 and (i + 1) % n == 0, "no_rope_layers")
    step = cfg.get("interleave_moe_layer_step", 1)
    num_experts = cfg.get("num_local_experts", 16)
    if cfg.get("moe_layers") is not None:
        flags = [int(i in cfg["moe_layers"]) for i in range(layers)]
        if not any(flags):
            num_experts = 0
        else:
            step = _interval_from_list(flags, lambda i, n: n > 0 and i % n == n - 1, "moe_layers") or 1
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return DecoderConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=layers,
        num_heads=cfg["num_attention_heads"], num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=head_dim, intermediate_size=cfg.get("intermediate_size", 8192),
        intermediate_size_mlp=cfg.get("intermediate_size_mlp", 16384), num_experts=num_experts,
        top_k=cfg.get("num_experts_per_tok", 1), interleave_moe_layer_step=step, rope_theta=theta,
        rope_scaling=scaling, nope_interval=nope_interval,
        attention_chunk_size=cfg.get("attention_chunk_size", 8192),  # transformers' default; null: no chunking
        use_qk_norm=bool(cfg.get("use_qk_norm", True)),
        attn_temperature_tuning=bool(cfg.get("attn_temperature_tuning", True)),
        floor_scale=float(cfg.get("floor_scale", 8192)), attn_scale=float(cfg.get("attn_scale", 0.1)),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5), max_position_embeddings=cfg.get("max_position_embeddings", 131072),
        initializer_range=cfg.get("initializer_range", 0.02), bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"), pad_token_id=cfg.get("pad_token_id"),
    )


def _int_if_whole(x: float):
    return int(x) if float(x).is_integer() else x


def hf_config_from_decoder(config: DecoderConfig) -> dict:
    """DecoderConfig -> a `Llama4TextConfig` dict for `Llama4ForCausalLM`.

    RoPE settings are written in the 4.5x form (`rope_theta` + `rope_scaling`), which transformers 5.x
    also reads; layer patterns are written explicitly (`no_rope_layers`, `moe_layers`).
    """
    L = config.num_layers
    rope_scaling = None
    if config.rope_scaling is not None:
        rope_scaling = {"rope_type": "llama3", **vars(config.rope_scaling)}
    return {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size, "num_hidden_layers": L,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "intermediate_size": config.intermediate_size,
        "intermediate_size_mlp": config.intermediate_size_mlp, "hidden_act": "silu",
        "num_local_experts": max(config.num_experts, 1), "num_experts_per_tok": config.top_k,
        "interleave_moe_layer_step": config.interleave_moe_layer_step,
        "moe_layers": [i for i in range(L) if config.is_moe_layer(i)],
        "no_rope_layers": [0 if config.is_nope_layer(i) else 1 for i in range(L)],
        "no_rope_layer_interval": config.nope_interval or L + 1,
        "attention_chunk_size": config.attention_chunk_size, "use_qk_norm": config.use_qk_norm,
        "attn_temperature_tuning": config.attn_temperature_tuning, "floor_scale": _int_if_whole(config.floor_scale),
        "attn_scale": config.attn_scale, "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling, "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range, "tie_word_embeddings": False, "attention_bias": False,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id, "router_aux_loss_coef": config.aux_loss_coef,
        "torch_dtype": "float32",
    }


def _read_hf_config(folder: Path) -> dict:
    """config.json of a Llama 4 folder; other model types and quantized checkpoints are refused."""
    path = folder / "config.json"
    if not folder.exists():
        hub_name = not folder.is_absolute() and len(folder.parts) == 2 and not str(folder).startswith(".")
        raise CheckpointError(f"Hugging Face checkpoint folder {str(folder)!r} does not exist (working directory "
                              f"{os.getcwd()})" + (
                                  f"; if {str(folder)!r} is a name on the Hugging Face Hub: fusion never downloads "
                                  f"anything, download the folder once yourself (e.g. `huggingface-cli download "
                                  f"{folder.as_posix()} --local-dir DIR`) and pass DIR" if hub_name else ""))
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a Hugging Face checkpoint folder: it has no config.json")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err
    model_type = cfg.get("model_type")
    if model_type not in _MODEL_TYPES:
        found = f"a {model_type!r} model" if model_type else "a config.json without model_type"
        raise CheckpointError(f"{folder} holds {found}, not Llama 4 (config.json model_type must be one of "
                              f"{list(_MODEL_TYPES)}); fusion reads Llama 4 checkpoints only")
    for where, part in (("", cfg), ("text_config.", cfg.get("text_config") or {})):
        for name in ("quantization_config", "compression_config"):
            if part.get(name):
                method = part[name].get("quant_method") if isinstance(part[name], dict) else None
                raise CheckpointError(f"{path} has {where}{name} (quant_method {method!r}): "
                                      f"{_NOT_QUANTIZED_ADVICE}")
    return cfg


def _ties_embeddings(cfg: dict) -> bool:
    """Whether the LM head is the embedding (transformers' default for Llama 4: untied)."""
    return bool(cfg.get("tie_word_embeddings")) or bool((cfg.get("text_config") or {}).get("tie_word_embeddings"))


def _check_not_quantized(file: Path, reader) -> None:
    for key in reader.keys():
        if key.endswith(_DROPPED_SUFFIXES):
            continue
        dtype = reader.get_slice(key).get_dtype()
        if dtype.startswith(_QUANTIZED_DTYPES):
            raise CheckpointError(f"{file}: tensor {key} is {dtype} (float8/low-bit): {_NOT_QUANTIZED_ADVICE}")
        if key.endswith(_QUANTIZED_SUFFIXES) or ".quant_state" in key:
            raise CheckpointError(f"{file}: tensor {key} is quantization data: {_NOT_QUANTIZED_ADVICE}")


# -- weights ------------------------------------------------------------------------------------
def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files; `model.safetensors` wins over an index when both exist, as in transformers."""
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # not JSON, or no weight_map in it
            problem = err if isinstance(err, ValueError) else "no weight_map of tensor names to shard files"
            raise CheckpointError(f"{index} cannot be read ({problem}); the file is damaged or incomplete: download "
                                  f"it again") from err
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not in the folder: {missing[:5]}")
        return [folder / s for s in shards]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(f"no safetensors weights in {folder} (expected model.safetensors or "
                          f"model.safetensors.index.json); convert .bin/.pth checkpoints to safetensors first")


def _open_weights(file: Path):
    """A safetensors file opened for reading; one cut short (an interrupted download) is named."""
    try:
        return safe_open(file, framework="pt")
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{file} cannot be read ({err}); the file is damaged or incomplete: download it "
                              f"again") from err


def read_hf_decoder_config(folder: Path) -> tuple[DecoderConfig, dict]:
    """The DecoderConfig of a Hugging Face Llama 4 folder, and its config.json as read."""
    hf_cfg = _read_hf_config(folder)
    return decoder_config_from_hf(hf_cfg, source=str(folder / "config.json")), hf_cfg


def load_hf_decoder(path, dtype: torch.dtype | None = None, device=None) -> Decoder:
    """Build a Decoder from a Hugging Face Llama 4 folder. `dtype` defaults to the checkpoint's own dtype."""
    with open_hf_decoder_weights(path) as weights:
        if dtype is None:  # the checkpoint's own: that of its embedding
            dtype = weights.read("embed_tokens.weight").dtype
        decoder = Decoder.unallocated(weights.config).allocate(device or "cpu").to(dtype)
        weights.copy_into(decoder)
    return decoder


@dataclass
class HfDecoderWeights:
    """The text weights of a Hugging Face Llama 4 folder under the decoder's own names, read one tensor at a
    time (while `open_hf_decoder_weights` keeps the files open)."""
    folder: Path
    config: DecoderConfig
    keys: dict  # the decoder's weight name -> the checkpoint's key (or its experts' keys' common prefix)
    read: Callable[[str], torch.Tensor]  # a weight by the decoder's name, as the checkpoint stores it

    def copy_into(self, decoder: Decoder) -> None:
        """Every weight into `decoder` (built from `config` and `allocate`d; plain, or sharded by FSDP2: then each
        process keeps its shard only); its buffers are the decoder's own (`allocate` computes them)."""
        def shape_error(name, got, want):
            return (f"{self.folder}: {self.keys[name]} has shape {got} but config.json gives {want}; the weights "
                    f"and config differ")

        copy_whole_tensors(decoder.state_dict(), list(self.keys), self.read, shape_error)


@contextlib.contextmanager
def open_hf_decoder_weights(path) -> Iterator[HfDecoderWeights]:
    """A Hugging Face Llama 4 folder's config and text weights, its files open (each once) while in the block.
    A folder that lacks a weight the config needs, or is quantized, is a CheckpointError."""
    folder = user_path(path)
    config, hf_cfg = read_hf_decoder_config(folder)
    with contextlib.ExitStack() as files_open:
        readers = {f: files_open.enter_context(_open_weights(f)) for f in _safetensors_files(folder)}
        keys = {}
        for f, reader in readers.items():
            _check_not_quantized(f, reader)
            keys.update({k: f for k in reader.keys()})

        def tensor(key: str) -> torch.Tensor:
            return readers[keys[key]].get_tensor(key)

        wanted, read = _decoder_weight_names(folder, config, hf_cfg, keys, tensor)
        yield HfDecoderWeights(folder, config, wanted, read)


def _decoder_weight_names(folder: Path, config: DecoderConfig, hf_cfg: dict, keys: dict, tensor):
    """{the decoder's weight name: the checkpoint's key} and `read(name)`, which reads one weight by its name
    (`tensor(key)` reads a checkpoint tensor; experts stored one per expert are stacked as the decoder keeps them)."""
    layout = next(((body, head) for body, head in _LAYOUTS if f"{body}embed_tokens.weight" in keys), None)
    if layout is None:
        raise CheckpointError(f"{folder}: no text embedding found (looked for "
                              f"{[b + 'embed_tokens.weight' for b, _ in _LAYOUTS]})")
    if layout[1] not in keys and _ties_embeddings(hf_cfg):  # tied: no head tensor is written
        layout = (layout[0], f"{layout[0]}embed_tokens.weight")
    names = list(Decoder.unallocated(config).state_dict())
    wanted = {name: hf_key(name, *layout) for name in names
              if not name.endswith(("expert_bias", "tokens_per_expert"))}
    unfused = _unfused_expert_keys(wanted, keys)
    missing = [key for name, key in wanted.items() if key not in keys and name not in unfused]
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} decoder weights are missing, e.g. {missing[:4]}")

    def read(name: str) -> torch.Tensor:
        key = wanted[name]
        return tensor(key) if key in keys else _stack_unfused_experts(unfused[name], keys, tensor)

    return wanted, read


def _unfused_expert_keys(wanted: dict, keys: dict) -> dict:
    """Expert weights stored one per expert (`experts.{e}.{gate,up,down}_proj.weight`, [out, in])."""
    out = {}
    for name, key in wanted.items():
        if key.endswith("experts.gate_up_proj") and key not in keys:
            out[name] = ("gate_up", key[: -len("gate_up_proj")])
        elif key.endswith("experts.down_proj") and key not in keys:
            out[name] = ("down", key[: -len("down_proj")])
    return out


def _stack_unfused_experts(spec, keys, tensor) -> torch.Tensor:
    """One layer's experts stacked as fusion stores them; `tensor(key)` reads a checkpoint tensor."""
    kind, prefix = spec

    def read(key):
        if key not in keys:
            raise CheckpointError(f"missing expert weight {key}")
        return tensor(key)

    experts = []
    e = 0
    while f"{prefix}{e}.down_proj.weight" in keys:
        if kind == "gate_up":  # [F, D] each -> [D, 2F]
            experts.append(torch.cat((read(f"{prefix}{e}.gate_proj.weight").t(),
                                      read(f"{prefix}{e}.up_proj.weight").t()), dim=1))
        else:  # [D, F] -> [F, D]
            experts.append(read(f"{prefix}{e}.down_proj.weight").t())
        e += 1
    if not experts:
        raise CheckpointError(f"no expert weights under {prefix}")
    return torch.stack(experts)


def save_hf_decoder(decoder: Decoder, path) -> None:
    """Write `config.json` and `model.safetensors` for `Llama4ForCausalLM`.

    A new folder appears whole; an existing one is replaced as one unit, its other files (a tokenizer, a
    README) kept (`checkpoint.model_folder_writer`), so that an interrupted save leaves the old folder as it
    was. A sharded checkpoint already in the folder (`model.safetensors.index.json` and the shards it lists)
    is removed, as transformers' `save_pretrained` does, so that no loader reads the old weights.
    """
    folder = user_path(path)
    if not float(decoder.config.floor_scale).is_integer():
        raise CheckpointError(f"cannot save {folder} as a Hugging Face Llama 4 folder: floor_scale "
                              f"{decoder.config.floor_scale} is not a whole number, and transformers' "
                              f"Llama4TextConfig takes an integer (5.x refuses the folder); set floor_scale to "
                              f"an integer first (this changes the attention temperature of long sequences)")
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"cannot save a Hugging Face folder at {str(folder)!r}: it is a file; give a folder "
                              f"path")
    if any(bool(m.expert_bias.abs().sum() > 0) for m in decoder.moe_layers()):
        warnings.warn("save_hf: this decoder's expert selection bias is not zero; Hugging Face Llama 4 has no "
                      "such bias, so its routing will differ from fusion's", stacklevel=2)
    config = decoder.config
    state = {}
    for name, tensor in decoder.state_dict().items():
        if name.endswith(("expert_bias", "tokens_per_expert")):
            continue
        state[hf_key(name)] = tensor.detach().contiguous().cpu()
    hf_cfg = hf_config_from_decoder(config)
    hf_cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    try:
        with model_folder_writer(folder, left_behind=_stale_shards(folder)) as tmp:
            write_safetensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    except OSError as err:  # a full disk, a quota, a read-only folder
        raise CheckpointError(f"could not write the Hugging Face folder {folder} ({err}); nothing in it changed: "
                              f"free space (or fix the folder) and save again") from err


def _stale_shards(folder: Path) -> list[str]:
    """`model.safetensors.index.json` and the shard files it lists (only files in `folder`), where it has one."""
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return []
    try:
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
    except (ValueError, AttributeError):
        shards = set()
    return [index.name] + sorted(shard for shard in shards if isinstance(shard, str) and shard == Path(shard).name
                                 and shard != "model.safetensors")
