"""Label masks: only assistant content and its closing <|eot|> are supervised."""
import pytest

from tokenizer import IGNORE_INDEX, NoSupervisedTokensError, TokenizerError

MULTI_TURN = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is in this image?"},
    {"role": "assistant", "content": "A red square."},
    {"role": "user", "content": "And the background?"},
    {"role": "assistant", "content": "Blue."},
]


def _expected_labels(tok, messages):
    """Labels written out by hand, turn by turn, from the template."""
    labels = [IGNORE_INDEX]  # begin_of_text
    for message in messages:
        header = [tok.header_start_id] + tok.encode(message["role"]) + [tok.header_end_id] + tok.encode("\n\n")
        labels += [IGNORE_INDEX] * len(header)
        content = tok.encode(message["content"]) + [tok.eot_id]
        labels += content if message["role"] == "assistant" else [IGNORE_INDEX] * len(content)
    return labels


def test_labels_supervise_only_assistant_content_and_its_eot(tok):
    encoded = tok.encode_conversation(MULTI_TURN)
    assert len(encoded.labels) == len(encoded.input_ids)
    assert encoded.labels == _expected_labels(tok, MULTI_TURN)


def test_supervised_labels_equal_the_input_ids_at_their_positions(tok):
    encoded = tok.encode_conversation(MULTI_TURN)
    supervised = [i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX]
    assert all(encoded.labels[i] == encoded.input_ids[i] for i in supervised)
    # Read back: each assistant answer followed by its eot, nothing else.
    assert tok.decode([encoded.input_ids[i] for i in supervised], skip_special_tokens=False) == (
        "A red square.<|eot|>Blue.<|eot|>"
    )
    assert encoded.num_supervised_tokens == len(supervised)


def test_system_user_and_header_tokens_are_masked(tok):
    encoded = tok.encode_conversation(MULTI_TURN)
    masked_ids = {i for i, label in zip(encoded.input_ids, encoded.labels) if label == IGNORE_INDEX}
    for control in (tok.bos_id, tok.header_start_id, tok.header_end_id):
        assert control in masked_ids
        assert control not in encoded.labels
    # Exactly 2 eots supervised (assistant turns), 3 masked (system + 2 user turns).
    eot_labels = [label for i, label in zip(encoded.input_ids, encoded.labels) if i == tok.eot_id]
    assert eot_labels == [IGNORE_INDEX, IGNORE_INDEX, tok.eot_id, IGNORE_INDEX, tok.eot_id]


def test_no_assistant_turn_raises_naming_the_sample(tok):
    with pytest.raises(NoSupervisedTokensError, match=r"sample 'llava-0042' has nothing to learn from \(no assistant turn\)"):
        tok.encode_conversation([{"role": "user", "content": "hello"}], sample_id="llava-0042")


def test_only_empty_assistant_turns_raise(tok):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": ""}]
    with pytest.raises(NoSupervisedTokensError, match=r"sample 7 .*1 assistant turn\(s\), all empty"):
        tok.encode_conversation(messages, sample_id=7)


def test_error_type_is_a_value_error_of_the_project(tok):
    assert issubclass(NoSupervisedTokensError, TokenizerError)
    assert issubclass(NoSupervisedTokensError, ValueError)


def test_an_empty_assistant_turn_among_others_supervises_its_eot(tok):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "Yes."},
    ]
    encoded = tok.encode_conversation(messages)
    assert encoded.labels == _expected_labels(tok, messages)
    assert [label for label in encoded.labels if label != IGNORE_INDEX] == [tok.eot_id] + tok.encode("Yes.") + [tok.eot_id]


def test_generation_prompt_skips_the_supervision_check(tok):
    encoded = tok.encode_conversation([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert encoded.labels is None and encoded.num_supervised_tokens == 0


@pytest.mark.parametrize("answer", [" ", "\n", " \n\t "])
def test_whitespace_only_assistant_turns_raise_like_empty_ones(tok, answer):
    """A whitespace-only answer is broken data like an empty one, not a target to learn."""
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": answer}]
    with pytest.raises(NoSupervisedTokensError, match=r"sample 'ws' .*1 assistant turn\(s\), all empty or whitespace"):
        tok.encode_conversation(messages, sample_id="ws")
    # among answers with content it still supervises its tokens and eot
    messages += [{"role": "user", "content": "and?"}, {"role": "assistant", "content": "yes"}]
    encoded = tok.encode_conversation(messages)
    assert encoded.num_supervised_tokens == len(tok.encode(answer)) + 1 + len(tok.encode("yes")) + 1
