"""``radius="auto"``: choose R where learned completions are most diverse (METHOD.md section 4 and
the post's comments: "for Llama3.2-1B the diversity appears to decay after the cusp value for R;
picking R at highest average diversity was a decent heuristic").

For each R of a log grid (multiples of the median residual norm at the source), a few
perturbations are trained with the run's method and settings (fewer steps), and as many random
ones are drawn at the same R; each writes a greedy completion of every prompt. Completions are
embedded with a sentence-transformers model (:mod:`melbo.embed`) and scored per group:

- ``changed``: share of completions that differ from the unsteered one;
- ``coherent``: share that are fluent text, :func:`coherent` (not a loop of repeated words, and
  not far less likely under the unsteered model than its own completion);
- ``diversity``: mean pairwise cosine distance of the embeddings of the coherent completions,
  with the unsteered completion among them (so that "nothing changed" scores 0);
- ``score = diversity × coherent``: what the cusp maximizes.

The chosen R is the grid point of the highest learned score (:func:`pick_cusp`); the random
baseline is swept the same way and reported beside it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from melbo.bank import Bank
from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig
from melbo.core.io import write_json
from melbo.core.models import LoadedModel
from melbo.core.prompts import encode_prompts, format_prompt
from melbo.core.slice import Slice
from melbo.embed import embed, mean_pairwise_distance
from melbo.methods.base import Context
from melbo.methods.registry import get_method
from melbo.report.plot import plot_sweep

SWEEP_FILE, SWEEP_PLOT = "radius_sweep.json", "radius_sweep.png"
GRID = tuple(float(x) for x in np.geomspace(0.005, 1.0, 9))
"""Default grid, in multiples of the median residual norm at the source (0.005x to 1x)."""


def repetition(text: str) -> float:
    """Share of repeated word 3-grams in ``text`` (0: none repeat; near 1: one phrase looping)."""
    words = text.split()
    grams = [tuple(words[i : i + 3]) for i in range(max(0, len(words) - 2))]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def token_logprob(lm: LoadedModel, prompt: str, completion: str, chat: bool = False) -> float:
    """Mean log-probability (nats per token) of ``completion`` after ``prompt`` under the
    unsteered model; ``-inf`` for an empty completion."""
    tok = lm.tokenizer
    text = format_prompt(tok, prompt, chat)
    special = not (chat and getattr(tok, "chat_template", None))
    p_ids = tok(text, add_special_tokens=special)["input_ids"]
    c_ids = tok(completion, add_special_tokens=False)["input_ids"]
    if not c_ids:
        return -math.inf
    ids = torch.tensor([p_ids + c_ids], device=lm.device)
    with torch.no_grad():
        logp = lm.model(input_ids=ids, use_cache=False).logits[0, len(p_ids) - 1 : -1].float().log_softmax(-1)
    return float(logp.gather(-1, ids[0, len(p_ids) :, None]).mean())


def coherent(
    text: str, logprob: float, base_logprob: float, max_repetition: float = 0.5, max_drop: float = 3.0
) -> bool:
    """Whether a completion is fluent text: at most ``max_repetition`` repeated 3-grams and a
    mean token log-probability under the unsteered model at most ``max_drop`` nats below that
    of the unsteered completion."""
    return bool(text.strip()) and repetition(text) <= max_repetition and logprob >= base_logprob - max_drop


def group_scores(texts: list[str], base: str, emb: torch.Tensor, base_emb: torch.Tensor, ok: list[bool]) -> dict:
    """``changed``, ``coherent``, ``diversity``, ``distance_to_unsteered`` and ``score`` of one group."""
    n = max(1, len(texts))
    keep = [i for i, k in enumerate(ok) if k]
    pool = torch.cat([base_emb[None], emb[keep]]) if keep else base_emb[None]
    div = mean_pairwise_distance(pool)
    dist = float((1 - emb.double() @ base_emb.double()).mean()) if len(texts) else 0.0
    coh = len(keep) / n
    return {
        "changed": sum(t != base for t in texts) / n,
        "coherent": coh,
        "diversity": div,
        "distance_to_unsteered": dist,
        "score": div * coh,
    }


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
    per_radius: int = 4,
    steps: int | None = 100,
    max_new_tokens: int = 48,
    embedder: str | None = None,
    show_progress: bool = False,
) -> dict:
    """Sweep R for ``method`` (module docstring) and return the curve and the chosen R.

    Args:
        settings: the run's checked settings (its radius is ignored; ``num_vectors`` becomes
            ``per_radius``; ``steps`` is capped at ``steps`` when the method trains).
        grid: multiples of the median residual norm at the source.

    Returns:
        ``{"grid": [...], "residual_norm", "rows": [{"radius", "relative", "learned": scores,
        "random": scores, "seconds"}], "chosen": {"radius", "relative", "index"},
        "completions": {...}, "embedder", "rule"}``.
    """
    cls = get_method(method)
    batch = encode_prompts(lm.tokenizer, prompts, settings.positions, settings.chat)
    norm = Slice(lm.model, lm.blocks, batch, src, tgt).residual_norm()
    g = dataclasses.replace(gen, max_new_tokens=max_new_tokens, temperature=0.0)
    fields = {f.name: getattr(g, f.name) for f in dataclasses.fields(g)}
    base = Bank({"vectors": torch.zeros(1, lm.d_model)}, {"prompts": prompts, "source_layer": src}, lm)
    base_texts = base.generate(prompts, unsteered=True, **fields)["unsteered"]
    base_lp = [token_logprob(lm, p, c, settings.chat) for p, c in zip(prompts, base_texts)]
    rows, comps = [], {}
    for rel in grid:
        t0 = time.perf_counter()
        over: dict[str, Any] = {"radius": f"{rel * norm:.6g}", "num_vectors": per_radius}
        if steps is not None and hasattr(settings, "steps"):
            over["steps"] = min(settings.steps, steps)
        s = dataclasses.replace(settings, **over)
        m = cls(Context(lm, batch, src, tgt, s, show_progress))
        fit = m.fit(None, None)
        bank = Bank(
            {**fit.tensors, **m.random_baseline(fit)},
            {
                "prompts": prompts,
                "source_layer": src,
                "kind": cls.kind,
                "radius": m.radius,
                **{k: v for k, v in m.meta.items() if k in ("module_name", "conv1d")},
            },
            lm,
        )
        k = min(per_radius, len(bank))
        row: dict[str, Any] = {"radius": m.radius, "relative": rel}
        for kind, b in (("learned", bank), ("random", bank.random)):
            out = b.generate(prompts, vectors=list(range(k)), unsteered=False, **fields)  # type: ignore[union-attr]
            texts = [c for v in out.values() for c in v]
            who = [i for _ in out for i in range(len(prompts))]
            lps = [token_logprob(lm, prompts[i], t, settings.chat) for t, i in zip(texts, who)]
            ok = [coherent(t, lp, base_lp[i]) for t, lp, i in zip(texts, lps, who)]
            emb = embed(texts + base_texts, embedder)
            per = [
                group_scores(
                    [t for t, i in zip(texts, who) if i == j],
                    base_texts[j],
                    emb[[n for n, i in enumerate(who) if i == j]],
                    emb[len(texts) + j],
                    [o for o, i in zip(ok, who) if i == j],
                )
                for j in range(len(prompts))
            ]
            row[kind] = {key: float(np.mean([p[key] for p in per])) for key in per[0]}
            comps[f"{kind}@{rel:.4g}x"] = texts
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    i = pick_cusp([r["radius"] for r in rows], [r["learned"]["score"] for r in rows])
    return {
        "grid": list(grid),
        "residual_norm": norm,
        "rows": rows,
        "unsteered": base_texts,
        "chosen": {"radius": rows[i]["radius"], "relative": rows[i]["relative"], "index": i},
        "per_radius": per_radius,
        "steps": over.get("steps"),
        "max_new_tokens": max_new_tokens,
        "embedder": embedder or os.environ.get("MELBO_EMBEDDER") or "all-MiniLM-L6-v2",
        "rule": "argmax over R of diversity × coherent share of the learned completions",
        "completions": comps,
    }


def sweep_table(sweep: dict) -> str:
    """The sweep as a text table (one line per R, learned and random)."""
    lines = [
        "      R   (x norm) | learned: changed coherent diversity score | random: changed coherent diversity score"
    ]
    for i, r in enumerate(sweep["rows"]):
        L, Q = r["learned"], r["random"]
        mark = "  <- chosen" if i == sweep["chosen"]["index"] else ""
        lines.append(
            f"{r['radius']:9.4g} ({r['relative']:6.3g}x) |   {L['changed']:6.2f} {L['coherent']:8.2f} "
            f"{L['diversity']:9.3f} {L['score']:5.3f} |  {Q['changed']:6.2f} {Q['coherent']:8.2f} "
            f"{Q['diversity']:9.3f} {Q['score']:5.3f}{mark}"
        )
    return "\n".join(lines)


def write_sweep(folder: str | os.PathLike, sweep: dict) -> list[Path]:
    """Write ``radius_sweep.json`` and the plot ``radius_sweep.png`` (diversity, coherent and
    changed share against R, learned and random) into ``folder``."""
    folder = Path(folder)
    out = [write_json(folder / SWEEP_FILE, sweep)]
    out.append(plot_sweep(folder / SWEEP_PLOT, sweep))
    return out
