"""Argument checks shared by the pretext modules."""
from __future__ import annotations

import operator
from typing import Any, Optional


def as_count(value: Any, name: str, minimum: Optional[int] = None) -> int:
    """``value`` as a Python int (numpy and other integer types through
    ``operator.index``), at least ``minimum`` where given.

    A float such as 2.7 is refused rather than truncated, and so is a bool
    (True would silently count as 1): ``TypeError`` naming ``name``; below
    ``minimum``: ``ValueError``.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number
