"""`FusionModel`: early fusion of a vision tower and the Llama 4 decoder.

    pixels [n_tiles, 3, S, S] --vision--> [n_tiles, P, C] --adapter (pixel shuffle, MLP, projector)--> [n_tiles, P/4, D]
    input_ids [B, T] --embed--> [B, T, D], then ONE masked write of the image features at the <|patch|> positions
    --> decoder --> logits / loss / generated tokens

Training parts (each gets its own learning rate; 0 freezes it): "vision", "adapter" (MLP and
projector) and "decoder".
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Sequence

import torch
import torch.nn as nn

from tokenizer import FusionTokenizer
from vision.adapter import VisionAdapter, pixel_shuffle_tokens
from vision.encoder import VisionEncoder

from .data.collate import pad_batch
from .decoder import Decoder, DecoderOutput
from .errors import ConfigError, ConversationFormatError, MediaCountMismatchError, PlaceholderMismatchError
from .fusion_config import FusionConfig
from .generation import generate as generate_tokens, left_pad, stop_id_tuple
from .processor import FusionProcessor

PARTS = ("vision", "adapter", "decoder")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run `model` in eval mode, then give each of its modules back the train/eval mode it had: evaluation,
    pipelines and relevance maps may be handed a model that is training, and must answer as it does in eval
    mode (no dropout; the MoE layers count no tokens for their balance) and leave it as they found it."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.train(training)


@dataclass
class FusionOutput(DecoderOutput):
    image_mask: torch.Tensor | None = None  # [B, T] True at the positions that hold image features


class FusionModel(nn.Module):
    def __init__(self, config: FusionConfig, tokenizer: FusionTokenizer, vision_weights=None,
                 decoder: Decoder | None = None, *, quickgelu_check: bool = True, allow_unsafe_pickle: bool = False):
        """A model of `config` with `tokenizer`: the tower from `vision_weights` (an open_clip weight file) or
        new, the adapter new, the decoder `decoder` (e.g. `Decoder.from_hf(folder)`, a pretrained trunk; its
        config must be `config.decoder`) or new. `quickgelu_check` and `allow_unsafe_pickle` are the
        `VisionEncoder`'s, for reading `vision_weights`."""
        super().__init__()
        if decoder is not None and decoder.config != config.decoder:
            raise ConfigError("FusionModel: the given decoder's config differs from config.decoder; build the "
                              "FusionConfig with decoder=decoder.config")
        if config.decoder.vocab_size < len(tokenizer):
            raise ConfigError(f"decoder vocab_size {config.decoder.vocab_size} is smaller than the tokenizer's "
                              f"{len(tokenizer)} tokens; set FusionConfig.decoder.vocab_size >= {len(tokenizer)}")
        self.config = config
        self.tokenizer = tokenizer
        self.vision = VisionEncoder(config.vision, weights=vision_weights, quickgelu_check=quickgelu_check,
                                    allow_unsafe_pickle=allow_unsafe_pickle)
        d = config.decoder.hidden_size
        tokens_per_tile = pixel_shuffle_tokens(self.vision.num_patches, config.pixel_shuffle_ratio)
        self.adapter = VisionAdapter(self.vision.width, config.adapter_hidden_size or d, d, config.pixel_shuffle_ratio,
                                     position_tokens=tokens_per_tile if config.image_position_embedding else None,
                                     position_embedding=config.image_position_embedding or "per_token")
        self.decoder = decoder if decoder is not None else Decoder(config.decoder)
        # Sharded training (FSDP2) gathers a module's weights from every process when it runs: there every
        # process must run the tower and adapter in every forward, a batch without media on a blank tile
        self.vision_in_every_forward = False
        self.processor = FusionProcessor(
            tokenizer, self.vision.image_processor(max_tiles=config.max_tiles, pad_with_mean=config.pad_with_mean),
            tokens_per_tile=tokens_per_tile, video=config.video)

    @classmethod
    def unallocated(cls, config: FusionConfig, tokenizer: FusionTokenizer) -> "FusionModel":
        """A model of `config` whose tower, adapter and decoder are on the meta device: their shapes, no memory,
        nothing initialised. Its weights are to be read once `allocate`d (after FSDP2 has sharded it, where
        it is to be sharded), as `from_pretrained` and sharded training do."""
        with torch.device("meta"):
            return cls(config, tokenizer, decoder=Decoder.unallocated(config.decoder))

    def allocate(self, device, parts: Sequence[str] = ("vision", "adapter", "decoder")) -> "FusionModel":
        """The tensors of `parts` of an `unallocated` model (sharded or not) allocated on `device`, not initialised
        (every weight is to be written), and the buffers that no weight file holds computed; self."""
        for name in parts:
            part = self.parts()[name]
            if name == "adapter":  # (weights only)
                part.to_empty(device=device)
            else:
                part.allocate(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def patch_id(self) -> int:
        return self.tokenizer.patch_id

    def parts(self) -> dict[str, nn.Module]:
        """The separately trainable parts, by name."""
        return {"vision": self.vision, "adapter": self.adapter, "decoder": self.decoder}

    # -- the fusion ------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_tiles, 3, S, S] -> [n_tiles, tokens_per_tile, D]. A frozen tower builds no autograd graph."""
        trainable = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            tower_dtype = next(self.vision.parameters()).dtype
            features = self.vision(pixel_values.to(self.device, dtype=tower_dtype))
        return self.adapter(features)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings with the image features written at the <|patch|> positions (one masked write)."""
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:  # padding may hold any id
            input_ids = input_ids.masked_fill(attention_mask.to(self.device) == 0, 0)
        embeds = self.decoder.embed_tokens(input_ids)
        image_mask = input_ids == self.patch_id  # [B, T]
        num_slots = int(image_mask.sum())
        num_tiles = 0 if pixel_values is None else pixel_values.shape[0]
        per_tile = self.processor.tokens_per_tile
        if num_slots != num_tiles * per_tile:
            raise PlaceholderMismatchError(
                f"the batch has {num_slots} <|patch|> placeholder tokens but {num_tiles * per_tile} image features "
                f"({num_tiles} tiles x {per_tile} tokens per tile); build inputs with model.processor so each "
                f"image and frame gets exactly its placeholders, and pass every tile in pixel_values")
        if num_tiles:
            features = self.encode_images(pixel_values)  # [n_tiles, tokens per tile, D]
            if features.shape[1] != per_tile:  # a processor built for another tower: features would misalign
                raise PlaceholderMismatchError(
                    f"the vision encoder and adapter give {features.shape[1]} tokens per tile, but model.processor "
                    f"writes {per_tile} <|patch|> placeholders per tile; build the processor with "
                    f"tokens_per_tile={features.shape[1]} (as FusionModel does)")
            features = features.reshape(-1, embeds.shape[-1])  # [n_tiles * per_tile, D]
            embeds = embeds.masked_scatter(image_mask[..., None], features.to(embeds.dtype))
        elif self.vision_in_every_forward:  # the blank tile's features count 0 (its gradients too)
            size = self.vision.image_size
            features = self.encode_images(torch.zeros(1, 3, size, size, device=self.device))
            embeds = embeds + features.sum().to(embeds.dtype) * 0
        return embeds, image_mask

    def forward(self, input_ids: torch.Tensor, *, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                branch_ids: torch.Tensor | None = None, logits_to_keep: int | None = None,
                logits_at: torch.Tensor | None = None) -> FusionOutput:
        """Loss (when `labels` are given) and logits. Tensors as built by `fusion.data.collate`.

        `logits_to_keep` / `logits_at`: logits of the last n positions / of the marked positions only
        (see `fusion.Decoder.forward`).
        """
        embeds, image_mask = self.embed(input_ids, pixel_values, attention_mask)
        out = self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, positions=positions,
                           segment_ids=segment_ids, branch_ids=branch_ids, logits_to_keep=logits_to_keep,
                           logits_at=logits_at)
        return FusionOutput(**vars(out), image_mask=image_mask)

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | Sequence[Sequence[int]], *, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32, **kwargs):
        """New tokens [B, n] for prompts: a left-padded [B, T] tensor (with its `attention_mask`), or lists of
        token ids (left-padded here). See `fusion.generation.generate` for the options.

        Stops at the tokenizer's stop tokens unless `stop_ids` is given (`stop_ids=()`: never stop early);
        finished rows hold the pad id.
        """
        if torch.is_tensor(input_ids) and input_ids.ndim != 2:
            raise ValueError(f"generate: input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)} (one "
                             f"prompt: ids[None], or a list of token-id lists)")
        if not torch.is_tensor(input_ids):
            if attention_mask is not None:
                raise ValueError("generate: attention_mask goes with a padded tensor of input_ids; lists of token "
                                 "ids are padded here, so leave attention_mask out")
            input_ids, attention_mask = left_pad(input_ids, self.tokenizer.pad_id)
        embeds, _ = self.embed(input_ids, pixel_values, attention_mask)
        kwargs["stop_ids"] = self._stop_ids(kwargs.get("stop_ids"))
        kwargs.setdefault("pad_id", self.tokenizer.pad_id)
        return generate_tokens(self.decoder, inputs_embeds=embeds, attention_mask=attention_mask,
                               max_new_tokens=max_new_tokens, **kwargs)

    @torch.no_grad()
    def chat(self, conversations: Sequence[Sequence[dict]], images: Sequence[Sequence] | None = None,
             videos: Sequence[Sequence] | None = None, *, max_new_tokens: int = 32, num_frames: int | None = None,
             fps: float | None = None, **kwargs) -> list[dict]:
        """Answer a batch of conversations (each ending with a user turn).

        Returns one `{"text": str, "tokens": list[int], "logprob": float}` per conversation, where
        `logprob` is the mean log-probability of the generated tokens (the stop token included).
        """
        if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence):
            raise ConversationFormatError(f"chat: conversations must be a list of conversations, got a "
                                          f"{type(conversations).__name__}")
        if conversations and isinstance(conversations[0], Mapping):
            raise ConversationFormatError("chat: conversations must be a list of conversations, each a list of "
                                          "turns; for one conversation pass [conversation] (and images=[[...]])")
        n = len(conversations)
        if n == 0:
            return []
        for name, media in (("images", images), ("videos", videos)):
            if media is None:
                continue
            listed = isinstance(media, Sequence) and not isinstance(media, (str, bytes))
            if not listed or len(media) != n:
                got = f"{len(media)} entries" if listed else f"a {type(media).__name__}"
                raise MediaCountMismatchError(f"chat: {name} must hold one list per conversation ({n}), got {got}; "
                                              f"e.g. {name}=[[first conversation's {name}], ...]")
        images = images or [()] * n
        videos = videos or [()] * n
        samples = [self.processor(c, im, vi, add_generation_prompt=True, num_frames=num_frames, fps=fps)
                   for c, im, vi in zip(conversations, images, videos)]
        batch = pad_batch(samples, self.tokenizer.pad_id, padding_side="left")
        kwargs["stop_ids"] = self._stop_ids(kwargs.get("stop_ids"))  # read once (it may be a generator)
        tokens, logprobs = self.generate(batch.input_ids, pixel_values=batch.pixel_values,
                                         attention_mask=batch.attention_mask, max_new_tokens=max_new_tokens,
                                         return_logprobs=True, **kwargs)
        results = []
        stops = set(kwargs["stop_ids"])
        for row in range(n):
            ids = tokens[row].tolist()
            length = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
            kept = ids[:length]
            text_ids = [t for t in kept if t not in stops]
            mean_logprob = float(logprobs[row, :length].mean()) if length else 0.0
            results.append({"text": self.tokenizer.decode(text_ids).strip(), "tokens": kept, "logprob": mean_logprob})
        return results

    def _stop_ids(self, stop_ids) -> tuple[int, ...]:
        """The stop tokens of a generation: the tokenizer's where none (None) are given."""
        return tuple(self.tokenizer.stop_ids) if stop_ids is None else stop_id_tuple(stop_ids)

    # -- checkpoints -----------------------------------------------------------------------------
    def save_pretrained(self, path) -> None:
        """Write `config.json`, `model.safetensors` and `tokenizer.json` into the folder `path` (`~` is the home
        folder, as for `from_pretrained`): a new folder appears whole; in an existing one those three files are
        replaced together (an interrupted save leaves the old ones, never a mix) and its other files are kept."""
        from .checkpoint import save_model_folder

        save_model_folder(self, path)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype: torch.dtype | None = None) -> "FusionModel":
        """Load a folder written by `save_pretrained` (it needs nothing but the folder); `"default"` is the
        default model that ships with fusion (a folder called so is `"./default"`), as in `fusion.pipeline`,
        `fusion eval` and a training config's `init_from`.

        `dtype`: the dtype of the loaded weights (e.g. `torch.bfloat16` halves the memory); None loads them in
        float32, whatever the file stores (the default model is stored in bf16 to halve its size)."""
        from .checkpoint import load_model_folder

        return load_model_folder(path, device=device, dtype=dtype)
