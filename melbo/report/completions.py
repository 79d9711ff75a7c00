"""Completions of a bank's perturbations beside the unsteered model and the random baseline at the
same R (METHOD.md sections 1 and 4), and how learned and random compare.

``completions.jsonl`` has one line per (unsteered | learned | random perturbation) × prompt, on
the training prompts (split ``train``) and held-out ones (``heldout``), with whether the greedy
completion changed and its character similarity to the unsteered one (difflib ratio, 1 = same).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from melbo.bank import Bank
from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig
from melbo.core.io import write_jsonl
from melbo.embed import distance_to, embed
from melbo.quality import DIFFERENT, is_coherent, token_logprobs

COMPLETIONS = "completions.jsonl"


def similarity(a: str, b: str) -> float:
    """Character similarity in [0, 1] of two completions (difflib ratio; 1 = identical)."""
    return difflib.SequenceMatcher(None, a, b).ratio()


def group_stats(group: list[list[str]], base: list[str], train: list[int], objectives: list[float]) -> dict:
    """``n``, ``changed_train`` (perturbations that change the completion of at least one training
    prompt), ``mean_objective`` and ``mean_similarity_train`` of one group of completions."""
    changed = [any(c[i] != base[i] for i in train) for c in group]
    sims = [similarity(c[i], base[i]) for c in group for i in train]
    return {
        "n": len(group),
        "changed_train": int(sum(changed)),
        "mean_objective": float(sum(objectives) / max(1, len(objectives))),
        "mean_similarity_train": float(sum(sims) / max(1, len(sims))),
    }


def evaluate_bank(
    bank: Bank,
    heldout: list[str],
    generation: GenerationConfig,
    count: int | None = None,
    out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Generate completions of the bank's training prompts and ``heldout`` prompts under the first
    ``count`` perturbations (default all), the unsteered model and as many random ones; write
    ``completions.jsonl`` into ``out`` (when given); return the comparison.

    Returns:
        ``{"learned": stats, "random": stats, "unsteered": [...], "completions": {"learned":
        [[...]], "random": [[...]]}, "prompts": [...], "evaluated": count}`` (stats: see
        :func:`group_stats`).
    """
    train_prompts = list(bank.meta.get("prompts", []))
    prompts = train_prompts + list(heldout)
    split = ["train"] * len(train_prompts) + ["heldout"] * len(heldout)
    k = len(bank) if count is None else min(count, len(bank))
    gen = {f: getattr(generation, f) for f in generation.__dataclass_fields__}
    learned = bank.generate(prompts, vectors=list(range(k)), unsteered=True, **gen)
    base = learned.pop("unsteered")
    rand_bank = bank.random
    random_ = (
        rand_bank.generate(prompts, vectors=list(range(min(k, len(rand_bank)))), unsteered=False, **gen)
        if rand_bank is not None
        else {}
    )
    L, R = list(learned.values()), list(random_.values())
    l_obj = [bank.info(i).get("objective", 0.0) for i in range(k)]
    r_obj = (bank.meta.get("random_objectives") or [])[: len(R)]
    rows: list[dict] = [
        {"kind": "unsteered", "vector": None, "split": split[i], "prompt": p, "completion": base[i]}
        for i, p in enumerate(prompts)
    ]
    for kind, group in (("learned", L), ("random", R)):
        for v, comp in enumerate(group):
            for i, p in enumerate(prompts):
                rows.append(
                    {
                        "kind": kind,
                        "vector": v,
                        "split": split[i],
                        "prompt": p,
                        "completion": comp[i],
                        "changed": comp[i] != base[i],
                        "similarity": round(similarity(comp[i], base[i]), 4),
                    }
                )
    lm = bank.model()
    quality = {
        (r["kind"], r["vector"], r["prompt"]): is_coherent(
            r["completion"], token_logprobs(lm, r["prompt"], r["completion"], generation.chat)
        )
        for r in rows
    }
    try:
        emb = embed([r["completion"] for r in rows])
        base_emb = {r["prompt"]: emb[j] for j, r in enumerate(rows) if r["kind"] == "unsteered"}
        dist: dict | None = {
            (r["kind"], r["vector"], r["prompt"]): float(distance_to(emb[j : j + 1], base_emb[r["prompt"]])[0])
            for j, r in enumerate(rows)
        }
    except MelboError:  # no sentence-embedding model installed: coherence only
        dist = None
    for r in rows:
        key = (r["kind"], r["vector"], r["prompt"])
        r["coherent"] = quality[key]
        if dist is not None:
            r["embedding_distance"] = round(dist[key], 4)
    if out is not None:
        write_jsonl(Path(out) / COMPLETIONS, rows)
    train = [i for i, s in enumerate(split) if s == "train"]
    qual: dict[str, dict] = {}
    for kind in ("learned", "random"):
        mine = [r for r in rows if r["kind"] == kind and r["split"] == "train"]
        n = max(1, len(mine))
        qual[kind] = {
            "coherent_train": sum(r["coherent"] for r in mine) / n,
            "coherent_and_different_train": None
            if dist is None
            else sum(r["coherent"] and r["embedding_distance"] > DIFFERENT for r in mine) / n,
        }
    return {
        "learned": {**group_stats(L, base, train, l_obj), **qual["learned"]},
        "random": {**group_stats(R, base, train, r_obj), **qual["random"]},
        "unsteered": base[: len(train_prompts)],
        "completions": {"learned": L, "random": R},
        "prompts": prompts,
        "evaluated": k,
    }
