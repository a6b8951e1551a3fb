"""The tokenizer package's own exception types.

All of them derive from :class:`TokenizerError`, itself a ``ValueError``, so callers can
catch one family (``except TokenizerError``) or the usual ``ValueError``.
"""


class TokenizerError(ValueError):
    """Base class of every error raised by the ``tokenizer`` package."""


class TokenizerFileError(TokenizerError):
    """A ``tokenizer.json`` file cannot be used: unreadable, or missing required special tokens."""


class InvalidTokenIdError(TokenizerError):
    """An id given to ``decode`` is outside ``[0, len(tokenizer))`` (e.g. a -100 label)."""


class PlaceholderError(TokenizerError):
    """An ``ImagePlaceholder`` or ``VideoPlaceholder`` was built with invalid values."""


class ConversationFormatError(TokenizerError):
    """A conversation is malformed: unknown role, bad message shape, bad turn order."""


class MediaCountMismatchError(ConversationFormatError):
    """The number of ``<image>`` / ``<video>`` markers differs from the media passed in."""


class NoSupervisedTokensError(TokenizerError):
    """A training sample would have no supervised (non ``-100``) assistant content token."""
