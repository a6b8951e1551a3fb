"""Type checks shared by the settings' validation (`VisionEncoderConfig`, video sampling, and fusion's configs)."""
from __future__ import annotations

import math
import numbers


def is_whole_number(value: object) -> bool:
    """An integer, not a bool (True is an int to Python, not a count to a user)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """A real number that is not a bool, infinite or NaN."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
