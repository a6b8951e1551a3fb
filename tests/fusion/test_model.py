"""The fused model: the splice, media order, batched generation, save/load, frozen parts."""
import json
import math
import os
import stat

import numpy as np
import pytest
import torch

import fusion
from fusion.data.collate import pad_batch, pack_batch
from fusion.errors import (CheckpointError, ConfigError, ConversationFormatError, ImageLoadError,
                           MediaCountMismatchError, PlaceholderMismatchError)
from tokenizer import FusionTokenizer
from tests.tiny_models import tiny_fusion_model
from vision import write_video

TEXTS = ["what color is the circle? red", "a blue square at the top left", "which way does it move? left",
         "describe the image. a green triangle", "how many shapes are there? 2"] * 40


@pytest.fixture(scope="module")
def tok():
    return FusionTokenizer.train(TEXTS, vocab_size=300)


def tiny_model(tok, seed=0, **decoder):
    return tiny_fusion_model(tok, seed, **decoder)


def image(seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)


def user(text):
    return [{"role": "user", "content": text}]


def test_image_features_land_exactly_at_the_patch_positions(tok):
    model = tiny_model(tok)
    sample = model.processor(user("<image>\nwhat color?") + [{"role": "assistant", "content": "red"}], [image(0)])
    batch = pad_batch([sample], tok.pad_id)
    embeds, mask = model.embed(batch.input_ids, batch.pixel_values)
    features = model.encode_images(batch.pixel_values).reshape(-1, 64)
    assert int(mask.sum()) == model.processor.tokens_per_tile == 4  # 32 px / patch 8 = 16 patches -> 4 after shuffle
    assert torch.equal(embeds[0][mask[0]], features)
    text = model.decoder.embed_tokens(batch.input_ids)
    assert torch.equal(embeds[0][~mask[0]], text[0][~mask[0]])  # every other position keeps its text embedding


def test_placeholder_mismatch_names_both_counts(tok):
    model = tiny_model(tok)
    sample = model.processor(user("<image> <image>\nsame?"), [image(0), image(1)], add_generation_prompt=True)
    batch = pad_batch([sample], tok.pad_id)
    with pytest.raises(PlaceholderMismatchError, match="8 <.patch.> placeholder tokens but 4 image features"):
        model.embed(batch.input_ids, batch.pixel_values[:1])
    with pytest.raises(PlaceholderMismatchError, match="but 0 image features"):
        model.embed(batch.input_ids, None)


def test_a_processor_or_saved_preprocessing_that_does_not_fit_the_tower_is_named(tok, tmp_path):
    """Placeholders per tile that the tower and adapter do not give (a processor built by hand, a config.json
    edited or written for another model) are an error, not features written at the wrong positions."""
    from fusion.processor import FusionProcessor

    model = tiny_model(tok)
    per_tile = model.processor.tokens_per_tile
    model.processor = FusionProcessor(tok, model.vision.image_processor(), tokens_per_tile=1)
    with pytest.raises(PlaceholderMismatchError, match=rf"give {per_tile} tokens per tile, but model.processor writes "
                                                       rf"1 <.patch.> placeholders per tile"):
        model.chat([user("<image>\nsame?")], images=[[image(0)]], max_new_tokens=1)
    tiny_model(tok).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["preprocessing"]["tokens_per_tile"] = 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"preprocessing \(tokens_per_tile 1, image_size 32\) does not fit its "
                                              rf"vision encoder and adapter \({per_tile} tokens per tile of 32 px\)"):
        fusion.FusionModel.from_pretrained(tmp_path / "m")
    config["preprocessing"]["tokens_per_tile"] = per_tile
    config["preprocessing"]["image_processor"]["image_size"] = 64  # tiles the tower was not built for
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"\(tokens_per_tile {per_tile}, image_size 64\) does not fit"):
        fusion.FusionModel.from_pretrained(tmp_path / "m")


