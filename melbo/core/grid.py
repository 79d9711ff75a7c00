"""Grids of settings (``melbo sweep --grid``, ``melbo bench backdoor --sweep``): the inline text form
``KEY=V1,V2,KEY2=V3`` with double quotes for values that hold commas, and grid files (JSON or TOML)
mapping each key to its list of values.

Both forms give the same thing: ``{key: [value, ...]}`` in the order the keys were given, every
value a string (numbers and booleans of a file written as text, so one parser checks both forms),
except the values of a *list key* (``prompts``), which are lists of strings (one prompt set each).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from melbo.core.errors import MelboError
from melbo.core.io import read_json, read_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: TOML grid files need the tomli package
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None  # type: ignore[assignment]

_ESCAPES = {'"': '"', "\\": "\\", "n": "\n"}


def normalize_key(key: str) -> str:
    """``Source_Layer`` -> ``source-layer``."""
    return key.strip().lower().replace("_", "-")


def _quoted(s: str, i: int, text: str) -> tuple[str, int]:
    """The double-quoted string opening at ``s[i]`` and the index after its closing quote.
    Inside it ``\\"``, ``\\\\`` and ``\\n`` are a quote, a backslash and a newline."""
    out: list[str] = []
    i += 1
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in _ESCAPES:
            out.append(_ESCAPES[s[i + 1]])
            i += 2
        elif c == '"':
            return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    raise MelboError(f'unclosed double quote in the sweep {text!r}; close it, or write \\" for a quote inside one')


def parse_grid_text(text: str, allowed: Sequence[str], list_key: str | None = None) -> dict[str, list[Any]]:
    """An inline grid ``KEY=V1,V2,KEY2=V3`` -> ``{key: [values]}`` (keys normalized, in order).

    A comma ends a value; a piece with ``=`` starts the next key. A value (or an item of a
    ``list_key`` value) that starts with a double quote runs to the closing quote and keeps its
    commas, ``=`` and ``|``; ``\\"`` is a quote inside it. The values of ``list_key`` are sets
    of items separated by ``|`` (each set a list of strings); there an unquoted comma next to a
    space is refused as ambiguous: it reads like a comma inside a prompt but splits the set.
    Outside quotes ``\\n`` is a newline and outer spaces are dropped.

    Raises:
        MelboError: an empty grid, text before the first ``KEY=``, an unknown or repeated key, an
            empty value or item, an unclosed quote or text after a closing one, an ambiguous
            comma in a ``list_key`` value.
    """
    s = str(text or "").strip()
    keys = ", ".join(allowed)
    if not s:
        raise MelboError(f"empty sweep; give KEY=V1,V2[,KEY=...] with keys {keys}")
    grid: dict[str, list[Any]] = {}
    key: str | None = None
    i, n = 0, len(s)
    while True:
        j = i
        while j < n and s[j] not in ',"=':
            j += 1
        continuation = not (j < n and s[j] == "=")
        if not continuation:
            key = normalize_key(s[i:j])
            if key not in allowed:
                raise MelboError(
                    f"unknown sweep key {key!r} in {text!r}; allowed keys: {keys} (a value holding = or a comma "
                    f"goes in double quotes)"
                )
            if key in grid:
                raise MelboError(f"sweep key {key!r} appears twice in {text!r}; give all its values once")
            grid[key] = []
            i = j + 1
        elif key is None:
            raise MelboError(f"sweep {text!r} must start with KEY=VALUE; allowed keys: {keys}")
        stops = ",|" if key == list_key else ","
        items: list[str] = []
        while True:
            k = i
            while k < n and s[k] in " \t":
                k += 1
            if k < n and s[k] == '"':
                item, i = _quoted(s, k, text)
                while i < n and s[i] in " \t":
                    i += 1
                if i < n and s[i] not in stops:
                    raise MelboError(
                        f"text after a closing quote in the sweep {text!r} (at {s[i : i + 20]!r}); "
                        f"a quoted value ends at its quote"
                    )
            else:
                j = i
                while j < n and s[j] not in stops:
                    j += 1
                start, raw, i = i, s[i:j], j
                if key == list_key and continuation and not items and raw[:1].isspace():
                    _ambiguous(text, key, s[max(0, start - 16) : start + 16])
                if key == list_key and i < n and s[i] == "," and raw[-1:].isspace():
                    _ambiguous(text, key, s[max(0, i - 16) : i + 16])
                item = raw.strip().replace("\\n", "\n")
            if not item.strip():
                what = "prompt" if key == list_key else "value"
                raise MelboError(f"empty {what} for sweep key {key!r} in {text!r}")
            items.append(item)
            if i < n and s[i] == "|" and key == list_key:
                i += 1
                continue
            break
        grid[key].append(items if key == list_key else items[0])
        if i >= n:
            return grid
        i += 1  # the comma


