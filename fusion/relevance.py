"""Where does the model look? A relevance map over the image tokens for one answer.

    from fusion.relevance import patch_relevance, overlay_relevance
    result = patch_relevance(model, "shapes.png", "What color is the circle?")
    result["answer"], result["relevance"]            # "red", float array [4, 4] in [0, 1]
    overlay_relevance("shapes.png", result)          # PIL image: the heatmap over the picture

The map is gradient x input on the image tokens: the question is rendered exactly as the VQA
pipeline and the training data ask it (``"<image>\\n{question}"``), followed by the answer as an
assistant turn. The score is the answer's log-probability (the sum over its tokens and the
end-of-turn token that closes it, as the training loss supervises them). Its gradient with respect to
the image-token embeddings that the model writes into the sequence (the adapter's output, at the
``<|patch|>`` positions) is multiplied by those embeddings, summed over channels, taken in absolute
value and divided by its largest value: 1 is the most relevant token, 0 a token the answer does not
depend on (to first order).

Each image token is one cell of the tower's patch grid after pixel shuffle (`model.vision.grid_size`
patches per side, merged ``1/ratio`` x ``1/ratio`` by the adapter: 6x6 patches -> 3x3 tokens for the
default model), in row-major order, so the map is that grid. Only single-tile images are supported
(a model with ``max_tiles=1``, or an image that fits one tile).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tokenizer import IMAGE_MARKER
from vision import load_image

from .model import eval_mode

__all__ = ["patch_relevance", "overlay_relevance", "token_grid_side", "QUESTION_PROMPT"]

#: how a question is asked: the shapes-world training data and the VQA pipeline use this template
QUESTION_PROMPT = f"{IMAGE_MARKER}\n{{question}}"


def token_grid_side(model) -> int:
    """Image tokens per side of one tile: the tower's patch grid side divided by the pixel shuffle block."""
    factor = round(1 / model.adapter.ratio)
    side = model.vision.grid_size // factor
    if side * side != model.processor.tokens_per_tile:
        raise ValueError(f"patch_relevance: the tower's {model.vision.grid_size}x{model.vision.grid_size} patch "
                         f"grid with pixel shuffle ratio {model.adapter.ratio} gives {side}x{side} tokens, but the "
                         f"processor writes {model.processor.tokens_per_tile} per tile")
    return side


def _answer_ids(model, answer: str) -> list[int]:
    tokenizer = model.tokenizer
    return tokenizer.encode(answer.strip()) + [tokenizer.eot_id]


def patch_relevance(model, image, question: str, answer: str | None = None, *, max_new_tokens: int = 16) -> dict:
    """Relevance of each image token for `answer` to `question` about `image` (see the module docstring).

    Args:
        model: a `fusion.FusionModel` (its train/eval modes are restored afterwards; no parameter
            gradient is stored).
        image: a path, PIL image, numpy array or tensor (anything `vision.load_image` reads).
        question: the question, as a user would type it (without the ``<image>`` marker).
        answer: the answer to explain; None: the model's own greedy answer (`model.chat`).
        max_new_tokens: the most tokens of the greedy answer.

    Returns:
        a dict with
        ``relevance``: float32 array [side, side] in [0, 1], row-major over the image (row 0 at the top),
        ``scores``: the same before normalisation (|gradient x input| summed over channels),
        ``answer``: the answer explained (str), ``answer_tokens``: its token ids (with the closing
        end-of-turn token when it has one), ``logprob``: its log-probability (sum over those tokens),
        ``question``: the question, ``grid``: ``(side, side)``.

    Raises:
        ValueError: the image takes more than one tile, the question is empty or has a media marker, the
            answer is not a str (or None), max_new_tokens is not an int >= 1, or it is called under
            ``torch.inference_mode()`` (which forbids the gradient it needs; ``no_grad`` is fine).
    """
    if torch.is_inference_mode_enabled():
        raise ValueError("patch_relevance differentiates the answer's log-probability, which torch.inference_mode() "
                         "forbids; call it outside inference_mode (under torch.no_grad() is fine)")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"patch_relevance: question must be a non-empty str, got {question!r}")
    if IMAGE_MARKER in question or "<video>" in question:
        raise ValueError(f"patch_relevance: leave the media marker out of the question {question!r}; "
                         f"the image is placed before it")
    if answer is not None and not isinstance(answer, str):
        raise ValueError(f"patch_relevance: answer must be the answer's text (a str, e.g. {str(answer)!r}) or None "
                         f"for the model's own answer, got a {type(answer).__name__}: {answer!r}")
    if answer is None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                           or max_new_tokens < 1):
        raise ValueError(f"patch_relevance: max_new_tokens (the most tokens of the model's own answer) must be an "
                         f"int >= 1, got {max_new_tokens!r}")
    side = token_grid_side(model)
    picture = load_image(image)
    conversation = [{"role": "user", "content": QUESTION_PROMPT.format(question=question.strip())}]
    prompt = model.processor(conversation, [picture], add_generation_prompt=True)
    tiles = prompt.pixel_values.shape[0]
    if tiles != 1:
        raise ValueError(f"patch_relevance works on single-tile images only, but this {picture.width}x{picture.height} "
                         f"image becomes {tiles} tiles (the model tiles images up to max_tiles="
                         f"{model.config.max_tiles}); resize it to at most {model.vision.image_size} pixels per "
                         f"side, or use a model with max_tiles=1")

    with eval_mode(model):
        if answer is None:
            generated = model.chat([conversation], [[picture]], max_new_tokens=max_new_tokens, do_sample=False)[0]
            answer, answer_tokens = generated["text"], list(generated["tokens"])
        else:
            answer_tokens = _answer_ids(model, answer)
        if not answer_tokens:
            raise ValueError("patch_relevance: the answer has no tokens to explain")
        scores, logprob = _gradient_x_input(model, prompt, answer_tokens)

    scores = scores.reshape(side, side)
    top = float(scores.max())
    relevance = scores / top if top > 0 else np.zeros_like(scores)
    return {"relevance": relevance.astype(np.float32), "scores": scores.astype(np.float32), "answer": answer,
            "answer_tokens": answer_tokens, "logprob": logprob, "question": question, "grid": (side, side)}