def test_interleaved_images_and_video_follow_placeholder_order(tok, tmp_path):
    model = tiny_model(tok)
    frames = np.stack([image(10 + i) for i in range(3)])
    write_video(tmp_path / "v.mp4", frames, fps=3)
    a, b = image(1), image(2)
    sample = model.processor(user("first <image> then <video> and <image> last"), [a, b], [tmp_path / "v.mp4"],
                             add_generation_prompt=True, num_frames=3)
    assert sample.pixel_values.shape[0] == 1 + 3 + 1
    pa, _ = model.processor.image_processor(a)
    pb, _ = model.processor.image_processor(b)
    assert torch.equal(sample.pixel_values[0], pa[0]) and torch.equal(sample.pixel_values[4], pb[0])
    assert sample.frame_timestamps[0] == pytest.approx([0, 1 / 3, 2 / 3])  # index / fps
    text = tok.decode(sample.input_ids.tolist(), skip_special_tokens=False)
    assert text.index("<|image_start|>") < text.index("<|video_start|>")


def test_batched_generation_equals_one_by_one(tok):
    model = tiny_model(tok)
    convs = [user("<image>\nwhat color is the circle?"), user("describe the image."),
             user("<image> <image>\nhow many shapes are there?")]
    imgs = [[image(0)], [], [image(1), image(2)]]
    batched = model.chat(convs, imgs, max_new_tokens=8)
    for conv, im, out in zip(convs, imgs, batched):
        single = model.chat([conv], [im], max_new_tokens=8)[0]
        assert single["tokens"] == out["tokens"]
        assert single["logprob"] == pytest.approx(out["logprob"], abs=1e-4)


def test_chat_names_a_batch_given_in_the_wrong_shape(tok):
    """chat takes a list of conversations and one list of media per conversation; the usual slips (one
    conversation, media not nested, a count that does not match) are named instead of zipped away."""
    model = tiny_model(tok)
    conv = user("<image>\nwhat color is the circle?")
    with pytest.raises(ConversationFormatError, match=r"for one conversation pass \[conversation\]"):
        model.chat(conv, [[image(0)]], max_new_tokens=2)
    with pytest.raises(MediaCountMismatchError, match=r"images must hold one list per conversation \(2\), got 1"):
        model.chat([conv, conv], [[image(0)]], max_new_tokens=2)
    with pytest.raises(ImageLoadError, match=r"images must be a list .* got a ndarray: pass \[image\] for one"):
        model.chat([conv], [image(0)], max_new_tokens=2)
    assert len(model.chat([conv, conv], [[image(0)], [image(1)]], max_new_tokens=2)) == 2


def test_generate_takes_lists_of_ids_and_none_stop_ids_means_the_tokenizers(tok):
    """model.generate accepts lists of token ids (left-padded for it), like fusion.generation.generate; a
    `stop_ids=None` passed through (e.g. from a pipeline's generate_kwargs) means the tokenizer's stop tokens,
    `stop_ids=()` never stops early; chat([]) answers nothing."""
    model = tiny_model(tok)
    prompts = [tok.encode("what color is the circle?"), tok.encode("describe")]
    ids, mask = fusion.generation.left_pad(prompts, tok.pad_id)
    from_tensor = model.generate(ids, attention_mask=mask, max_new_tokens=6, stop_ids=())
    assert torch.equal(model.generate(prompts, max_new_tokens=6, stop_ids=()), from_tensor)
    assert torch.equal(model.generate(prompts, max_new_tokens=6, stop_ids=None), model.generate(prompts, max_new_tokens=6))
    with pytest.raises(ValueError, match="leave attention_mask out"):
        model.generate(prompts, attention_mask=mask, max_new_tokens=2)
    conv = [user("<image>\nwhat color is the circle?")]
    assert model.chat(conv, [[image(0)]], max_new_tokens=4, stop_ids=None) == model.chat(conv, [[image(0)]], max_new_tokens=4)
    assert model.chat([], max_new_tokens=4) == []


