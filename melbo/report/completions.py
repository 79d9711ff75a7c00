"""Completions of a bank's perturbations beside the unsteered model and the random baseline at the
same R (METHOD.md sections 1 and 4), and how learned and random compare.

``completions.jsonl`` has one line per (unsteered | learned | random perturbation) × prompt, on
the training prompts (split ``train``) and held-out ones (``heldout``). Each steered line carries
the behavior judge's ``label`` (``new``, ``degenerate`` or ``unchanged``, :mod:`melbo.eval.judge`,
judged with the unsteered model against the unsteered line of its prompt) and ``scores``
(``degenerate``, ``new``, ``unchanged`` in [0, 1], summing to 1, and ``reasons``); then the older
fields: ``changed`` (the greedy completion differs), ``similarity`` (difflib ratio, 1 = same),
``coherent`` (:func:`melbo.quality.is_coherent`, on every line) and, with a sentence-embedding
model, ``embedding_distance`` to the unsteered completion (cosine distance). One judge call labels
the run: each distinct text is scored by the model and embedded once.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from melbo.bank import Bank
from melbo.core.generate import GenerationConfig
from melbo.core.io import write_jsonl
from melbo.eval.labels import JUDGE_NAME, coherent, count_labels, judge_groups, row_fields
from melbo.quality import DIFFERENT

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


def completion_row(kind: str, vector: int | None, split: str, judged: dict, measure: str) -> dict[str, Any]:
    """One line of ``completions.jsonl`` from the judge's row ``judged`` (module docstring); the
    unsteered completion's line has no label (it is the reference)."""
    row: dict[str, Any] = {
        "kind": kind,
        "vector": vector,
        "split": split,
        "prompt": judged["prompt"],
        "completion": judged["completion"],
    }
    if kind != "unsteered":
        row.update(row_fields(judged))
        row["changed"] = judged["completion"] != judged["unsteered"]
        row["similarity"] = round(similarity(judged["completion"], judged["unsteered"]), 4)
    row["coherent"] = coherent(judged["scores"]["features"])
    if measure == "embedding":
        row["embedding_distance"] = round(float(judged["scores"]["distance"]), 4)
    return row


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
        ``{"learned": stats, "random": stats, "unsteered": [training prompts' unsteered
        completions], "unsteered_all": [every prompt's], "completions": {"learned": [[...]],
        "random": [[...]]}, "labels": {"learned": [[label of vector v, prompt i]], "random": ...},
        "judge": {"name", "distance": "embedding" or "overlap"}, "prompts": [...], "evaluated":
        count}``; stats: :func:`group_stats` with ``labels_train`` (``{"new", "degenerate",
        "unchanged"}`` counts over the training prompts; ``labels_heldout`` likewise when there are
        held-out prompts), ``coherent_train`` and ``coherent_and_different_train`` (shares; the
        latter None without a sentence-embedding model).

    Raises:
        MelboError: see :meth:`melbo.bank.Bank.generate`.
    """
    train_prompts = list(bank.meta.get("prompts", []))
    prompts = train_prompts + list(heldout)
    split = ["train"] * len(train_prompts) + ["heldout"] * len(heldout)
    k = len(bank) if count is None else min(count, len(bank))
    gen = {f: getattr(generation, f) for f in generation.__dataclass_fields__}
    base, L, R = bank.generate_beside_random(prompts, k, **gen)  # one batched generate for all three
    l_obj = [bank.info(i).get("objective", 0.0) for i in range(k)]
    r_obj = (bank.meta.get("random_objectives") or [])[: len(R)]
    judged = judge_groups(
        prompts, base, {"unsteered": [base], "learned": L, "random": R}, bank.model(), generation.chat
    )
    measure = judged["unsteered"][0][0]["scores"]["distance_measure"]
    rows = [
        completion_row(kind, None if kind == "unsteered" else v, split[i], j, measure)
        for kind in ("unsteered", "learned", "random")
        for v, group in enumerate(judged[kind])
        for i, j in enumerate(group)
    ]
    if out is not None:
        write_jsonl(Path(out) / COMPLETIONS, rows)
    train = [i for i, s in enumerate(split) if s == "train"]
    qual: dict[str, dict] = {}
    for kind in ("learned", "random"):
        mine = [r for r in rows if r["kind"] == kind and r["split"] == "train"]
        held = [r for r in rows if r["kind"] == kind and r["split"] == "heldout"]
        n = max(1, len(mine))
        qual[kind] = {
            "labels_train": count_labels(r["label"] for r in mine),
            **({"labels_heldout": count_labels(r["label"] for r in held)} if held else {}),
            "coherent_train": sum(r["coherent"] for r in mine) / n,
            "coherent_and_different_train": None
            if measure != "embedding"
            else sum(r["coherent"] and r["embedding_distance"] > DIFFERENT for r in mine) / n,
        }
    return {
        "learned": {**group_stats(L, base, train, l_obj), **qual["learned"]},
        "random": {**group_stats(R, base, train, r_obj), **qual["random"]},
        "unsteered": base[: len(train_prompts)],
        "unsteered_all": base,
        "completions": {"learned": L, "random": R},
        "labels": {g: [[j["label"] for j in v] for v in judged[g]] for g in ("learned", "random")},
        "judge": {"name": JUDGE_NAME, "distance": measure},
        "prompts": prompts,
        "evaluated": k,
    }
