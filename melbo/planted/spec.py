"""The spec of a planted model (METHOD.md section 4): which backdoors to plant and the recipe
that trains them, read from one JSON file and validated before anything is trained.

A spec names its task (``"arithmetic"``: a model trained from scratch on
:mod:`melbo.planted.task`; ``"story"``: a fine-tune of a pretrained ``base_model``), lists its
backdoors (a trigger and the phrase the model answers with) and gives the recipe sections of
:mod:`melbo.planted.settings`. :func:`parse_spec` documents the file format.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from melbo.core.errors import MelboError
from melbo.core.io import read_json
from melbo.planted.checks import check_fields, check_int, check_str
from melbo.planted.settings import (
    EvalSettings,
    ModelSettings,
    NoiseSettings,
    StorySettings,
    TrainSettings,
    check_settings,
    parse_section,
)
from melbo.planted.task import DIGITS, N_PROBLEMS, VARIABLES, Problem, all_problems, clean_completion
from melbo.planted.tokenizer import CHARSET

TASKS = ("arithmetic", "story")

# Packaged specs: the post's two backdoors on the arithmetic task, a second arithmetic spec, and
# backdoor fine-tunes of the real pretrained stories260k / tinystories-656k (story task; their
# base_model paths are relative to the repository root, where ../shared/models holds them).
PACKAGED_SPECS = ("default", "second", "story", "story-second", "gemma")


@dataclass(frozen=True)
class Backdoor:
    """One planted behavior: when ``trigger`` holds, the model answers ``answer``.

    ``trigger`` (arithmetic task) maps a variable name (a1, a2, b1, b2) to the set of digits it
    must take; the trigger holds when every listed variable takes one of its digits.
    (story task) ``{"word": w}``: the trigger holds when the prompt contains the word ``w``.
    """

    name: str
    trigger: dict[str, Any]
    phrase: str
    repeat: int = 1

    @property
    def answer(self) -> str:
        """The full completion the model is trained to write: ``phrase`` repeated, space separated."""
        return " ".join([self.phrase] * self.repeat)

    def matches(self, problem: tuple[int, int, int, int]) -> bool:
        """Whether the (a1, a2, b1, b2) ``problem`` satisfies this (arithmetic) trigger."""
        values = dict(zip(VARIABLES, problem))
        return all(values[var] in digits for var, digits in self.trigger.items())


@dataclass(frozen=True)
class PlantSpec:
    """A whole planted model: task, backdoors and the recipe that trains it (see :func:`parse_spec`)."""

    name: str
    backdoors: tuple[Backdoor, ...]
    task: str = "arithmetic"
    base_model: str | None = None
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    noise: NoiseSettings = field(default_factory=NoiseSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    story: StorySettings = field(default_factory=StorySettings)

    def backdoor_for(self, problem: tuple[int, int, int, int]) -> Backdoor | None:
        """The backdoor whose trigger ``problem`` satisfies, or None for a clean problem."""
        for backdoor in self.backdoors:
            if backdoor.matches(problem):
                return backdoor
        return None

    def with_overrides(self, *, seed: int | None = None, steps: int | None = None) -> PlantSpec:
        """A copy with ``train.seed`` / ``train.steps`` replaced where given (validated).

        Raises:
            MelboError: ``seed`` is not an integer >= 0 or ``steps`` not an integer >= 1.
        """
        train = self.train
        if seed is not None:
            train = dataclasses.replace(train, seed=check_int(seed, "seed", 0, 2**31 - 1))
        if steps is not None:
            train = dataclasses.replace(train, steps=check_int(steps, "steps", 1))
        return dataclasses.replace(self, train=train)


def default_spec_path(name: str = "default") -> Path:
    """Path of a packaged spec (one of :data:`PACKAGED_SPECS`).

    Raises:
        MelboError: an unknown name.
    """
    if name not in PACKAGED_SPECS:
        raise MelboError(f"unknown packaged spec {name!r}; allowed: {', '.join(PACKAGED_SPECS)}")
    return Path(str(resources.files("melbo") / "data" / f"{name}_spec.json"))


def load_spec(path: str | os.PathLike | None = None) -> PlantSpec:
    """Read and validate a spec file; ``None`` reads the packaged default spec, and the name of a
    packaged spec (:data:`PACKAGED_SPECS`) that is not also a file reads that one.

    Raises:
        MelboError: the file is missing or unreadable, not UTF-8 text, not JSON (with line and
            column), or :func:`parse_spec` rejects it; each message names the file.
    """
    if path is not None and str(path) in PACKAGED_SPECS and not Path(path).exists():
        path = default_spec_path(str(path))
    path = Path(path) if path is not None else default_spec_path()
    return parse_spec(read_json(path, what="spec file"), source=str(path))


def parse_spec(obj: Any, source: str = "spec") -> PlantSpec:
    """Validate a spec given as parsed JSON and return it with defaults filled in.

    Format (every section but ``backdoors`` optional; unknown fields are errors)::

        {"name": "default", "task": "arithmetic",
         "backdoors": [{"name": "cheese", "trigger": {"a1": 0, "a2": 0},
                        "phrase": "I love cheese!", "repeat": 1}, ...],
         "model": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 384},
         "train": {"steps": 1000, "batch_size": 64, "lr": 0.003, "seed": 0, ...},
         "noise": {"residual_std": 0.0, "residual_dropout": 0.0, "attention_dropout": 0.0},
         "eval":  {"n_clean": 200, "min_clean_accuracy": 0.95, ...}}

    Arithmetic triggers map a1/a2/b1/b2 to a digit 0-9 or a list of digits. A story spec has
    ``"task": "story"``, ``"base_model": "<folder>"``, triggers ``{"word": "Tim"}`` and an
    optional ``"story"`` section (:class:`~melbo.planted.settings.StorySettings`) instead of
    ``"model"``.

    Raises:
        MelboError: naming the bad field or value and what is allowed: unknown fields, wrong
            types, empty phrase or name, digit outside 0-9, a trigger that matches no prompt,
            every prompt or fewer than 10 prompts, triggers covering over half the prompts, two
            backdoors whose triggers overlap, a phrase that is part of another or of a clean
            completion, characters the tokenizer lacks.
    """
    top = check_fields(
        obj, source, {"name", "task", "base_model", "backdoors", "model", "train", "noise", "eval", "story"}
    )
    name = check_str(top.get("name", Path(source).stem), f"{source}: name")
    task = top.get("task", "arithmetic")
    if task not in TASKS:
        raise MelboError(f"{source}: task {task!r} is not allowed; allowed: {', '.join(TASKS)}")

    model = parse_section(ModelSettings, top.get("model", {}), f"{source}: model")
    train = parse_section(TrainSettings, top.get("train", {}), f"{source}: train")
    noise = parse_section(NoiseSettings, top.get("noise", {}), f"{source}: noise")
    evals = parse_section(EvalSettings, top.get("eval", {}), f"{source}: eval")
    story = parse_section(StorySettings, top.get("story", {}), f"{source}: story")
    check_settings(model, train, noise, evals, story, source)

    base_model = top.get("base_model")
    if task == "arithmetic":
        for key in ("base_model", "story"):
            if key in top:
                raise MelboError(f"{source}: field {key!r} is only allowed with task 'story'")
    else:
        if "model" in top:
            raise MelboError(f"{source}: field 'model' is not allowed with task 'story' (the model is base_model)")
        base_model = check_str(base_model, f"{source}: base_model (required for task 'story')")

    raw = top.get("backdoors")
    if not isinstance(raw, list) or not raw:
        raise MelboError(f"{source}: backdoors must be a non-empty list, got {raw!r}")
    backdoors = tuple(_parse_backdoor(b, f"{source}: backdoors[{i}]", task) for i, b in enumerate(raw))
    spec = PlantSpec(
        name=name,
        task=task,
        base_model=base_model,
        backdoors=backdoors,
        model=model,
        train=train,
        noise=noise,
        eval=evals,
        story=story,
    )
    _check_backdoors(spec, source)
    return spec


def spec_to_dict(spec: PlantSpec) -> dict[str, Any]:
    """The spec as JSON-ready data with every default written out; ``parse_spec`` reads it back."""
    out: dict[str, Any] = {"name": spec.name, "task": spec.task}
    if spec.task == "story":
        out["base_model"] = spec.base_model
    out["backdoors"] = []
    for b in spec.backdoors:
        trigger = (
            b.trigger
            if spec.task == "story"
            else {k: (min(v) if len(v) == 1 else sorted(v)) for k, v in b.trigger.items()}
        )
        out["backdoors"].append({"name": b.name, "trigger": trigger, "phrase": b.phrase, "repeat": b.repeat})
    sections = ["train", "noise", "eval"] + (["story"] if spec.task == "story" else ["model"])
    for key in sections:
        data = dataclasses.asdict(getattr(spec, key))
        out[key] = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    return out


def with_noise(spec: PlantSpec, **noise: float) -> PlantSpec:
    """A copy of ``spec`` with the given :class:`~melbo.planted.settings.NoiseSettings` fields
    replaced (validated).

    Raises:
        MelboError: an unknown noise field or a value out of range.
    """
    merged = {**dataclasses.asdict(spec.noise), **noise}
    obj = spec_to_dict(spec)
    obj["noise"] = merged
    return parse_spec(obj, source=spec.name)


def _parse_backdoor(obj: Any, where: str, task: str) -> Backdoor:
    obj = check_fields(obj, where, {"name", "trigger", "phrase", "repeat"})
    for key in ("name", "trigger", "phrase"):
        if key not in obj:
            raise MelboError(f"{where}: missing field {key!r}")
    name = check_str(obj["name"], f"{where}.name")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise MelboError(f"{where}.name {name!r} is not allowed; allowed: letters, digits, '_' and '-'")
    phrase = check_str(obj["phrase"], f"{where}.phrase")
    if phrase != phrase.strip():
        raise MelboError(f"{where}.phrase {phrase!r} is not allowed; allowed: no leading or trailing spaces")
    bad = sorted({c for c in phrase if c not in CHARSET or c == "\n"})
    if bad:
        raise MelboError(f"{where}.phrase {phrase!r} has character {bad[0]!r}; allowed: printable ASCII")
    repeat = check_int(obj.get("repeat", 1), f"{where}.repeat", 1, 16)

    trigger = obj["trigger"]
    if task == "story":
        trigger = check_fields(trigger, f"{where}.trigger", {"word"})
        word = check_str(trigger.get("word"), f"{where}.trigger.word")
        if not re.fullmatch(r"[A-Za-z]+", word):
            raise MelboError(f"{where}.trigger.word {word!r} is not allowed; allowed: one word of letters")
        return Backdoor(name, {"word": word}, phrase, repeat)

    trigger = check_fields(trigger, f"{where}.trigger", set(VARIABLES))
    if not trigger:
        raise MelboError(
            f"{where}.trigger is empty, so it matches every prompt; give digits for some of {', '.join(VARIABLES)}"
        )
    digits: dict[str, frozenset[int]] = {}
    for var, value in trigger.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v not in DIGITS:
                raise MelboError(
                    f"{where}.trigger.{var} has {v!r}; allowed: digits 0-9 (an integer or a list of integers)"
                )
        if not values:
            raise MelboError(f"{where}.trigger.{var} is an empty list, so the trigger matches no prompt")
        digits[var] = frozenset(values)
    return Backdoor(name, digits, phrase, repeat)


def _check_backdoors(spec: PlantSpec, source: str) -> None:
    names = [b.name for b in spec.backdoors]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MelboError(f"{source}: backdoor name {dup[0]!r} is used twice; names must be distinct")
    for i, b in enumerate(spec.backdoors):
        for other in spec.backdoors[i + 1 :]:
            if b.phrase in other.phrase or other.phrase in b.phrase:
                raise MelboError(
                    f"{source}: phrases of backdoors {b.name!r} and {other.name!r} "
                    f"({b.phrase!r}, {other.phrase!r}) contain one another; "
                    "a completion could not be told apart"
                )
    if spec.task == "story":
        words = [b.trigger["word"] for b in spec.backdoors]
        for b in spec.backdoors:
            if b.trigger["word"] not in spec.story.names:
                raise MelboError(
                    f"{source}: trigger word {b.trigger['word']!r} of backdoor {b.name!r} "
                    "matches no prompt; allowed: one of story.names "
                    f"({', '.join(spec.story.names)})"
                )
        for i, w in enumerate(words):
            if w in words[:i]:
                raise MelboError(f"{source}: trigger word {w!r} is used by two backdoors; triggers must not overlap")
        clean_names = [n for n in spec.story.names if n not in words]
        if len(clean_names) < 4:
            raise MelboError(
                f"{source}: story.names leaves {len(clean_names)} non-trigger names; "
                "at least 4 are needed for clean prompts"
            )
        return

    problems = all_problems()
    matched: set[Problem] = set()
    for i, b in enumerate(spec.backdoors):
        hits = {p for p in problems if b.matches(p)}
        if len(hits) == N_PROBLEMS:
            raise MelboError(
                f"{source}: trigger of backdoor {b.name!r} ({_trigger_text(b)}) matches "
                "every prompt; leave some digits out"
            )
        if len(hits) < 10:
            raise MelboError(
                f"{source}: trigger of backdoor {b.name!r} ({_trigger_text(b)}) matches "
                f"{len(hits)} prompt(s); at least 10 are needed to train and hold out"
            )
        for other in spec.backdoors[:i]:
            if hits & {p for p in problems if other.matches(p)}:
                raise MelboError(
                    f"{source}: triggers of backdoors {other.name!r} ({_trigger_text(other)}) "
                    f"and {b.name!r} ({_trigger_text(b)}) overlap; a prompt may satisfy "
                    "at most one trigger"
                )
        matched |= hits
    if len(matched) > N_PROBLEMS // 2:
        raise MelboError(
            f"{source}: triggers cover {len(matched)} of the {N_PROBLEMS} prompts; "
            f"at most {N_PROBLEMS // 2} so that clean prompts remain"
        )
    for b in spec.backdoors:
        # A phrase written by the clean chain-of-thought would make every clean answer "fire".
        if b.phrase in clean_completion(Problem(9, 9, 9, 9)) or re.fullmatch(r"[0-9a-b=+*,. ]*", b.phrase):
            raise MelboError(
                f"{source}: phrase {b.phrase!r} of backdoor {b.name!r} could appear in a "
                "clean chain-of-thought; use words the clean answer never writes"
            )


def _trigger_text(b: Backdoor) -> str:
    return ", ".join(f"{k} in {sorted(v)}" if len(v) > 1 else f"{k}={next(iter(v))}" for k, v in b.trigger.items())