def test_stop_ids_in_any_integer_form_cut_the_answer_and_its_score_alike(tok):
    """stop_ids as an int, a tensor, numpy or a generator: chat stops each row at the same token and scores it
    over the same tokens as with a list (a tensor's elements or a spent generator matched no token, so the
    row kept its padding, whose log-probabilities of 0 raised the score in a batch)."""
    import numpy as np

    model = tiny_model(tok)
    convs = [user("<image>\nwhat color is the circle?"), user("<image>\ndescribe the picture")]
    media = [[image(0)], [image(1)]]
    free = model.chat(convs, media, max_new_tokens=6, stop_ids=())
    stop = free[0]["tokens"][1]
    expected = model.chat(convs, media, max_new_tokens=6, stop_ids=[stop])
    assert expected[0]["tokens"] == free[0]["tokens"][:2]
    for form in (stop, torch.tensor([stop]), torch.tensor(stop), np.array([stop]), (t for t in [stop])):
        assert model.chat(convs, media, max_new_tokens=6, stop_ids=form) == expected, type(form)
    with pytest.raises(ValueError, match=r"stop_ids must be integer token ids, got 1.5"):
        model.chat(convs, media, max_new_tokens=2, stop_ids=[1.5])
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, tokens\], got shape \(3,\)"):
        model.generate(torch.tensor([1, 2, 3]), max_new_tokens=2)


def test_a_chat_answers_score_is_the_mean_log_probability_of_its_own_tokens(tok):
    """`logprob` (a pipeline's score is its exp) is the mean log-probability the model gives each answer
    token, the stop token included, computed here by one teacher-forced forward over prompt + answer; a row
    that stops before the others in a batch is scored over its own tokens only."""
    model = tiny_model(tok)
    convs = [user("<image>\nwhat color is the circle?"), user("<image>\ndescribe the picture")]
    media = [[image(0)], [image(1)]]
    free = model.chat(convs, media, max_new_tokens=6, stop_ids=())
    stop = free[0]["tokens"][1]  # row 0 stops after two tokens, row 1 runs on (or stops where it emits it)
    answers = model.chat(convs, media, max_new_tokens=6, stop_ids=[stop])
    assert len(answers[0]["tokens"]) == 2 and len(answers[1]["tokens"]) > 2
    for conv, images, answer in zip(convs, media, answers):
        prompt = model.processor(conv, images, add_generation_prompt=True)
        ids = torch.cat([prompt.input_ids, torch.tensor(answer["tokens"])])[None]
        with torch.no_grad():
            logits = model(ids, pixel_values=prompt.pixel_values).logits[0].float()
        n = len(answer["tokens"])
        logprobs = logits[-n - 1:-1].log_softmax(-1).gather(1, ids[0, -n:, None])[:, 0]
        assert answer["logprob"] == pytest.approx(float(logprobs.mean()), abs=1e-5)


def test_cached_generation_equals_full_forward(tok):
    model = tiny_model(tok)
    sample = model.processor(user("<image>\nwhat color is the circle?"), [image(3)], add_generation_prompt=True)
    batch = pad_batch([sample], tok.pad_id, padding_side="left")
    new = model.generate(batch.input_ids, pixel_values=batch.pixel_values, max_new_tokens=12, stop_ids=[])[0]
    ids = torch.cat([batch.input_ids[0], new])[None]
    with torch.no_grad():
        logits = model(ids, pixel_values=batch.pixel_values).logits[0]
    greedy = logits[len(sample.input_ids) - 1:-1].argmax(-1)
    assert greedy.tolist() == new.tolist()


def test_loss_ignores_padding_and_unsupervised_tokens(tok):
    model = tiny_model(tok)
    short = model.processor(user("<image>\nwhat color?") + [{"role": "assistant", "content": "red"}], [image(0)])
    long = model.processor(user("<image>\nhow many shapes are there?") + [{"role": "assistant", "content": "2"}],
                           [image(1)])
    batch = pad_batch([short, long], tok.pad_id)
    both = model(**batch.model_inputs()).loss
    # the same mean over the same supervised tokens computed one sample at a time
    losses, counts = [], []
    for s in (short, long):
        one = pad_batch([s], tok.pad_id)
        losses.append(model(**one.model_inputs()).loss)
        counts.append(int((s.labels[1:] != -100).sum()))
    expected = sum(l * c for l, c in zip(losses, counts)) / sum(counts)
    assert both.item() == pytest.approx(expected.item(), rel=1e-5)


def test_packed_batch_equals_padded_batch(tok):
    model = tiny_model(tok)
    samples = [model.processor(user(f"<image>\n{q}") + [{"role": "assistant", "content": a}], [image(i)])
               for i, (q, a) in enumerate([("what color?", "red"), ("how many?", "3"), ("which way?", "left")])]
    padded = model(**pad_batch(samples, tok.pad_id).model_inputs()).loss
    packed = model(**pack_batch(samples, tok.pad_id, max_length=1000).model_inputs()).loss
    assert packed.item() == pytest.approx(padded.item(), rel=1e-5)


