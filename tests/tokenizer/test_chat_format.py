"""The Llama 4 chat format: exact rendering, generation prompts, and message validation."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from tokenizer import ConversationFormatError

TWO_TURNS = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello. How can I help?"},
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Blue."},
]


def test_two_turn_conversation_renders_the_exact_llama4_string(tok):
    encoded = tok.encode_conversation(TWO_TURNS)
    assert tok.decode(encoded.input_ids, skip_special_tokens=False) == (
        "<|begin_of_text|>"
        "<|header_start|>system<|header_end|>\n\nYou are helpful.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nHi there!<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nHello. How can I help?<|eot|>"
        "<|header_start|>user<|header_end|>\n\nName a color.<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nBlue.<|eot|>"
    )
    assert encoded.input_ids[0] == tok.bos_id
    assert encoded.input_ids[-1] == tok.eot_id


def test_control_tokens_are_single_ids(tok):
    ids = tok.encode_conversation(TWO_TURNS).input_ids
    assert ids.count(tok.bos_id) == 1
    assert ids.count(tok.header_start_id) == ids.count(tok.header_end_id) == 5
    assert ids.count(tok.eot_id) == 5


def test_system_turn_is_optional(tok):
    encoded = tok.encode_conversation(TWO_TURNS[1:3])
    assert tok.decode(encoded.input_ids, skip_special_tokens=False) == (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\nHi there!<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nHello. How can I help?<|eot|>"
    )


def test_generation_prompt_ends_with_the_assistant_header(tok):
    encoded = tok.encode_conversation(TWO_TURNS[:4], add_generation_prompt=True)
    text = tok.decode(encoded.input_ids, skip_special_tokens=False)
    assert text.endswith("Name a color.<|eot|><|header_start|>assistant<|header_end|>\n\n")
    assert encoded.labels is None
    tail = [tok.header_start_id] + tok.encode("assistant") + [tok.header_end_id] + tok.encode("\n\n")
    assert encoded.input_ids[-len(tail) :] == tail


def test_generation_prompt_matches_the_training_prefix(tok):
    """The prompt at inference is token-for-token the prefix the model was trained on."""
    prompt = tok.encode_conversation(TWO_TURNS[:4], add_generation_prompt=True).input_ids
    trained = tok.encode_conversation(TWO_TURNS).input_ids
    assert trained[: len(prompt)] == prompt
    assert tok.decode(trained[len(prompt) :], skip_special_tokens=False) == "Blue.<|eot|>"


def test_generation_prompt_needs_a_last_user_turn(tok):
    with pytest.raises(ConversationFormatError, match=r"sample 'q7'.*last turn to be a user turn.*'assistant'"):
        tok.encode_conversation(TWO_TURNS, sample_id="q7", add_generation_prompt=True)


def test_unknown_role_names_the_role_and_the_sample(tok):
    messages = [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "hello"}]
    with pytest.raises(ConversationFormatError, match=r"sample 'row-12'.*messages\[0\].*unknown role 'human'"):
        tok.encode_conversation(messages, sample_id="row-12")


def test_error_without_sample_id_says_so(tok):
    with pytest.raises(ConversationFormatError, match=r"no sample_id given.*unknown role 'tool'"):
        tok.encode_conversation([{"role": "tool", "content": "x"}])


def test_system_turn_must_come_first(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]
    with pytest.raises(ConversationFormatError, match=r"messages\[1\] is a system turn"):
        tok.encode_conversation(messages, sample_id=3)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "messages is empty"),
        ("hello", "must be a list"),
        ({"role": "user", "content": "hi"}, "must be a list"),
        ([{"role": "user"}], r"messages\[0\] must be a dict with 'role' and 'content'"),
        ([("user", "hi")], r"messages\[0\] must be a dict"),
        ([{"role": "user", "content": ["hi"]}], r"messages\[0\] \(user\) content part 0 must be .*got 'hi'"),
        ([{"role": "user", "content": [{"type": "audio"}]}], r"messages\[0\] \(user\) content part 0 must be"),
        ([{"role": "user", "content": 3}], r"messages\[0\] \(user\) content must be a str or a list of parts"),
    ],
)
def test_malformed_messages_are_rejected_clearly(tok, messages, message):
    with pytest.raises(ConversationFormatError, match=message):
        tok.encode_conversation(messages, sample_id="s")


plain_text = hs.text(alphabet=hs.characters(exclude_categories=("Cs",)), max_size=30).filter(
    lambda text: "<image>" not in text and "<video>" not in text
)


@settings(max_examples=100, deadline=None)
@given(system=plain_text, user=plain_text, assistant=plain_text.filter(str.strip))  # (whitespace only: no target)
def test_any_text_renders_into_the_template_unchanged(tok, system, user, assistant):
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]
    encoded = tok.encode_conversation(messages)
    assert tok.decode(encoded.input_ids, skip_special_tokens=False) == (
        f"<|begin_of_text|><|header_start|>system<|header_end|>\n\n{system}<|eot|>"
        f"<|header_start|>user<|header_end|>\n\n{user}<|eot|>"
        f"<|header_start|>assistant<|header_end|>\n\n{assistant}<|eot|>"
    )
    supervised = [label for label in encoded.labels if label != -100]
    assert tok.decode(supervised, skip_special_tokens=False) == assistant + "<|eot|>"
