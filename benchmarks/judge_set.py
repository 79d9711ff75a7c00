"""Steered completions to hand-label for the behavior judge (unchanged / degenerate / new).

For every (model, prompt, R) of a fixed grid: MELBO vectors trained on that prompt at R (default
layers) and the bank's random vectors at the same R, each completion generated greedily beside
the unsteered one. gemma-3-270m on six varied prompts at R = 0.0025x ... 0.08x, and the micro
story models of ``../shared/models`` on two story prompts each. Deterministic: the seed of a
(model, prompt) is ``--seed`` + the prompt's index (the same at every R, so a random vector k is
one direction at every R); no downloads.

One JSON line per steered completion: ``id`` (``model|p<prompt index>|<R multiple>|<kind>|v<k>``),
``model``, ``prompt``, ``unsteered``, ``completion``, ``kind`` (learned | random), ``radius`` (the
multiple, e.g. ``"0.01x"``), ``radius_abs`` (R in residual-norm units), ``vector``, ``seed``,
``source_layer``, ``target_layer``, ``steps``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/judge_set.py --out benchmarks/data/judge/rows.jsonl

About 25 minutes on one CPU core (gemma-3-270m: 36 trainings of 4 vectors x 60 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import melbo
from melbo.cli.demo import shared_model
from melbo.core.generate import GenerationConfig, generate

STORY = "Once upon a time, there was a little girl named Lily."
GEMMA_PROMPTS = [
    "Q: What is 17 times 3?\nA:",
    "Once upon a time, in a small village by the mountains,",
    "Write a short poem about the sea.\n",
    "def fibonacci(n):",
    "The capital of France is",
    "User: Hi! How are you today?\nAssistant:",
]
# (model, prompts, R multiples, vectors per kind, steps)
GRID = [
    ("gemma-3-270m", GEMMA_PROMPTS, ["0.0025x", "0.005x", "0.01x", "0.02x", "0.04x", "0.08x"], 4, 60),
    ("stories260k", [STORY, "Once upon a time"], ["0.05x", "0.1x", "0.2x", "0.4x"], 5, 100),
    # tinystories-656k ends the story right after a full stop: its second prompt has none
    ("tinystories-656k", ["Once upon a time", STORY.rstrip(".")], ["0.05x", "0.1x", "0.2x", "0.3x"], 5, 100),
]


def load(name: str) -> melbo.LoadedModel:
    """gemma-3-270m from the ``real`` extra, the micro models from ``../shared/models``."""
    return melbo.load_model(name if name == "gemma-3-270m" else shared_model(name), device="cpu")


def rows_for(lm, model: str, p_idx: int, prompt: str, radii, n: int, steps: int, seed: int, cfg, echo):
    """Rows of one (model, prompt): the unsteered completion once, then learned and random per R."""
    unsteered = generate(lm, [prompt], None, 0, cfg=cfg)[0][0]
    for mult in radii:
        t0 = time.perf_counter()
        bank = melbo.train(lm, prompt, radius=mult, num_vectors=n, steps=steps, seed=seed, show_progress=False)
        gen = dict(max_new_tokens=cfg.max_new_tokens, unsteered=False)
        comps = {"learned": bank.generate(prompt, **gen), "random": bank.generate(prompt, random=True, **gen)}
        for kind, out in comps.items():
            for k, texts in enumerate(out.values()):
                yield {
                    "id": f"{model}|p{p_idx}|{mult}|{kind}|v{k}",
                    "model": model,
                    "prompt": prompt,
                    "unsteered": unsteered,
                    "completion": texts[0],
                    "kind": kind,
                    "radius": mult,
                    "radius_abs": round(float(bank.meta["radius"]), 6),
                    "vector": k,
                    "seed": seed,
                    "source_layer": bank.meta["source_layer"],
                    "target_layer": bank.meta["target_layer"],
                    "steps": steps,
                }
        echo(f"{model} p{p_idx} {mult}: R={bank.meta['radius']:.4g}, {time.perf_counter() - t0:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/data/judge/rows.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--models", default=",".join(g[0] for g in GRID), help="a subset of the grid's models")
    args = ap.parse_args()
    wanted = args.models.split(",")
    unknown = set(wanted) - {g[0] for g in GRID}
    if unknown:
        raise SystemExit(f"error: unknown model(s) {sorted(unknown)}; allowed: {[g[0] for g in GRID]}")
    torch.manual_seed(args.seed)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    t0, count = time.perf_counter(), 0
    with open(tmp, "w", encoding="utf-8") as f:
        for model, prompts, radii, n, steps in GRID:
            if model not in wanted:
                continue
            lm = load(model)
            for p_idx, prompt in enumerate(prompts):
                for row in rows_for(lm, model, p_idx, prompt, radii, n, steps, args.seed + p_idx, cfg, print):
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    count += 1
                f.flush()
    os.replace(tmp, args.out)
    print(f"{count} rows -> {args.out} in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