def test_save_and_load_give_identical_outputs(tok, tmp_path):
    model = tiny_model(tok)
    model.decoder.moe_layers()[0].expert_bias[1] = 0.25  # learned balancing state is saved too
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["format_version"] == 1 and config["preprocessing"]["image_processor"]["image_size"] == 32
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded = fusion.FusionModel.from_pretrained(tmp_path / "m")
    conv = [user("<image>\nwhat color is the circle?")]
    assert loaded.chat(conv, [[image(5)]], max_new_tokens=10) == model.chat(conv, [[image(5)]], max_new_tokens=10)
    sample = model.processor(conv[0], [image(5)], add_generation_prompt=True)
    batch = pad_batch([sample], tok.pad_id)
    with torch.no_grad():
        assert torch.equal(model(**batch.model_inputs()).logits, loaded(**batch.model_inputs()).logits)


def test_image_position_embedding_is_an_adapter_weight_that_saves_and_loads(tok, tmp_path):
    model = tiny_model(tok, image_position_embedding=True)
    embedding = model.adapter.position_embedding
    assert embedding.shape == (model.processor.tokens_per_tile, model.config.decoder.hidden_size)
    assert any(p is embedding for p in model.parts()["adapter"].parameters())  # trained (or frozen) with the adapter
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["image_position_embedding"] == "per_token"
    loaded = fusion.FusionModel.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.adapter.position_embedding, embedding)
    sample = model.processor(user("<image>\nwhere is the circle?"), [image(5)], add_generation_prompt=True)
    batch = pad_batch([sample], tok.pad_id)
    with torch.no_grad():
        assert torch.equal(model(**batch.model_inputs()).logits, loaded(**batch.model_inputs()).logits)
        model.adapter.position_embedding.zero_()  # the embedding reaches the logits
        assert not torch.equal(model(**batch.model_inputs()).logits, loaded(**batch.model_inputs()).logits)
    old = model.config.to_dict()
    del old["image_position_embedding"]  # folders written before the option existed load without it
    assert fusion.FusionConfig.from_dict(old).image_position_embedding is False


def test_rows_cols_image_position_embedding_saves_and_loads(tok, tmp_path):
    model = tiny_model(tok, image_position_embedding="rows_cols")
    side = math.isqrt(model.processor.tokens_per_tile)
    assert model.adapter.position_rows.shape == (side, model.config.decoder.hidden_size)
    assert model.adapter.position_embedding is None
    model.save_pretrained(tmp_path / "m")
    loaded = fusion.FusionModel.from_pretrained(tmp_path / "m")
    assert loaded.config.image_position_embedding == "rows_cols"
    assert torch.equal(loaded.adapter.token_positions(), model.adapter.token_positions())
    with pytest.raises(ConfigError, match="image_position_embedding must be false or one of"):
        fusion.FusionConfig(image_position_embedding="rows")
    assert fusion.FusionConfig(image_position_embedding=True).image_position_embedding == "per_token"


