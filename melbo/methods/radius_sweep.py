"""``radius="auto"``: choose R where learned completions are most diverse while still coherent
(METHOD.md section 4 and the post's comments: "for Llama3.2-1B the diversity appears to decay after
the cusp value for R; picking R at highest average diversity was a decent heuristic").

For each R of a log grid (relative radii ``kx``, factor 2 apart, ascending: multiples of the
median residual norm at the source for vectors; for adapters, what their random starts add to the
MLP output, :mod:`melbo.methods.adapter`), a few perturbations are trained with the run's method
and settings (fewer steps), and as many random ones are drawn at the same R; each writes a
greedy completion of every prompt. Completions are scored per group (:mod:`melbo.quality`, :mod:`melbo.embed`):

- ``changed``: share that differ from the unsteered completion (as strings);
- ``coherent``: share that are coherent text (:func:`melbo.quality.is_coherent`);
- ``different``: share that are coherent *and* differ in meaning from the unsteered completion
  (embedding distance above :data:`melbo.quality.DIFFERENT`);
- ``diversity``: mean pairwise cosine distance of the embeddings of the coherent completions,
  the unsteered one among them (so that "nothing changed" scores 0);
- ``score``: the learned group's ``diversity × coherent`` minus the random group's: how much more
  diverse fluent behavior the learned perturbations write than random ones at the same R.

The chosen R is the grid point of the highest score (:func:`pick_cusp`). Subtracting the random
baseline follows the post's observation (METHOD.md section 1): at the Goldilocks R learned vectors
give diverse fluent behaviors where random ones only re-phrase; at larger R random vectors change
the completions too (measured: stories260k at 0.32x, random completions as diverse as learned
ones), and such an R shows nothing special about the learned vectors. The sweep stops
early once the learned completions have turned incoherent (coherent share below 1/4 at two grid
points in a row after the best one). The random baseline is swept the same way.

For MELBO vectors the radii are trained :data:`melbo.methods.sweep_batch.STACK` at a time as one
stacked block and generated in one batched call (:mod:`melbo.methods.sweep_batch`: the same
vectors and completions as one radius at a time); other methods fit one radius at a time.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from melbo.bank import Bank
from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig, generate_rows
from melbo.core.io import write_json
from melbo.core.models import LoadedModel
from melbo.core.prompts import encode_prompts
from melbo.core.slice import Slice
from melbo.embed import distance_to, embed, mean_pairwise_distance
from melbo.methods.base import Context
from melbo.methods.registry import get_method
from melbo.methods.sweep_batch import STACK, stacked_trials, stacks
from melbo.quality import DIFFERENT, is_coherent, token_logprobs_batch
from melbo.report.plot import plot_sweep

SWEEP_FILE, SWEEP_PLOT = "radius_sweep.json", "radius_sweep.png"
GRID = tuple(float(0.0025 * 2**k) for k in range(10))
"""Default grid, in multiples of the median residual norm at the source: 0.0025x to 1.28x, factor 2."""


def group_scores(texts: list[str], base: str, emb: torch.Tensor, base_emb: torch.Tensor, ok: list[bool]) -> dict:
    """``changed``, ``coherent``, ``different``, ``diversity``, ``distance_to_unsteered`` and
    ``score`` of one group of completions of one prompt (module docstring)."""
    n = max(1, len(texts))
    keep = [i for i, k in enumerate(ok) if k]
    pool = torch.cat([base_emb[None], emb[keep]]) if keep else base_emb[None]
    dist = distance_to(emb, base_emb) if len(texts) else torch.zeros(0)
    coh = len(keep) / n
    div = mean_pairwise_distance(pool)
    return {
        "changed": sum(t != base for t in texts) / n,
        "coherent": coh,
        "different": sum(bool(ok[i]) and float(dist[i]) > DIFFERENT for i in range(len(texts))) / n,
        "diversity": div,
        "distance_to_unsteered": float(dist.mean()) if len(texts) else 0.0,
        "score": div * coh,
    }


def score_completions(
    lm: LoadedModel,
    prompts: list[str],
    groups: dict[str, list[list[str]]],
    base: list[str],
    chat: bool = False,
    embedder: str | None = None,
    cache: dict[tuple[str, str], torch.Tensor] | None = None,
) -> dict[str, dict]:
    """Scores (:func:`group_scores`, averaged over prompts) of each group of completions:
    ``groups[name][v][i]`` is perturbation ``v``'s completion of prompt ``i``. ``cache`` keeps the
    unsteered model's token log-probabilities of each ``(prompt, completion)`` across calls."""
    names = list(groups)
    flat = [c for name in names for comp in groups[name] for c in comp]
    pairs = [(p, comp[i]) for name in names for comp in groups[name] for i, p in enumerate(prompts)]
    logprobs = cache if cache is not None else {}
    token_logprobs_batch(lm, pairs, chat, cache=logprobs)  # each distinct completion scored once, batched
    emb = embed(flat + base, embedder)
    out, k = {}, 0
    for name in names:
        comps = groups[name]
        idx = {i: [k + v * len(prompts) + i for v in range(len(comps))] for i in range(len(prompts))}
        k += len(comps) * len(prompts)
        per = []
        for i, prompt in enumerate(prompts):
            texts = [comps[v][i] for v in range(len(comps))]
            ok = [is_coherent(t, logprobs[(prompt, t)]) for t in texts]
            per.append(group_scores(texts, base[i], emb[idx[i]], emb[len(flat) + i], ok))
        out[name] = {key: float(np.mean([p[key] for p in per])) for key in per[0]} if per else {}
    return out


