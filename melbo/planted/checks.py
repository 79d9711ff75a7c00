"""Checks of the values in a spec file (:mod:`melbo.planted.spec`): JSON objects with known
fields, bounded integers and non-empty strings. Each raises :class:`MelboError` naming the bad
field or value and what is allowed."""

from __future__ import annotations

from typing import Any

from melbo.core.errors import MelboError


def check_fields(obj: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    """``obj`` itself, after checking that it is a JSON object with no field outside ``allowed``.

    Raises:
        MelboError: not a dict, or an unknown field (the first in sorted order is named).
    """
    if not isinstance(obj, dict):
        raise MelboError(f"{where} must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise MelboError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    return obj


def check_int(value: Any, what: str, low: int, high: int | None = None) -> int:
    """``value``, after checking that it is an int (not a bool) in ``low..high`` (no upper bound
    when ``high`` is None).

    Raises:
        MelboError: anything else.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
        raise MelboError(f"{what} {value!r} is not allowed; allowed: {allowed}")
    return value


def check_str(value: Any, what: str) -> str:
    """``value``, after checking that it is a string that is not empty or blank.

    Raises:
        MelboError: anything else.
    """
    if not isinstance(value, str) or not value.strip():
        raise MelboError(f"{what} must be a non-empty string, got {value!r}")
    return value
