"""fusion.relevance on a tiny random model: the map's grid and range, the answer it explains, and that
it measures what the answer depends on (a token the model cannot read gets 0; the score is the
first-order change of the answer's log-probability)."""
import matplotlib
import numpy as np
import pytest
import torch

import fusion
from fusion.relevance import QUESTION_PROMPT, overlay_relevance, patch_relevance, token_grid_side
from tokenizer import FusionTokenizer
from vision import VisionEncoderConfig

TEXTS = [f"what color is the {s}? {c}" for c in ("red", "green", "blue") for s in ("circle", "square", "star")] * 8
QUESTION = "what color is the circle?"


def tiny_model(seed=0, max_tiles=1, dtype=torch.float32):
    torch.manual_seed(seed)
    tok = FusionTokenizer.train(TEXTS, vocab_size=280)
    config = fusion.FusionConfig(
        decoder=fusion.DecoderConfig(vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                     head_dim=16, intermediate_size=32, intermediate_size_mlp=48, num_experts=2,
                                     attention_chunk_size=128, initializer_range=0.1),
        vision=VisionEncoderConfig(image_size=32, patch_size=4, width=16, layers=1, heads=2),  # 8x8 patches
        adapter_hidden_size=32, max_tiles=max_tiles)
    return fusion.FusionModel(config, tok).to(dtype).eval()


