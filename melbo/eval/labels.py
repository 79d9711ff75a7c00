"""The behavior judge (:mod:`melbo.eval.judge`) applied to a command's completions: every group
(learned, random, each control) judged in one batch against the unsteered completion of the same
prompt, the per-row fields the output files carry, and the label counts the reports print.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from melbo.core.errors import MelboError
from melbo.core.models import LoadedModel
from melbo.eval.judge import LABELS, judge
from melbo.quality import MAX_REPETITION, MAX_SURPRISING

ORDER = ("new", "degenerate", "unchanged")
"""The labels in the order the reports print them (the finding first)."""
JUDGE_NAME = "the behavior judge (melbo.eval.judge)"
HIT = "the behavior judge labels the completion new (fluent, and not the unsteered completion's content)"
"""The hit predicate of the controls panel, as the reports name it."""


def judge_groups(
    prompts: Sequence[str],
    unsteered: Sequence[str],
    groups: Mapping[str, Sequence[Sequence[str]]],
    lm: LoadedModel | None = None,
    chat: bool = False,
    embedder: str | bool | None = None,
) -> dict[str, list[list[dict]]]:
    """Judge ``groups[g][v][i]``, the completion of ``prompts[i]`` under perturbation ``v`` of group
    ``g``, against ``unsteered[i]``, all groups in one :func:`melbo.eval.judge.judge` call (one
    embedding batch; each distinct text once).

    Args:
        lm: the unsteered model (its tokens and log-probabilities; None: text-only features).
        embedder: as :func:`melbo.eval.judge.judge` (None: the default model, else the word-overlap
            distance with a warning).

    Returns:
        ``{g: [[judged row of v, i]]}``: the judge's rows (``label``, ``scores`` with ``features``).

    Raises:
        MelboError: a group whose perturbation has not one completion per prompt; a named
            ``embedder`` that cannot be loaded.
    """
    if len(unsteered) != len(prompts):
        raise MelboError(f"{len(unsteered)} unsteered completions for {len(prompts)} prompts")
    rows = []
    for g, group in groups.items():
        for v, comps in enumerate(group):
            if len(comps) != len(prompts):
                raise MelboError(f"{g} {v} has {len(comps)} completions for {len(prompts)} prompts")
            rows += [{"prompt": p, "unsteered": unsteered[i], "completion": comps[i]} for i, p in enumerate(prompts)]
    judged = iter(judge(rows, lm=lm, embedder=embedder, chat=chat) if rows else [])
    return {g: [[next(judged) for _ in prompts] for _ in group] for g, group in groups.items()}


def label_rows(
    groups: Mapping[str, Sequence[Sequence[dict]]],
    unsteered: Mapping[str, str],
    lm: LoadedModel | None = None,
    chat: bool = False,
    key: str = "judge_label",
) -> dict[str, dict[str, int]]:
    """Judge rows that already carry another label (the planted benchmark's ``{"prompt",
    "completion", "label", ...}``, ``groups[g][v]`` a list of them), all groups in one
    :func:`melbo.eval.judge.judge` call against ``unsteered[prompt]``; each row gets the judge's
    label under ``key`` (in place).

    Returns:
        ``{g: count_labels(...)}`` over each group's rows.

    Raises:
        MelboError: a row whose prompt has no unsteered completion.
    """
    flat = [r for group in groups.values() for rows in group for r in rows]
    missing = sorted({r["prompt"] for r in flat} - set(unsteered))
    if missing:
        raise MelboError(f"no unsteered completion of prompt {missing[0]!r} to judge its completions against")
    judged = judge(
        [{"prompt": r["prompt"], "unsteered": unsteered[r["prompt"]], "completion": r["completion"]} for r in flat],
        lm=lm,
        chat=chat,
    )
    for r, j in zip(flat, judged):
        r[key] = j["label"]
    return {g: count_labels(r[key] for rows in group for r in rows) for g, group in groups.items()}


def row_fields(judged: dict) -> dict[str, Any]:
    """The fields one judged row adds to an output row: ``label`` and ``scores`` (``degenerate``,
    ``new``, ``unchanged`` rounded to 4 decimals, and ``reasons``, the criteria that fired)."""
    s = judged["scores"]
    return {
        "label": judged["label"],
        "scores": {**{k: round(float(s[k]), 4) for k in LABELS}, "reasons": list(s.get("reasons", []))},
    }


def coherent(features: dict[str, float]) -> bool:
    """The old ``coherent`` flag (:func:`melbo.quality.is_coherent`) from the judge's features of a
    completion judged with the model: not blank, at most :data:`melbo.quality.MAX_SURPRISING` of its
    tokens surprising (``surprise``) and at most :data:`melbo.quality.MAX_REPETITION` of its word
    3-grams repeated (``word_repeated_3``); the same numbers ``is_coherent`` computes.

    Raises:
        MelboError: features of a text-only judgment (no ``surprise``).
    """
    if "surprise" not in features:
        raise MelboError("the coherent flag needs the judge's log-probability features (judge with the model)")
    return (
        features["chars"] > 0
        and features["surprise"] <= MAX_SURPRISING
        and features["word_repeated_3"] <= MAX_REPETITION
    )


def count_labels(labels: Iterable[str]) -> dict[str, int]:
    """``{"new": n, "degenerate": n, "unchanged": n}`` over ``labels`` (other labels are not counted)."""
    found = list(labels)
    return {k: found.count(k) for k in ORDER}


def counts_text(counts: Mapping[str, int]) -> str:
    """``new 5, degenerate 3, unchanged 8 of 16``: label counts as one phrase."""
    return ", ".join(f"{k} {counts.get(k, 0)}" for k in ORDER) + f" of {sum(counts.get(k, 0) for k in ORDER)}"
