"""A tiny tokenizer, trained once for the whole tokenizer test folder (well under a second)."""
import pytest

from tokenizer import FusionTokenizer

TINY_VOCAB_SIZE = 500

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "What is in this image? A red square on a blue background.",
    "Describe the video. A ball rolls from the left to the right.",
    "You are a helpful assistant that answers questions about pictures.",
    "How many cats are there? There are three cats sitting on the mat.",
    "The weather today is sunny with a light breeze from the west.",
    "Numbers like 12345 and 3.14159 appear in text, as do dates: 2024-05-01.",
    "def encode(text): return [ord(c) for c in text]  # code, too\n",
    "Multiple lines\r\nwith Windows endings\r\nand tabs\there.",
    "日本語のテキストも少し含めます。猫が好きです。",
    "Ceci est une phrase en français, avec des accents: é, è, à, ç.",
    "Emoji: 🎉 👍 🐈 and a family 👨‍👩‍👧 appear sometimes.",
    "user assistant system header image video patch tile",
]


def tiny_corpus() -> list[str]:
    """About 4k words: enough for a 500-token vocabulary to fill up."""
    return [f"{sentence} ({index})" for index in range(20) for sentence in _SENTENCES]


@pytest.fixture(scope="session")
def tok() -> FusionTokenizer:
    return FusionTokenizer.train(tiny_corpus(), vocab_size=TINY_VOCAB_SIZE, min_frequency=2)