def image(seed, size=(32, 32)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_map_is_the_token_grid_in_0_1_and_explains_the_greedy_answer(model):
    result = patch_relevance(model, image(1), QUESTION)
    assert token_grid_side(model) == model.vision.grid_size // 2 == 4  # 8x8 patches, pixel shuffle 0.5
    assert result["grid"] == (4, 4) and result["relevance"].shape == (4, 4)
    assert result["relevance"].dtype == np.float32
    assert result["relevance"].min() >= 0 and result["relevance"].max() == pytest.approx(1.0)
    assert np.allclose(result["relevance"], result["scores"] / result["scores"].max())
    [vqa] = fusion.pipeline("vqa", model=model)(image=image(1), question=QUESTION)  # the same greedy answer
    assert result["answer"] == vqa["answer"]
    assert result["logprob"] < 0


def test_a_given_answer_is_scored_as_training_renders_it(model):
    result = patch_relevance(model, image(2), QUESTION, answer=" red ")
    tok = model.tokenizer
    assert result["answer"] == " red " and result["answer_tokens"] == tok.encode("red") + [tok.eot_id]
    # the same sequence the training data gives, and its loss is the mean negative log-probability
    sample = model.processor([{"role": "user", "content": QUESTION_PROMPT.format(question=QUESTION)},
                              {"role": "assistant", "content": "red"}], [image(2)])
    with torch.no_grad():
        loss = model(sample.input_ids[None], pixel_values=sample.pixel_values, labels=sample.labels[None]).loss
    supervised = int((sample.labels != -100).sum())
    assert supervised == len(result["answer_tokens"])
    assert -result["logprob"] / supervised == pytest.approx(float(loss), rel=1e-4)


def test_inference_mode_is_named_as_what_stops_it(model):
    """The map is a gradient, which inference_mode forbids (torch's own error came from deep in the experts
    and did not say that); under no_grad it works."""
    with torch.inference_mode(), pytest.raises(ValueError, match=r"torch.inference_mode\(\) forbids"):
        patch_relevance(model, image(2), QUESTION, answer="red")
    with torch.no_grad():
        assert patch_relevance(model, image(2), QUESTION, answer="red")["relevance"].max() == 1


@pytest.mark.parametrize("row, col", [(1, 2), (3, 0)])
def test_only_the_token_the_model_can_read_is_relevant(model, monkeypatch, row, col):
    """Cut the gradient path of every image token but one (their values stay in the sequence, but the
    decoder reads them as constants): the map must be 1 at that token's grid cell and 0 elsewhere."""
    keep = row * 4 + col
    embed = model.embed

    def embed_reading_one_token(*args, **kwargs):
        embeds, image_mask = embed(*args, **kwargs)
        positions = image_mask[0].nonzero().flatten()
        frozen = positions[torch.arange(len(positions)) != keep]
        embeds = embeds.clone()
        embeds[0, frozen] = embeds[0, frozen].detach()
        return embeds, image_mask

    monkeypatch.setattr(model, "embed", embed_reading_one_token)
    result = patch_relevance(model, image(3), QUESTION, answer="blue")
    expected = np.zeros((4, 4), dtype=np.float32)
    expected[row, col] = 1
    assert np.array_equal(result["relevance"], expected)


def test_score_is_the_first_order_change_of_the_answer_logprob():
    """Scaling token k's embedding by (1 + eps) changes the log-probability by eps * (grad . x)_k."""
    model = tiny_model(seed=1, dtype=torch.float64)
    picture, answer = image(4), "green"
    result = patch_relevance(model, picture, QUESTION, answer=answer)
    top = int(np.argmax(result["scores"]))
    low = int(np.argmin(result["scores"]))

    def logprob_with_token_scaled(k, factor):
        def scale(module, inputs, output):
            output = output.clone()
            output[:, k] *= factor
            return output

        handle = model.adapter.register_forward_hook(scale)
        try:
            return patch_relevance(model, picture, QUESTION, answer=answer)["logprob"]
        finally:
            handle.remove()

    eps = 1e-2  # float32 inside the decoder (norms, softmax) limits how small eps can go
    for k in (top, low):
        change = (logprob_with_token_scaled(k, 1 + eps) - logprob_with_token_scaled(k, 1 - eps)) / (2 * eps)
        assert abs(change) == pytest.approx(result["scores"].reshape(-1)[k], rel=1e-2, abs=1e-6)
    assert result["scores"].reshape(-1)[top] > result["scores"].reshape(-1)[low]


def test_modes_are_restored_and_no_parameter_gradient_is_left(model):
    """On a training model: the map is made in eval mode (its gradient pass would otherwise count tokens into the
    experts' balance), and the modes come back."""
    expected = patch_relevance(model, image(5), QUESTION, answer="red")
    model.train()
    try:
        counts = [moe.tokens_per_expert.clone() for moe in model.decoder.moe_layers()]
        result = patch_relevance(model, image(5), QUESTION, answer="red")
        assert np.array_equal(result["scores"], expected["scores"])
        assert all(torch.equal(moe.tokens_per_expert, c) for moe, c in zip(model.decoder.moe_layers(), counts))
        assert all(m.training for m in model.modules())
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


def test_multi_tile_images_and_bad_questions_are_refused(model):
    tiled = tiny_model(max_tiles=4)
    with pytest.raises(ValueError, match="single-tile images only.*3 tiles"):
        patch_relevance(tiled, image(6, size=(32, 64)), QUESTION, answer="red")
    with pytest.raises(ValueError, match="non-empty"):
        patch_relevance(model, image(6), "  ")
    with pytest.raises(ValueError, match="marker"):
        patch_relevance(model, image(6), "<image>\nwhat color?")


def test_overlay_covers_the_tile_the_model_saw():
    heat = np.zeros((4, 4), dtype=np.float32)
    heat[0, 0] = 1.0
    jet = matplotlib.colormaps["jet"]
    hot, cold = (np.rint(np.asarray(jet(v)[:3]) * 255) for v in (1.0, 0.0))
    picture = np.full((20, 40, 3), 128, dtype=np.uint8)  # 40 wide, 20 high: padded at the bottom to 40x40
    covered = np.asarray(overlay_relevance(picture, heat, alpha=1.0))
    assert covered.shape == (20, 40, 3) and covered.dtype == np.uint8
    assert (covered[:10, :10] == hot).all() and (covered[10:, :] == cold).all() and (covered[:, 10:] == cold).all()
    blended = np.asarray(overlay_relevance(picture, {"relevance": heat}, alpha=0.5))
    assert np.abs(blended[15, 30].astype(float) - (0.5 * 128 + 0.5 * cold)).max() <= 1
    assert np.array_equal(np.asarray(overlay_relevance(picture, heat, alpha=0.0)), picture)
    with pytest.raises(ValueError, match="square"):
        overlay_relevance(picture, np.zeros((2, 3)))


def test_an_answer_that_is_not_text_is_named(model):
    """A count question's answer passed as the number 2 (or a bad max_new_tokens) is refused naming it, not with
    an AttributeError from inside (or "the answer has no tokens to explain")."""
    with pytest.raises(ValueError, match=r"answer must be the answer's text \(a str, e.g. '2'\).*got a int"):
        patch_relevance(model, image(7), "how many shapes are there?", answer=2)
    with pytest.raises(ValueError, match="max_new_tokens .* must be an int >= 1, got 0"):
        patch_relevance(model, image(7), QUESTION, max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens .* must be an int >= 1, got True"):
        patch_relevance(model, image(7), QUESTION, max_new_tokens=True)
