"""The grid syntax of sweeps (melbo.core.grid): quotes, ambiguous commas, grid files (JSON, TOML)."""

from __future__ import annotations

import json

import pytest

import melbo.core.grid as grid_module
from melbo.core.errors import MelboError
from melbo.core.grid import parse_grid_text, read_grid_file

KEYS = ("prompts", "radius", "positions", "p")


def parse(text: str) -> dict:
    return parse_grid_text(text, KEYS, "prompts")


def test_inline_grid_values_and_prompt_sets():
    assert parse("prompts=Once upon a time|The cat,A dog,radius=0.1x, 0.2x") == {
        "prompts": [["Once upon a time", "The cat"], ["A dog"]],
        "radius": ["0.1x", "0.2x"],
    }
    assert parse(r"prompts=Q: 2+2?\nA:") == {"prompts": [["Q: 2+2?\nA:"]]}


def test_a_quoted_value_keeps_its_commas_bars_and_equals():
    got = parse('prompts="Hello, world"|Once upon,"a=b, c|d" | "say \\"hi\\"",positions="0,3",all')
    assert got == {
        "prompts": [["Hello, world", "Once upon"], ["a=b, c|d", 'say "hi"']],
        "positions": ["0,3", "all"],
    }
    assert parse('prompts=He said "hi"') == {"prompts": [['He said "hi"']]}  # a quote inside a value is text


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "prompts=Hello, world|Once upon,radius=2",
            r"ambiguous prompts value .*a comma next to a space \(at 'prompts=Hello, world\|Once upon'\)",
        ),
        ("prompts=Hello ,world", "ambiguous prompts value"),
        ('prompts="Hello, world', "unclosed double quote"),
        ('prompts="Hello" world', "text after a closing quote"),
        ("prompts=a,b=c", r"unknown sweep key 'b' .*double quotes"),
        ("radius=1x,", "empty value for sweep key 'radius'"),
        ('prompts=a|""', "empty prompt for sweep key 'prompts'"),
        ("0.5x,radius=1x", "must start with KEY=VALUE"),
        ("p=2,p=4", "appears twice"),
        ("  ", "empty sweep"),
    ],
)
def test_inline_grid_errors(text, message):
    with pytest.raises(MelboError, match=message):
        parse(text)


def test_spaces_after_commas_of_other_keys_are_not_ambiguous():
    assert parse("radius=0.1x, 0.2x, p=2") == {"radius": ["0.1x", "0.2x"], "p": ["2"]}


def test_json_and_toml_grid_files_give_the_inline_grid(tmp_path):
    obj = {"prompts": [["Hello, world", "The cat"], ["Once upon a time"]], "radius": ["0.1x", 2], "p": [2.5]}
    (tmp_path / "g.json").write_text(json.dumps(obj), encoding="utf-8")
    toml = 'prompts = [["Hello, world", "The cat"], ["Once upon a time"]]\nradius = ["0.1x", 2]\np = [2.5]\n'
    (tmp_path / "g.toml").write_text(toml, encoding="utf-8")
    inline = parse('prompts="Hello, world"|The cat,Once upon a time,radius=0.1x,2,p=2.5')
    assert read_grid_file(tmp_path / "g.json", KEYS, "prompts") == inline
    if grid_module.tomllib is not None:
        assert read_grid_file(tmp_path / "g.toml", KEYS, "prompts") == inline


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"prompts": ["Hello, world", "The cat"]}, "prompts must be a list of sets"),
        ({"prompts": [[]]}, "prompts must be a list of sets"),
        ({"radius": "0.1x"}, "key 'radius' must map to a non-empty list"),
        ({"radius": []}, "key 'radius' must map to a non-empty list"),
        ({"radius": [{"x": 1}]}, "of type dict; allowed: strings, numbers and true/false"),
        ({"colour": [1]}, "unknown key 'colour'"),
        ([1, 2], "must be a non-empty object"),
        ({}, "must be a non-empty object"),
    ],
)
def test_grid_file_errors(tmp_path, obj, message):
    (tmp_path / "g.json").write_text(json.dumps(obj), encoding="utf-8")
    with pytest.raises(MelboError, match=message):
        read_grid_file(tmp_path / "g.json", KEYS, "prompts")


def test_grid_file_suffix_toml_errors_and_toml_without_a_parser(tmp_path, monkeypatch):
    (tmp_path / "g.yaml").write_text("radius: [1]", encoding="utf-8")
    with pytest.raises(MelboError, match=r"should end in .json or .toml"):
        read_grid_file(tmp_path / "g.yaml", KEYS)
    (tmp_path / "bad.toml").write_text("radius = [", encoding="utf-8")
    if grid_module.tomllib is not None:
        with pytest.raises(MelboError, match="is not valid TOML"):
            read_grid_file(tmp_path / "bad.toml", KEYS)
    monkeypatch.setattr(grid_module, "tomllib", None)  # Python 3.10 without tomli
    with pytest.raises(MelboError, match=r"needs Python 3.11 or the tomli package .*or write it as JSON"):
        read_grid_file(tmp_path / "bad.toml", KEYS)