def pick_cusp(radii: list[float], scores: list[float]) -> int:
    """Index of the chosen R: the highest score (the smaller R on a tie).

    Raises:
        MelboError: empty or mismatched lists, or no finite score.
    """
    if not radii or len(radii) != len(scores):
        raise MelboError(f"need one score per radius, got {len(radii)} radii and {len(scores)} scores")
    finite = [(s, -i) for i, s in enumerate(scores) if math.isfinite(s)]
    if not finite:
        raise MelboError("no finite diversity score in the radius sweep")
    return -max(finite)[1]


def sweep_radius(
    lm: LoadedModel,
    prompts: list[str],
    method: str,
    settings: Any,
    src: int,
    tgt: int,
    gen: GenerationConfig,
    grid: tuple[float, ...] = GRID,
    per_radius: int = 3,
    steps: int | None = None,
    max_new_tokens: int = 32,
    embedder: str | None = None,
    show_progress: bool = False,
    echo: Any = None,
    stack: int = STACK,
) -> dict:
    """Sweep R for ``method`` (module docstring) and return the curve and the chosen R.

    Args:
        settings: the run's checked settings (its radius is ignored; ``num_vectors`` becomes
            ``per_radius``; DCT fits ``4 × per_radius`` factors).
        steps: optimizer steps of the sweep's perturbations; None: the run's own, so that they are
            as strong as the ones the run trains at the chosen R (shorter training would choose a
            larger R than the trained vectors can take: measured on gemma-3-270m, 60-step vectors
            chose 0.02x, where 300-step vectors were coherent only half of the time).
        grid: multiples of the median residual norm at the source, ascending.
        echo: called with one line per grid point as it finishes (progress for people).
        stack: radii trained as one stacked block where the method allows it
            (:mod:`melbo.methods.sweep_batch`; the same vectors as one radius at a time, faster).

    Returns:
        ``{"grid", "residual_norm", "rows": [{"radius", "relative", "learned": scores, "random":
        scores, "seconds"}], "chosen": {"radius", "relative", "index"}, "unsteered",
        "completions", "embedder", "rule", ...}``.
    """
    cls = get_method(method)
    batch = encode_prompts(lm.tokenizer, prompts, settings.positions, settings.chat)
    sl = Slice(lm.model, lm.blocks, batch, src, tgt, writes_only=bool(getattr(settings, "writes_only", False)))
    norm = sl.residual_norm()
    g = dataclasses.replace(gen, max_new_tokens=max_new_tokens, temperature=0.0)
    fields = {f.name: getattr(g, f.name) for f in dataclasses.fields(g)}
    base: list[str] | None = None  # the unsteered completions (the stacked path generates them with its first stack)
    rows: list[dict] = []
    comps: dict[str, list[str]] = {}
    logprobs: dict[tuple[str, str], torch.Tensor] = {}  # one scoring of each distinct completion
    over: dict[str, Any] = {"num_vectors": per_radius}
    if hasattr(settings, "steps"):
        over["steps"] = settings.steps if steps is None else min(settings.steps, steps)
    if hasattr(settings, "factors"):
        over["factors"] = min(settings.factors or 4 * per_radius, 4 * per_radius)
    low_after_best = 0
    s = dataclasses.replace(settings, **over)
    ctx = Context(lm, batch, src, tgt, s, show_progress)
    trials = (
        stacked_trials(ctx, sl, prompts, sorted(grid), g, stack, unsteered=True)
        if stacks(method, ctx, sl)
        else _one_by_one(ctx, cls, prompts, sorted(grid), fields)
    )
    for rel, radius, groups, seconds in trials:
        t0 = time.perf_counter()
        if "unsteered" in groups:
            base = groups.pop("unsteered")[0]
        if base is None:
            base = generate_rows(lm, prompts, 1, lambda rows: nullcontext(), g)[0]
        scores = score_completions(lm, prompts, groups, base, settings.chat, embedder, logprobs)
        row: dict[str, Any] = {
            "radius": radius,
            "relative": rel,
            **scores,
            "score": scores["learned"]["score"] - scores["random"]["score"],
            "seconds": seconds + time.perf_counter() - t0,
        }
        rows.append(row)
        for kind, group in groups.items():
            comps[f"{kind}@{rel:.4g}x"] = [c for v in group for c in v]
        if echo is not None:
            L, Q = row["learned"], row["random"]
            echo(
                f"  R = {radius:.4g} ({rel:.3g}x): learned coherent {L['coherent']:.2f}, different "
                f"{L['different']:.2f}, diversity {L['diversity']:.3f} | random coherent {Q['coherent']:.2f}, "
                f"different {Q['different']:.2f}, diversity {Q['diversity']:.3f}  ({row['seconds']:.0f} s)"
            )
            echo(f"      e.g. learned: {' '.join(groups['learned'][0][0].split())[:100]!r}")
        best = max(r["score"] for r in rows)
        past_best = row["score"] < best
        low_after_best = low_after_best + 1 if past_best and row["learned"]["coherent"] < 0.25 else 0
        if low_after_best >= 2:
            break
    assert base is not None  # the grid is not empty
    i = pick_cusp([r["radius"] for r in rows], [r["score"] for r in rows])
    return {
        "grid": sorted(grid),
        "residual_norm": norm,
        "rows": rows,
        "unsteered": base,
        "chosen": {"radius": rows[i]["radius"], "relative": rows[i]["relative"], "index": i},
        "per_radius": per_radius,
        "steps": over.get("steps"),
        "max_new_tokens": max_new_tokens,
        "embedder": embedder or os.environ.get("MELBO_EMBEDDER") or "all-MiniLM-L6-v2",
        "rule": "argmax over R of diversity x coherent share, learned minus random",
        "completions": comps,
    }


