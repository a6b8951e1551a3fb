"""Byte-level BPE: training, sizes, and lossless round trips of any Unicode text."""
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as hs
from tokenizers import pre_tokenizers

from tokenizer import SPECIAL_TOKENS, FusionTokenizer, TokenizerError

from .conftest import TINY_VOCAB_SIZE, tiny_corpus

# Any text Python can encode as UTF-8: everything except lone surrogates (category Cs).
unicode_text = hs.text(alphabet=hs.characters(exclude_categories=("Cs",)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(text=unicode_text)
@example(text="")
@example(text="👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷")  # ZWJ sequences, flags
@example(text="中文，日本語、한국어")
@example(text="e\u0301 a\u0308\u0323 Z\u0335\u0321")  # combining marks, never normalised
@example(text="\x00\x01\x1b[0m\x7f\u200b\ufeff")  # control chars, zero-width, BOM
@example(text="line\r\nline\rline\n\n\t  trailing  ")
@example(text="  leading spaces")
@example(text="<|eot|><|patch|><image>")
@example(text="\U0010ffff\U000e0001")
def test_decode_of_encode_is_identity(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_encoding_is_compressed_by_training(tok):
    text = "What is in this image? The quick brown fox."
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2


def test_all_256_bytes_are_in_the_base_vocabulary(tok):
    vocab = tok._bpe.get_vocab(with_added_tokens=False)
    for byte_char in pre_tokenizers.ByteLevel.alphabet():
        assert byte_char in vocab
    # A byte that never appears in the corpus still encodes (no unknown token).
    assert tok.decode(tok.encode("\x07")) == "\x07"


def test_vocab_size_counts_special_tokens(tok):
    assert len(tok) == tok.vocab_size == TINY_VOCAB_SIZE
    assert tok.base_vocab_size == TINY_VOCAB_SIZE - len(SPECIAL_TOKENS)


def test_special_tokens_follow_the_base_vocabulary_in_declared_order(tok):
    ids = tok.special_token_ids
    assert [ids[token] for token in SPECIAL_TOKENS] == list(range(tok.base_vocab_size, len(tok)))


def test_small_corpus_gives_a_smaller_vocabulary_with_specials_still_last():
    small = FusionTokenizer.train(["tiny corpus"] * 3, vocab_size=4000)
    assert small.base_vocab_size < 4000 - len(SPECIAL_TOKENS)
    assert min(small.special_token_ids.values()) == small.base_vocab_size
    assert len(small) == small.base_vocab_size + len(SPECIAL_TOKENS)


def test_training_accepts_a_generator():
    trained = FusionTokenizer.train((line for line in tiny_corpus()), vocab_size=300)
    assert trained.decode(trained.encode("a fox")) == "a fox"


@pytest.mark.parametrize("vocab_size", [0, 100, 256 + len(SPECIAL_TOKENS) - 1, 300.0, True])
def test_training_rejects_a_vocab_too_small_for_bytes_and_specials(vocab_size):
    with pytest.raises(TokenizerError, match="vocab_size"):
        FusionTokenizer.train(["some text"], vocab_size=vocab_size)


def test_training_rejects_non_string_texts():
    with pytest.raises(TokenizerError, match=r"training text #1 is a bytes"):
        FusionTokenizer.train(["fine", b"bytes"], vocab_size=300)
    with pytest.raises(TokenizerError, match="single str"):
        FusionTokenizer.train("one long string", vocab_size=300)


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    from tokenizer import InvalidTokenIdError

    with pytest.raises(InvalidTokenIdError, match=r"ids\[1\]=-100"):
        tok.decode([5, -100])
    with pytest.raises(InvalidTokenIdError, match=str(len(tok))):
        tok.decode([len(tok)])


def test_decode_accepts_a_tensor(tok):
    import torch

    ids = tok.encode("a red square")
    assert tok.decode(torch.tensor(ids)) == "a red square"


def test_decode_accepts_numpy_and_tensor_integer_scalars(tok):
    """Ids taken out of an array or tensor one by one (e.g. list(tensor), a list of np.int64)."""
    import numpy as np
    import torch

    ids = tok.encode("a red square")
    assert tok.decode([np.int64(i) for i in ids]) == "a red square"
    assert tok.decode([np.uint16(i) for i in ids]) == "a red square"
    assert tok.decode(list(torch.tensor(ids))) == "a red square"
    assert tok.decode(list(np.array(ids, dtype=np.int32))) == "a red square"


@pytest.mark.parametrize("bad", [True, "5", 5.0, [5]], ids=["bool", "str", "float", "list"])
def test_decode_says_an_id_that_is_no_integer_is_not_an_integer(tok, bad):
    from tokenizer import InvalidTokenIdError

    with pytest.raises(InvalidTokenIdError, match=r"ids\[1\]=.* is not an integer") as raised:
        tok.decode([5, bad])
    assert "range" not in str(raised.value)


def test_decode_rejects_numpy_and_tensor_booleans_and_non_scalar_tensors(tok):
    import numpy as np
    import torch

    from tokenizer import InvalidTokenIdError

    for bad in (np.True_, torch.tensor(True), torch.tensor([5]), torch.tensor(5.0)):
        with pytest.raises(InvalidTokenIdError, match=r"ids\[0\]=.* is not an integer"):
            tok.decode([bad])


def test_decode_reports_an_integer_outside_the_vocabulary_as_out_of_range(tok):
    import numpy as np

    from tokenizer import InvalidTokenIdError

    with pytest.raises(InvalidTokenIdError, match=rf"ids\[0\]=np.int64\(-100\) is out of range.*\[0, {len(tok)}\)"):
        tok.decode([np.int64(-100)])
    with pytest.raises(InvalidTokenIdError, match=r"is out of range"):
        tok.decode([len(tok)])


def test_a_lone_surrogate_is_a_tokenizer_error_naming_where_it_is(tok):
    import json

    broken = json.loads('"broken emoji: \\ud83d end"')  # valid JSON, not valid text
    for call in (lambda: tok.encode(broken),
                 lambda: tok.encode_conversation([{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": broken}])):
        with pytest.raises(TokenizerError, match=r"lone surrogate '\\ud83d' at character 14"):
            call()
    with pytest.raises(TokenizerError, match=r"training text #1 holds a lone surrogate"):
        FusionTokenizer.train(["fine", broken], vocab_size=300)