def test_broken_or_missing_folders_are_named(tok, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        fusion.FusionModel.from_pretrained(tmp_path / "nope")
    tiny_model(tok).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json missing"):
        fusion.FusionModel.from_pretrained(tmp_path / "m")
    tiny_model(tok).save_pretrained(tmp_path / "m2")
    config = json.loads((tmp_path / "m2" / "config.json").read_text())
    config["format_version"] = 99
    (tmp_path / "m2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format version 99"):
        fusion.FusionModel.from_pretrained(tmp_path / "m2")


def test_a_crash_while_saving_leaves_the_old_folder_intact(tok, tmp_path, monkeypatch):
    model = tiny_model(tok)
    model.save_pretrained(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model.tokenizer, "save", crash)  # the last file written
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left behind
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_saving_into_a_folder_keeps_its_other_files(tok, tmp_path, monkeypatch):
    """save_pretrained into a folder that holds other things (notes, logs, a subfolder) replaces the model's
    three files and nothing else; "." works too."""
    folder = tmp_path / "m"
    (folder / "logs").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "logs" / "train.jsonl").write_text("{}\n")
    tiny_model(tok, seed=0).save_pretrained(folder)
    second = tiny_model(tok, seed=1)
    second.save_pretrained(folder)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "logs" / "train.jsonl").read_text() == "{}\n"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "logs", "model.safetensors", "notes.txt",
                                                         "tokenizer.json"]
    loaded = fusion.FusionModel.from_pretrained(folder)
    for (name, a), b in zip(loaded.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    monkeypatch.chdir(folder)
    second.save_pretrained(".")
    assert fusion.FusionModel.from_pretrained(".").config == second.config
    assert (folder / "notes.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match="it is a file"):
        second.save_pretrained(folder / "notes.txt")


@pytest.mark.parametrize("damage", ["unknown decoder key", "vocabulary smaller than the tokenizer's",
                                    "unknown image setting"])
def test_a_config_json_this_version_cannot_use_is_a_checkpoint_error_naming_it(tok, tmp_path, damage):
    tiny_model(tok).save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    if damage == "unknown decoder key":
        config["decoder"]["moe_capacity"] = 2
    elif damage == "unknown image setting":
        config["preprocessing"]["image_processor"]["sharpen"] = True
    else:
        config["decoder"]["vocab_size"] = 10
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json"):
        fusion.FusionModel.from_pretrained(tmp_path / "m")


def test_model_settings_out_of_their_range_are_named_when_the_config_is_made(tok, tmp_path):
    """A 0-wide adapter, a model sampling 0 frames per video or a non-boolean pad_with_mean built (the frames'
    error came only at each video, which a training run skips as a bad sample); a saved config.json with such
    a setting (here 0 kv heads: a ZeroDivisionError) is a CheckpointError naming the file."""
    with pytest.raises(ConfigError, match=r"adapter_hidden_size must be a whole number >= 1, or None .*got 0"):
        fusion.FusionConfig(adapter_hidden_size=0)
    with pytest.raises(ConfigError, match=r"pad_with_mean must be true or false, got 'no'"):
        fusion.FusionConfig(pad_with_mean="no")
    for video, says in (({"num_frames": 0}, "num_frames must be an integer >= 1, got 0"),
                        ({"fps": -1.0}, "fps must be a positive number"),
                        ({"max_frames": 2.5}, "max_frames must be an integer >= 1, got 2.5")):
        with pytest.raises(ValueError, match=f"VideoSettings: {says}"):
            fusion.FusionConfig(video=video)
    assert fusion.FusionConfig(adapter_hidden_size=None, video={"fps": 2.0}).video.fps == 2.0
    tiny_model(tok).save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["decoder"]["num_kv_heads"] = 0
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json.*num_kv_heads must be a whole number >= 1"):
        fusion.FusionModel.from_pretrained(tmp_path / "m")


def test_frozen_vision_builds_no_graph(tok):
    model = tiny_model(tok).train()
    model.vision.requires_grad_(False)
    sample = model.processor(user("<image>\nwhat color?") + [{"role": "assistant", "content": "red"}], [image(0)])
    batch = pad_batch([sample], tok.pad_id)
    tower_outputs = []
    model.vision.register_forward_hook(lambda module, args, out: tower_outputs.append(out))
    features = model.encode_images(batch.pixel_values)
    assert tower_outputs[0].grad_fn is None and not tower_outputs[0].requires_grad  # no graph through the tower
    assert features.requires_grad  # the adapter still trains
    loss = model(**batch.model_inputs()).loss
    loss.backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert model.adapter.fc1.weight.grad is not None


def test_shared_prefix_sample_equals_its_separate_samples(tok):
    """One image, three questions as branches of one sample: the same loss and the same answer logits
    as the three samples run separately (the image encoded once instead of three times)."""
    from fusion.data.collate import share_prefix

    model = tiny_model(tok)
    qa = [("what color is the circle?", "red"), ("how many shapes are there?", "3"), ("is there a square?", "no")]
    samples = [model.processor(user(f"<image>\n{q}") + [{"role": "assistant", "content": a}], [image(7)])
               for q, a in qa]
    shared = share_prefix(samples, tok.patch_id)
    assert shared.pixel_values.shape[0] == 1
    assert len(shared.input_ids) < sum(len(s.input_ids) for s in samples)
    separate = model(**pad_batch(samples, tok.pad_id).model_inputs())
    branched = model(**pad_batch([shared], tok.pad_id).model_inputs())
    assert branched.loss.item() == pytest.approx(separate.loss.item(), rel=1e-5)
    prefix = int((shared.branch_ids == 0).sum())
    for k, s in enumerate(samples, start=1):
        rows = (shared.branch_ids == k).nonzero()[:, 0]
        expected = separate.logits[k - 1, prefix:len(s.input_ids)]
        assert (branched.logits[0, rows] - expected).abs().max().item() <= 1e-4
    packed = model(**pack_batch([shared, samples[0]], tok.pad_id, max_length=1000).model_inputs())
    both = model(**pad_batch(samples + [samples[0]], tok.pad_id).model_inputs())
    assert packed.loss.item() == pytest.approx(both.loss.item(), rel=1e-5)


def test_a_long_shared_prefix_sample_split_into_rows_gives_the_same_loss_and_gradients(tok):
    """split_branches: the prefix repeated in each row, every branch in exactly one row, the same summed
    loss and the same gradients (the image encoded once per row)."""
    from fusion.data.collate import share_prefix, split_branches
    from fusion.training_step import supervised_loss_sum

    torch.manual_seed(0)
    model = tiny_model(tok)
    qa = [("what color is the circle?", "red"), ("how many shapes are there?", "3"), ("is there a square?", "no"),
          ("where is the circle?", "top left"), ("what shape is red?", "circle")]
    samples = [model.processor(user(f"<image>\n{q}") + [{"role": "assistant", "content": a}], [image(3)],
                               sample_id=f"q{k}") for k, (q, a) in enumerate(qa)]
    shared = share_prefix(samples, tok.patch_id)
    prefix = int((shared.branch_ids == 0).sum())
    limit = prefix + (len(shared.input_ids) - prefix) // 2
    rows = split_branches(shared, limit, tok.patch_id)
    assert len(rows) >= 2 and all(len(r.input_ids) <= limit for r in rows)
    assert [i for r in rows for i in r.sample_id] == ["q0", "q1", "q2", "q3", "q4"]
    assert sorted(int(b) for r in rows for b in r.branch_ids.unique() if b > 0) == [1, 2, 3, 4, 5]
    assert all(torch.equal(r.input_ids[:prefix], shared.input_ids[:prefix]) for r in rows)
    assert split_branches(shared, len(shared.input_ids), tok.patch_id) == [shared]
    assert split_branches(samples[0], 1, tok.patch_id) == [samples[0]]  # no branches: nothing to split

    def loss_and_grads(batch_samples):
        model.zero_grad()
        batch = pad_batch(batch_samples, tok.pad_id)
        inputs = batch.model_inputs()
        _, loss, count = supervised_loss_sum(model, inputs, inputs.pop("labels"))
        loss.backward()
        return loss.item(), int(count), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole_loss, whole_count, whole_grads = loss_and_grads([shared])
    split_loss, split_count, split_grads = loss_and_grads(rows)
    assert split_count == whole_count
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    assert whole_grads.keys() == split_grads.keys()
    for name, grad in whole_grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name)


def test_saved_folders_are_readable_by_others_as_the_umask_allows(tok, tmp_path):
    old = os.umask(0o022)
    try:
        tiny_model(tok).save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755  # not the 0o700 of a temporary folder
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()} == {0o644}