def _one_by_one(
    ctx: Context, cls: Any, prompts: list[str], grid: list[float], fields: dict[str, Any]
) -> Iterator[tuple[float, float, dict[str, list[list[str]]], float]]:
    """The sweep's radii one at a time, each fitted by the method itself (any method) and its
    learned and random perturbations generated; yields what :func:`stacked_trials` yields."""
    for rel in grid:
        t0 = time.perf_counter()
        s = dataclasses.replace(ctx.settings, radius=f"{rel:.6g}x")  # each method reads kx its own way
        m = cls(dataclasses.replace(ctx, settings=s))
        fit = m.fit(None, None)
        bank = Bank(
            {**fit.tensors, **m.random_baseline(fit)},
            {
                "prompts": prompts,
                "source_layer": ctx.src,
                "kind": cls.kind,
                "radius": m.radius,
                **{k: v for k, v in m.meta.items() if k in ("module_name", "conv1d")},
            },
            ctx.lm,
        )
        k = min(s.num_vectors, len(bank))
        rand = bank.random
        assert rand is not None
        groups = {
            kind: list(b.generate(prompts, vectors=list(range(k)), unsteered=False, **fields).values())
            for kind, b in (("learned", bank), ("random", rand))
        }
        yield rel, m.radius, groups, time.perf_counter() - t0


def write_sweep(folder: str | os.PathLike, sweep: dict) -> list[Path]:
    """Write ``radius_sweep.json`` and the plot ``radius_sweep.png`` (diversity, coherent and
    changed share against R, learned and random) into ``folder``."""
    folder = Path(folder)
    out = [write_json(folder / SWEEP_FILE, sweep)]
    out.append(plot_sweep(folder / SWEEP_PLOT, sweep))
    return out