def _ambiguous(text: str, key: str, near: str) -> None:
    raise MelboError(
        f"ambiguous {key} value in the sweep {text!r}: a comma next to a space (at {near!r}) "
        f"reads like a comma inside a prompt, but commas separate prompt sets; put a prompt that holds "
        f'commas in double quotes ({key}="Hello, world"|"Once upon a time"), write the sets without '
        f"spaces around their commas, or give the grid as a file (JSON or TOML)"
    )


def _file_value(key: str, v: Any, source: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return str(v)
    raise MelboError(
        f"grid file {source!r}: key {key!r} has a value {v!r} of type {type(v).__name__}; allowed: strings, numbers "
        f"and true/false"
    )


def read_grid_file(path: str | os.PathLike, allowed: Sequence[str], list_key: str | None = None) -> dict[str, list]:
    """A grid file -> ``{key: [values]}`` as :func:`parse_grid_text` gives. The file (``.json``, or
    ``.toml`` on Python 3.11+ or with ``tomli`` installed) is one object mapping each key to the
    list of its values, e.g. ``{"prompts": [["Hello, world", "The cat"], ["Once upon a time"]],
    "radius": ["0.1x", "0.2x"], "source-layer": [1, 2]}``; the values of ``list_key`` are lists of
    strings (one set each).

    Raises:
        MelboError: a missing or unreadable file, another suffix, not valid JSON/TOML, not an
            object, an unknown key, a key whose values are not a non-empty list, values of the
            wrong type, an empty item; TOML on Python 3.10 without tomli.
    """
    p = Path(path)
    source = str(p)
    suffix = p.suffix.lower()
    if suffix == ".json":
        obj = read_json(p, "grid file")
    elif suffix == ".toml":
        if tomllib is None:
            raise MelboError(
                f"grid file {source!r} is TOML, which needs Python 3.11 or the tomli package (pip install tomli); "
                f"or write it as JSON"
            )
        try:
            obj = tomllib.loads(read_text(p, "grid file"))
        except tomllib.TOMLDecodeError as e:
            raise MelboError(f"grid file {source!r} is not valid TOML ({e})") from None
    else:
        raise MelboError(f"grid file {source!r} should end in .json or .toml")
    if not isinstance(obj, dict) or not obj:
        raise MelboError(f"grid file {source!r} must be a non-empty object mapping each key to a list of values")
    grid: dict[str, list] = {}
    for raw, values in obj.items():
        key = normalize_key(str(raw))
        if key not in allowed:
            raise MelboError(f"grid file {source!r}: unknown key {key!r}; allowed keys: {', '.join(allowed)}")
        if key in grid:
            raise MelboError(f"grid file {source!r}: key {key!r} appears twice")
        if not isinstance(values, list) or not values:
            raise MelboError(
                f"grid file {source!r}: key {key!r} must map to a non-empty list of values, got {values!r}"
            )
        if key != list_key:
            grid[key] = [_file_value(key, v, source) for v in values]
            continue
        if not all(isinstance(x, list) and x and all(isinstance(i, str) and i.strip() for i in x) for x in values):
            raise MelboError(
                f"grid file {source!r}: {key} must be a list of sets, each a non-empty list of non-empty strings, "
                f'like [["Hello, world", "The cat"], ["Once upon a time"]]; got {values!r}'
            )
        grid[key] = [list(x) for x in values]
    return grid
