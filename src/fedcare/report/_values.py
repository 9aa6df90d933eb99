"""Lenient readers for event fields: a field of the wrong type reads as missing, never as a crash."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["as_float", "as_int", "as_mapping", "as_names", "event_round"]


def as_float(value: Any) -> float:
    """A metric value as float; NaN for null or anything that is not a number.

    Examples
    --------
    >>> as_float(None), as_float(3), as_float(True)
    (nan, 3.0, nan)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def as_int(value: Any, default: int = 0) -> int:
    """A count as int; ``default`` for null, non-finite or non-numbers.

    Examples
    --------
    >>> as_int(12.0), as_int("12", default=-1)
    (12, -1)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return int(value)


def as_names(value: Any) -> list[str]:
    """A list of site names; empty when the field is not a list.

    Examples
    --------
    >>> as_names(["a", 2]), as_names(None)
    (['a', '2'], [])
    """
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def as_mapping(value: Any) -> Mapping[str, Any]:
    """The value when it is a mapping, else an empty one.

    Examples
    --------
    >>> dict(as_mapping([1])), dict(as_mapping({"a": 1}))
    ({}, {'a': 1})
    """
    return value if isinstance(value, Mapping) else {}


def event_round(event: Mapping[str, Any]) -> int | None:
    """The event's ``round``, or None when it has no integer one.

    Examples
    --------
    >>> event_round({"round": 2}), event_round({"round": "2"})
    (2, None)
    """
    value = event.get("round")
    return None if isinstance(value, bool) or not isinstance(value, int) else value
