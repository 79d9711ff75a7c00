"""Checks of user input shared by every method, the public API and the CLI.

Each check raises :class:`melbo.core.errors.MelboError` with a message that names the bad value
and says what is allowed, and returns the value in its canonical type.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from melbo.core.errors import MelboError

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def check_number(
    name: str, value: Any, low: float | None = None, high: float | None = None, low_open: bool = False
) -> float:
    """A finite number in ``[low, high]`` (``(low, high]`` with ``low_open``) as a float; finite
    means within float32's range (``|x| <= 3.4e38``), since every number here meets float32
    tensors, where a larger one is infinite.

    Raises:
        MelboError: not a number, NaN, infinite (in float32), or out of range.
    """
    try:
        x = float(value)
        ok = not isinstance(value, bool) and math.isfinite(x) and abs(x) <= FLOAT32_MAX
    except (TypeError, ValueError, OverflowError):
        ok, x = False, math.nan
    if ok and low is not None:
        ok = x > low if low_open else x >= low
    if ok and high is not None:
        ok = x <= high
    if not ok:
        lo = "" if low is None else (f"> {low:g}" if low_open else f">= {low:g}")
        hi = "" if high is None else f"<= {high:g}"
        rng = " and ".join(s for s in (lo, hi) if s)
        raise MelboError(f"{name} must be a finite number{' ' + rng if rng else ''}, got {value!r}")
    return x


def check_positive(name: str, value: Any) -> float:
    """A finite number > 0 as a float.

    Raises:
        MelboError: anything else.
    """
    return check_number(name, value, 0.0, low_open=True)


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """A whole number in ``[low, high]`` as an int (``3.0`` is accepted, ``3.5`` and ``True`` not).

    Raises:
        MelboError: not a whole number, or out of range.
    """
    ok = False
    if not isinstance(value, bool):
        try:
            ok = float(value) == int(value)
        except (TypeError, ValueError, OverflowError):
            ok = False
    n = int(value) if ok else 0
    if ok and low is not None and n < low:
        ok = False
    if ok and high is not None and n > high:
        ok = False
    if not ok:
        if low is not None and high is not None:
            rng = f" in {low}..{high}"
        elif low is not None:
            rng = f" >= {low}"
        elif high is not None:
            rng = f" <= {high}"
        else:
            rng = ""
        raise MelboError(f"{name} must be a whole number{rng}, got {value!r}")
    return n


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    """One of ``allowed``.

    Raises:
        MelboError: anything else, listing what is allowed.
    """
    options = list(allowed)
    if value not in options:
        raise MelboError(f"unknown {name} {value!r}; allowed: {', '.join(map(str, options))}")
    return str(value)


SEED_MAX = 2**31 - 1
_RANGE = re.compile(r"(\d+)\s*-\s*(\d+)")


def check_seed(value: Any) -> int:
    """A seed for torch's generator: a whole number in ``0..2**31-1``."""
    return check_int("seed", value, 0, SEED_MAX)


def parse_indices(spec: str | Iterable[int] | int | None, n: int, what: str = "vector") -> list[int]:
    """Indices into ``n`` items from ``"all"``/None, ``"0,3"``, ``"2-5,7"``, an int or a list.

    Raises:
        MelboError: a malformed choice (a blank string too), an index outside ``0..n-1``, or a
            choice of nothing (an empty list, or all of 0 items): an empty selection would do
            nothing and look like success.
    """
    if isinstance(spec, str) and not spec.strip():
        raise MelboError(f"empty {what} choice {spec!r}; allowed: all, or indices like 0,3 or ranges like 0-7")
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        if not n:
            raise MelboError(f"the bank holds no {what}s (0 rows); there is nothing to choose")
        return list(range(n))
    out: list[int] = []
    if isinstance(spec, str):
        try:
            for part in spec.split(","):
                m = _RANGE.fullmatch(part.strip())
                if m:
                    lo, hi = int(m.group(1)), int(m.group(2))
                    if hi < lo:
                        raise ValueError
                    if hi >= n:  # checked before the range is built: 0-9999999999 must not fill the memory
                        raise MelboError(
                            f"{what} index {hi} is outside the bank, which has {n} {what}s"
                            + (f" (0..{n - 1})" if n else "")
                        )
                    out.extend(range(lo, hi + 1))
                else:
                    out.append(int(part))
        except MelboError:
            raise
        except ValueError:
            raise MelboError(
                f"bad {what} choice {spec!r}; allowed: all, or indices like 0,3 or ranges like 0-7"
            ) from None
    elif isinstance(spec, int) and not isinstance(spec, bool):
        out = [spec]
    else:
        try:
            out = [check_int(f"{what} index", i) for i in spec]  # type: ignore[union-attr]
        except TypeError:
            raise MelboError(f"bad {what} choice {spec!r}; allowed: all, an index, or a list of indices") from None
    for i in out:
        if not 0 <= i < n:
            raise MelboError(
                f"{what} index {i} is outside the bank, which has {n} {what}s" + (f" (0..{n - 1})" if n else "")
            )
    if not out:
        raise MelboError(f"no {what} chosen ({spec!r}); choose at least one: all, or indices like 0,3")
    return out