def _gradient_x_input(model, prompt, answer_tokens: list[int]) -> tuple[np.ndarray, float]:
    """|d logprob(answer) / d image tokens * image tokens| summed over channels -> [tokens] float64."""
    input_ids = torch.cat([prompt.input_ids, torch.tensor(answer_tokens, dtype=torch.long)])[None]  # [1, T]
    captured = {}

    def make_leaf(module, inputs, output):
        # The adapter's output is what the splice writes at the <|patch|> positions: make it the
        # tensor we differentiate with respect to (whatever the vision parts' requires_grad).
        leaf = output.detach().requires_grad_(True)
        captured["tokens"] = leaf
        return leaf

    handle = model.adapter.register_forward_hook(make_leaf)
    try:
        with torch.enable_grad():
            out = model(input_ids, pixel_values=prompt.pixel_values)
            logits = out.logits[0, -len(answer_tokens) - 1:-1]  # the positions that predict the answer
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            targets = input_ids[0, -len(answer_tokens):].to(logits.device)
            logprob = F.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).sum()
            tokens = captured["tokens"]
            (grad,) = torch.autograd.grad(logprob, tokens)
    finally:
        handle.remove()
    scores = (grad.double() * tokens.detach().double()).sum(-1).abs().reshape(-1)  # [tokens]
    return scores.cpu().numpy(), float(logprob.detach())


def overlay_relevance(image, relevance, alpha: float = 0.55, cmap: str = "jet", smooth: bool = False) -> Image.Image:
    """The relevance map drawn over `image`, as an RGB PIL image of the image's size.

    Args:
        image: anything `vision.load_image` reads (the image given to `patch_relevance`).
        relevance: the [side, side] map in [0, 1], or the dict `patch_relevance` returns.
        alpha: how strongly the colours cover the picture (0: the picture only, 1: the map only).
        cmap: a matplotlib colormap name ("jet": blue = irrelevant, red = most relevant).
        smooth: bilinear upsampling; default: nearest, one flat block per token.

    The map covers the tile the model saw: the image is resized to fit the tile and padded at the
    bottom/right, so a non-square image is covered by the top-left part of the map's square.

    `np.asarray(overlay_relevance(...))` gives the uint8 [H, W, 3] array.
    """
    import matplotlib

    if isinstance(relevance, dict):
        relevance = relevance["relevance"]
    relevance = np.asarray(relevance, dtype=np.float32)
    if relevance.ndim != 2 or relevance.shape[0] != relevance.shape[1]:
        raise ValueError(f"overlay_relevance: expected a square [side, side] map, got shape {relevance.shape}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"overlay_relevance: alpha must be in [0, 1], got {alpha}")
    picture = load_image(image)
    width, height = picture.size
    canvas = max(width, height)  # the square the tile covers, in the image's pixels
    heat = Image.fromarray(np.clip(relevance, 0, 1))  # mode "F"
    heat = heat.resize((canvas, canvas), Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST)
    heat = np.asarray(heat)[:height, :width]
    colours = matplotlib.colormaps[cmap](heat)[..., :3]  # [H, W, 3] in [0, 1]
    base = np.asarray(picture, dtype=np.float32) / 255.0
    mixed = (1 - alpha) * base + alpha * colours
    return Image.fromarray(np.clip(np.rint(mixed * 255), 0, 255).astype(np.uint8))
