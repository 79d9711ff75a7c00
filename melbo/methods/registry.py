"""The methods :func:`melbo.train` runs, by name (see :mod:`melbo.methods.base` for the protocol)."""

from __future__ import annotations

from melbo.core.validate import check_choice
from melbo.methods.adapter import AdapterMethod
from melbo.methods.base import Method
from melbo.methods.dct import DCTMethod
from melbo.methods.melbo import MelboMethod
from melbo.methods.ortho import OrthoMethod
from melbo.methods.rank1 import Rank1Method

_ALL = (MelboMethod, DCTMethod, AdapterMethod, Rank1Method, OrthoMethod)
METHODS: dict[str, type[Method]] = {m.name: m for m in _ALL}
STANDALONE_METHODS = tuple(name for name in METHODS if name != "ortho")
"""The methods that need only a model and prompts (MELBO-ortho also needs a base vector)."""


def get_method(name: str) -> type[Method]:
    """The method class named ``name``.

    Raises:
        MelboError: an unknown name (listing the known ones).
    """
    return METHODS[check_choice("method", name, METHODS)]


def trains_adapters(name: str) -> bool:
    """Whether method ``name`` fits adapters (weight perturbations) rather than steering vectors.

    Raises:
        MelboError: an unknown name.
    """
    return get_method(name).kind == "adapter"