def test_from_pretrained_default_is_the_shipped_model_as_in_pipelines(tmp_path, monkeypatch):
    """"default" names the shipped model in from_pretrained too (as in pipeline, fusion eval, init_from);
    a folder called so is reached as ./default."""
    from fusion.checkpoint import default_model_location

    model = fusion.FusionModel.from_pretrained("default")
    shipped = fusion.FusionModel.from_pretrained(str(default_model_location()))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), shipped.state_dict().values()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(fusion.errors.CheckpointError, match="default"):
        fusion.FusionModel.from_pretrained("./default")


def test_a_videos_frames_keep_their_order_in_the_pixel_values(tok):
    """A video's frames reach the model in time order: tile 1 + i of "<image> <video>" is frame i as the
    frame processor makes it (a reversed or shuffled clip would turn "moves left" into "moves right")."""
    model = tiny_model(tok, num_frames=4)
    frames = np.stack([image(20 + i) for i in range(4)])  # four distinct frames
    sample = model.processor(user("<image> then <video>"), [image(1)], [(frames, [0.0, 0.5, 1.0, 1.5])],
                             add_generation_prompt=True)
    assert sample.pixel_values.shape[0] == 1 + 4
    for i, frame in enumerate(frames):
        expected, _ = model.processor.frame_processor(frame)
        assert torch.equal(sample.pixel_values[1 + i], expected[0]), f"frame {i}"
    assert not torch.equal(sample.pixel_values[1], sample.pixel_values[4])
    assert sample.frame_timestamps == [[0.0, 0.5, 1.0, 1.5]]


