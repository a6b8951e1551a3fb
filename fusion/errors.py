"""The project's exception types, all in one place.

Every error names the input that caused it and says what to do. Vision and tokenizer errors are
defined in their own (lower) packages and re-exported here, so `except fusion.errors.X` works for all.
"""
from tokenizer.errors import (  # noqa: F401
    ConversationFormatError,
    MediaCountMismatchError,
    NoSupervisedTokensError,
    TokenizerError,
)
from vision.errors import (  # noqa: F401
    ImageLoadError,
    ImageTooLargeError,
    VideoLoadError,
    VisionInputError,
    WeightsError,
)


class PlaceholderMismatchError(ValueError):
    """The number of <|patch|> placeholders differs from the number of image features."""


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete, or not of a format this version reads."""


class DatasetError(ValueError):
    """A dataset file or sample that cannot be used."""


class ConfigError(ValueError):
    """A training or model configuration that is invalid."""


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. a loss that stays non-finite); the message says what to change."""


class TrainingStopped(Exception):
    """A run stopped on request (SIGTERM, Ctrl-C) after writing a checkpoint; `--resume` continues it."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum
