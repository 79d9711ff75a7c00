"""The planted models the demo and the tests use: shipped in the package, else cached, else
planted on first use; and loading a planted model folder with its spec."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from melbo.core.errors import MelboError
from melbo.core.io import cache_dir
from melbo.core.models import LoadedModel, load_model
from melbo.planted.plant import SPEC_FILE, check_report, plant
from melbo.planted.spec import load_spec, spec_to_dict

DATA = Path(__file__).resolve().parent.parent / "data"
# Shipped fixtures (each folder's README gives its rebuild command):
#   planted-default  arithmetic, default spec, train.seed 0, 600 steps (3.4 MB)
#   planted-story    story spec: stories260k fine-tuned with two trigger words (1.1 MB)
FIXTURES = {"default": DATA / "planted-default", "story": DATA / "planted-story"}


def demo_model(echo: Callable[[str], Any] = print, name: str = "default") -> Path:
    """The folder of a demo planted model (``name`` in :data:`FIXTURES`): the shipped fixture, else
    a cached build, else a new build (the packaged spec of that name, seed 0; slow on a CPU) into
    :func:`melbo.core.io.cache_dir`.

    Raises:
        MelboError: an unknown name; the build misses its thresholds.
    """
    if name not in FIXTURES:
        raise MelboError(f"unknown demo model {name!r}; allowed: {', '.join(FIXTURES)}")
    for folder in (FIXTURES[name], cache_dir() / f"planted-{name}"):
        if (folder / SPEC_FILE).is_file() and (folder / "model.safetensors").is_file():
            return folder
    cached = cache_dir() / f"planted-{name}"
    echo(
        f"no planted model shipped or cached; planting one into {cached} ({name} spec, seed 0; "
        f"this trains a small model and takes a while on a CPU)"
    )
    check_report(plant(load_spec(name), cached, seed=0, progress=True, overwrite=True))
    return cached


def load_planted_lm(
    path: str | os.PathLike, spec_path: str | os.PathLike | None = None, device: str = "cpu"
) -> tuple[LoadedModel, Any]:
    """``(lm, spec)`` for a planted model folder: the model (float32) and the spec from
    ``spec_path`` or the folder's ``plant_spec.json``. A ``spec_path`` must plant the same
    behaviors (task, triggers, phrases) as the spec the folder records, where it records one.

    Raises:
        MelboError: no spec given and none in the folder; a spec whose behaviors differ from
            the recorded spec's (naming both); the model cannot be loaded.
    """
    folder = Path(path)
    recorded = folder / SPEC_FILE
    if spec_path is None:
        if not recorded.is_file():
            raise MelboError(
                f"{str(folder)!r} has no {SPEC_FILE}; pass --spec SPEC.json (the spec the model was planted with)"
            )
        spec_path = recorded
    spec = load_spec(spec_path)
    if recorded.is_file() and Path(spec_path) != recorded:
        check_same_behaviors(spec, load_spec(recorded), str(spec_path), str(recorded))
    return load_model(str(folder), device, "float32"), spec


def _behaviors(d: dict) -> str:
    """What a spec (as :func:`spec_to_dict`) plants, in one line."""
    return f"{d['task']} task: " + "; ".join(
        f"{b['name']} ({', '.join(f'{k}={v}' for k, v in b['trigger'].items())}) -> {b['phrase']!r} x{b['repeat']}"
        for b in d["backdoors"]
    )


def check_same_behaviors(spec: Any, recorded: Any, spec_source: str, recorded_source: str) -> None:
    """Refuse to judge a model by a spec that plants other behaviors than the one it was planted
    with: its recall would count behaviors never planted as missed.

    Raises:
        MelboError: the task or the backdoors (names, triggers, phrases, repeats) differ; names
            both specs and what each plants.
    """
    mine, theirs = spec_to_dict(spec), spec_to_dict(recorded)
    if (mine["task"], mine["backdoors"]) == (theirs["task"], theirs["backdoors"]):
        return
    raise MelboError(
        f"spec {spec.name!r} ({spec_source}) is not the spec the model was planted with: {recorded_source} "
        f"records spec {recorded.name!r}. {spec.name!r} plants {_behaviors(mine)}; {recorded.name!r} plants "
        f"{_behaviors(theirs)}. Leave out --spec to use the recorded spec"
    )
