"""Saving and loading ``tokenizer.json``: one file, identical ids, stable special tokens."""
import json

import pytest

from tokenizer import SPECIAL_TOKENS, FusionTokenizer, ImagePlaceholder, TokenizerFileError

from .conftest import tiny_corpus

SAMPLE_TEXTS = ["The quick brown fox.", "日本語 🎉 e\u0301\r\n", "<|eot|> typed by a user", ""] + tiny_corpus()[:30]


def test_save_then_load_gives_identical_ids(tok, tmp_path):
    written = tok.save(tmp_path / "tokenizer.json")
    loaded = FusionTokenizer.load(written)
    assert len(loaded) == len(tok) and loaded.base_vocab_size == tok.base_vocab_size
    for text in SAMPLE_TEXTS:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text


def test_special_token_ids_are_stable_across_save_and_load(tok, tmp_path):
    loaded = FusionTokenizer.load(tok.save(tmp_path))
    assert loaded.special_token_ids == tok.special_token_ids
    for name in ("bos_id", "eos_id", "eot_id", "eom_id", "pad_id", "patch_id", "image_id", "video_start_id"):
        assert getattr(loaded, name) == getattr(tok, name)
    assert loaded.stop_ids == tok.stop_ids


def test_loaded_tokenizer_renders_conversations_identically(tok, tmp_path):
    loaded = FusionTokenizer.load(tok.save(tmp_path))
    messages = [{"role": "user", "content": "<image>What is <|eot|> this?"}, {"role": "assistant", "content": "A cat."}]
    images = [ImagePlaceholder(tokens_per_tile=4, grid=(2, 2))]
    a = tok.encode_conversation(messages, images=images)
    b = loaded.encode_conversation(messages, images=images)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)


def test_save_to_a_folder_writes_tokenizer_json_and_load_reads_the_folder(tok, tmp_path):
    folder = tmp_path / "checkpoint"
    written = tok.save(folder)
    assert written == folder / "tokenizer.json" and written.is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json"]  # no temporary left over
    assert FusionTokenizer.load(folder).special_token_ids == tok.special_token_ids


def test_the_file_holds_the_special_tokens_and_byte_level_settings(tok, tmp_path):
    data = json.loads(tok.save(tmp_path).read_text(encoding="utf-8"))
    added = {entry["content"]: entry for entry in data["added_tokens"]}
    for token in SPECIAL_TOKENS:
        assert added[token]["special"] is True and added[token]["id"] == tok.special_token_ids[token]
    assert data["normalizer"] is None
    assert data["decoder"]["type"] == "ByteLevel"
    byte_level = [p for p in data["pre_tokenizer"]["pretokenizers"] if p["type"] == "ByteLevel"]
    assert byte_level and byte_level[0]["add_prefix_space"] is False


def test_typed_special_strings_stay_text_after_loading(tok, tmp_path):
    # The "specials as text" switch is not stored in tokenizer.json; load must set it again.
    loaded = FusionTokenizer.load(tok.save(tmp_path))
    ids = loaded.encode("<|eot|><|patch|>")
    assert not set(ids) & set(loaded.special_token_ids.values())


def test_load_of_a_missing_file_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file at .*nowhere.*tokenizer.json"):
        FusionTokenizer.load(tmp_path / "nowhere")


def test_load_rejects_a_file_that_is_not_json(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("not json", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="not a readable tokenizer.json"):
        FusionTokenizer.load(bad)


def test_load_rejects_a_tokenizer_without_our_special_tokens(tok, tmp_path):
    data = json.loads(tok.save(tmp_path).read_text(encoding="utf-8"))
    data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["content"] != "<|video_end|>"]
    stripped = tmp_path / "stripped.json"
    stripped.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"stripped.json lacks these special tokens.*<\|video_end\|>"):
        FusionTokenizer.load(stripped)


def test_a_llama4_tokenizer_loads_with_its_own_ids_and_the_video_markers_on_fillers(tmp_path):
    """A Hugging Face Llama 4 checkpoint's tokenizer.json has every control token fusion uses but the video
    markers: `load` says to use `from_llama4`, which keeps every id of the file (control tokens included, no
    begin-of-text added by the file's post-processor) and gives the markers the last two filler ids; saved,
    it loads as fusion's own."""
    from tests.tiny_models import LLAMA4_CONTROL_TOKENS, llama4_style_tokenizer

    ids = llama4_style_tokenizer(tmp_path / "llama4", tiny_corpus())
    with pytest.raises(TokenizerFileError, match=r"<\|video_start\|>, <\|video_end\|>; it looks like a Llama 4 "
                                                 r"tokenizer: load it with FusionTokenizer.from_llama4"):
        FusionTokenizer.load(tmp_path / "llama4")
    tok = FusionTokenizer.from_llama4(tmp_path / "llama4")
    assert len(tok) == len(LLAMA4_CONTROL_TOKENS) + tok.base_vocab_size == max(ids.values()) + 1
    for token, token_id in ids.items():
        if token in SPECIAL_TOKENS:
            assert tok.special_token_ids[token] == token_id, token
    assert (tok.video_start_id, tok.video_end_id) == (ids["<|reserved_special_token_2|>"],
                                                      ids["<|reserved_special_token_3|>"])
    assert (tok.bos_id, tok.patch_id, tok.pad_id) == (ids["<|begin_of_text|>"], ids["<|patch|>"],
                                                      ids["<|finetune_right_pad|>"])
    for text in SAMPLE_TEXTS:
        assert tok.decode(tok.encode(text)) == text and tok.bos_id not in tok.encode(text)
    saved = FusionTokenizer.load(tok.save(tmp_path / "saved"))
    assert saved.special_token_ids == tok.special_token_ids == FusionTokenizer.from_llama4(tmp_path / "saved").special_token_ids
    assert saved.encode(SAMPLE_TEXTS[0]) == tok.encode(SAMPLE_TEXTS[0])

    data = json.loads((tmp_path / "llama4" / "tokenizer.json").read_text())
    # a file whose BPE vocabulary lists the control tokens too: the fillers are renamed there as well
    listed = {**data, "model": {**data["model"], "vocab": {**data["model"]["vocab"],
                                                          **{t["content"]: t["id"] for t in data["added_tokens"]}}}}
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "tokenizer.json").write_text(json.dumps(listed))
    renamed = FusionTokenizer.from_llama4(tmp_path / "listed")
    assert renamed.special_token_ids == tok.special_token_ids
    assert renamed.decode([renamed.video_start_id, renamed.video_end_id], skip_special_tokens=False) == \
        "<|video_start|><|video_end|>"
    saved_listed = json.loads(renamed.save(tmp_path / "listed_saved").read_text())
    assert "<|reserved_special_token_3|>" not in saved_listed["model"]["vocab"]
    assert saved_listed["model"]["vocab"]["<|video_end|>"] == ids["<|reserved_special_token_3|>"]

    data["added_tokens"] = [t for t in data["added_tokens"] if "reserved" not in t["content"]]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerFileError, match="not enough <.reserved_special_token_N.> tokens to give them; it is "
                                                 "not a Llama 4 tokenizer"):
        FusionTokenizer.from_llama4(tmp_path / "other")