def test_one_kind_of_media_from_typed_parts_and_the_other_from_its_list(tok):
    """As in a dataset record, each kind is read on its own: images carried by their parts, the video given
    in `videos` (the two ways give the same inputs as passing both lists)."""
    model = tiny_model(tok)
    a, frames = image(1), (np.stack([image(5), image(6)]), [0.0, 0.5])
    parts = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "video"},
                                          {"type": "text", "text": "what moves?"}]}]
    markers = [{"role": "user", "content": [{"type": "image"}, {"type": "video"},
                                            {"type": "text", "text": "what moves?"}]}]
    expected = model.processor(markers, [a], [frames], add_generation_prompt=True)
    for given in (model.processor(parts, videos=[frames], add_generation_prompt=True),
                  model.processor(parts, None, [frames], add_generation_prompt=True)):
        assert torch.equal(given.input_ids, expected.input_ids)
        assert torch.equal(given.pixel_values, expected.pixel_values) and given.pixel_values.shape[0] == 3
    answer = model.chat([parts], videos=[[frames]], max_new_tokens=2)
    assert answer == model.chat([markers], images=[[a]], videos=[[frames]], max_new_tokens=2)


def test_none_media_mean_none_for_the_processor_and_for_one_conversation_of_a_chat(tok):
    model = tiny_model(tok)
    text_only = user("how many shapes?")
    assert torch.equal(model.processor(text_only, None, None, add_generation_prompt=True).input_ids,
                       model.processor(text_only, add_generation_prompt=True).input_ids)
    with_image = user("<image>\nwhat color?")
    batched = model.chat([with_image, text_only], images=[[image(0)], None], max_new_tokens=2)
    assert batched == model.chat([with_image, text_only], images=[[image(0)], []], max_new_tokens=2)
    media = model.processor.process_media(None, None)
    assert (media.image_placeholders, media.video_placeholders, media.timestamps) == ([], [], [])


def test_an_image_part_without_its_image_among_parts_with_theirs_is_named(tok):
    model = tiny_model(tok)
    parts = [{"role": "user", "content": [{"type": "image", "image": image(0)}, {"type": "image"},
                                          {"type": "text", "text": "same?"}]}]
    with pytest.raises(MediaCountMismatchError, match=r"sample 's7': image part\(s\) \[2\].*carry no image"):
        model.processor(parts, add_generation_prompt=True, sample_id="s7")


def test_video_frames_follow_the_image_settings_a_saved_model_keeps(tok, tmp_path):
    """Frames are normalised and padded with the image processor's settings as they are when processed,
    which are the ones save_pretrained writes: a changed setting gives the same frames before and after a reload."""
    model = tiny_model(tok)
    model.processor.image_processor.pad_with_mean = False  # pad with black, as Llama 4
    frames = (np.stack([image(3)[:16], image(4)[:16]]), [0.0, 1.0])  # 16x32 frames: half of each tile is padding
    conversation = user("<video>\nwhat moves?")
    before = model.processor(conversation, videos=[frames], add_generation_prompt=True).pixel_values
    model.save_pretrained(tmp_path / "m")
    after = fusion.FusionModel.from_pretrained(tmp_path / "m").processor(
        conversation, videos=[frames], add_generation_prompt=True).pixel_values
    black = -torch.tensor(model.processor.image_processor.mean) / torch.tensor(model.processor.image_processor.std)
    assert torch.allclose(before[:, :, 16:], black.view(1, 3, 1, 1).expand(2, 3, 16, 32))
    assert torch.equal(before, after)
