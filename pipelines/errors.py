"""The pipelines' own exception types. Errors from below (unreadable images and videos, broken model
folders, malformed conversations) are raised as they are, with their own types; these cover what only
a pipeline can get wrong.
"""
from fusion.errors import CheckpointError


class PipelineInputError(ValueError):
    """A pipeline argument or call input that cannot be used: a missing or unknown key, a value of the
    wrong type, an impossible setting. The message names the argument and says what to pass instead."""


class UnknownTaskError(PipelineInputError):
    """`pipeline(task)` with a task name that is not one of the tasks (or their aliases)."""


class DefaultModelMissingError(CheckpointError):
    """`model=None` where this install of fusion does not ship the default model folder."""
