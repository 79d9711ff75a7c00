"""The real-model part of ``melbo demo``: MELBO on a real pretrained model beside random vectors."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from melbo.bank import Bank
from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig
from melbo.core.models import load_model
from melbo.run import train

DEMO_PROMPT = "Once upon a time, there was a little girl named Lily."
DEMO_MODEL = "tinystories-656k"
DEMO_RADIUS = "32"  # measured: 12/16 learned vs 1/16 random change the completion (benchmarks/real_models.py)


def shared_model(name: str) -> str:
    """Path of a real model shipped in ../shared/models (the MELBO_MODELS_DIR variable overrides).

    Raises:
        MelboError: the model is not there.
    """
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    root = os.environ.get("MELBO_MODELS_DIR") or os.path.join(here, "..", "shared", "models")
    path = os.path.normpath(os.path.join(root, name))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MelboError(f"the demo model {name!r} is not at {path}; set MELBO_MODELS_DIR to the folder that holds it")
    return path


def real_model_demo(run_dir: str, device: str, echo: Callable[[str], Any]) -> Bank | None:
    """Train 16 steering vectors on a real pretrained model into ``run_dir``; None when no model is here."""
    try:
        model = shared_model(DEMO_MODEL)
    except MelboError as e:
        echo(f"skipping the real-model part: {e}")
        return None
    echo(f"== 1. MELBO on {model}: 16 steering vectors at R = {DEMO_RADIUS}, prompt {DEMO_PROMPT!r}")
    lm = load_model(model, device)
    return train(
        lm,
        [DEMO_PROMPT],
        "melbo",
        out=run_dir,
        num_vectors=16,
        radius=DEMO_RADIUS,
        heldout=["The little dog ran to the park"],
        generation=GenerationConfig(max_new_tokens=48),
    )
