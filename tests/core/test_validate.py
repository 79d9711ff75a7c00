"""The shared input checks: the bad value is named with what is allowed."""

import math

import pytest

from melbo.core.errors import MelboError
from melbo.core.radius import RadiusSpec, parse_radius
from melbo.core.validate import check_choice, check_int, check_number, check_positive, check_seed, parse_indices


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, "x", None, True])
def test_check_positive(bad):
    with pytest.raises(MelboError, match=r"radius R must be a finite number > 0, got"):
        check_positive("radius R", bad)


def test_numbers_and_ints():
    assert check_positive("p", "2.5") == 2.5
    assert check_number("β", 1.0, 0.0, 1.0, low_open=True) == 1.0
    with pytest.raises(MelboError, match=r"β must be a finite number > 0 and <= 1, got 0"):
        check_number("β", 0, 0.0, 1.0, low_open=True)
    assert check_int("steps", 3.0, 0) == 3
    for bad in (3.5, "three", True, -1):
        with pytest.raises(MelboError, match=r"steps must be a whole number >= 0"):
            check_int("steps", bad, 0)
    with pytest.raises(MelboError, match=r"seed must be a whole number in 0\.\.2147483647, got 99999999999"):
        check_seed(99999999999)
    with pytest.raises(MelboError, match="unknown method 'sae'; allowed: melbo, dct"):
        check_choice("method", "sae", ["melbo", "dct"])


def test_parse_indices():
    assert parse_indices(None, 4) == [0, 1, 2, 3]
    assert parse_indices("1-2,0", 4) == [1, 2, 0]
    assert parse_indices([3], 4) == [3] and parse_indices(2, 4) == [2]
    with pytest.raises(MelboError, match=r"vector index 4 is outside the bank, which has 4 vectors \(0\.\.3\)"):
        parse_indices("4", 4)
    with pytest.raises(MelboError, match="bad vector choice '3-1'"):
        parse_indices("3-1", 4)
    with pytest.raises(MelboError, match="bad adapter choice 'x'"):
        parse_indices("x", 4, "adapter")


def test_radius_specs():
    assert parse_radius("4") == RadiusSpec("absolute", 4.0)
    assert parse_radius("0.5x") == RadiusSpec("relative", 0.5)
    assert parse_radius(" Auto ").kind == "auto" and parse_radius("calibrate").kind == "calibrate"
    assert parse_radius("0.5x").resolve(10.0) == 5.0 and str(parse_radius("2")) == "2"
    for bad in ("-1", "0x", "inf", "nanx", "big"):
        with pytest.raises(MelboError, match=rf"bad radius '{bad}'.*allowed: a number > 0"):
            parse_radius(bad)
    with pytest.raises(MelboError, match="found by its own procedure"):
        parse_radius("auto").resolve(1.0)


def test_empty_and_huge_choices_are_refused():
    for blank in ("", "  "):  # was: all of them (export gguf summed every vector)
        with pytest.raises(MelboError, match=r"empty vector choice .*; allowed: all, or indices"):
            parse_indices(blank, 4)
    with pytest.raises(MelboError, match=r"the bank holds no vectors \(0 rows\); there is nothing to choose"):
        parse_indices(None, 0)
    with pytest.raises(MelboError, match=r"no adapter chosen \(\[\]\)"):
        parse_indices([], 4, "adapter")
    with pytest.raises(MelboError, match=r"vector index 9999999999 is outside the bank"):  # was: MemoryError
        parse_indices("0-9999999999", 4)


def test_numbers_past_float32_are_not_finite():
    assert check_positive("learning rate", 3e38) == 3e38
    with pytest.raises(MelboError, match=r"learning rate must be a finite number > 0, got 1e\+39"):
        check_positive("learning rate", 1e39)  # inf in a float32 tensor: a traceback deep in torch
    with pytest.raises(MelboError, match=r"scale must be a finite number, got -1e\+39"):
        check_number("scale", -1e39)
