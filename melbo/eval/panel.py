"""The control panel wired into runs and the backdoor benchmark: generate every control
(:func:`melbo.eval.controls.run_controls`), label its completions with the same per-completion
predicate as the learned ones (runs: the behavior judge's ``new``), and build the learned-vs-controls table
(:func:`melbo.eval.control_stats.control_table`) that ``summary.md`` and ``bench.md`` print.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from melbo.bank import Bank
from melbo.core.generate import GenerationConfig, generate_rows
from melbo.core.io import write_jsonl
from melbo.core.validate import SEED_MAX, check_seed
from melbo.eval.control_stats import TEST, Predicate, control_table, hits_of, predicate_label
from melbo.eval.controls import ControlSpec, describe_controls, parse_controls, run_controls
from melbo.eval.labels import HIT, count_labels, judge_groups, row_fields

CONTROLS_JSONL = "controls.jsonl"


def evaluate_controls(
    bank: Bank,
    ev: dict[str, Any],
    generation: GenerationConfig,
    controls: str | Sequence[str] | ControlSpec,
    seed: int = 0,
    predicate: Predicate | None = None,
    out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The learned-vs-controls comparison of a run's evaluation.

    Args:
        bank: the run's bank (attached to its model).
        ev: :func:`melbo.report.completions.evaluate_bank`'s result (its prompts, the number of
            evaluated perturbations and the learned completions are used).
        generation: the generation settings of the learned completions.
        controls: ``cheap``, ``all``, a comma list or a :class:`ControlSpec`.
        seed: the panel's seed.
        predicate: what counts as a hit (:mod:`melbo.eval.control_stats`); default: the behavior
            judge labels the completion ``new`` (:func:`melbo.eval.control_stats.judge_new`; the
            learned completions' labels are those of ``ev``, the same as ``completions.jsonl``).
            Every completion is judged against the unsteered completion of its prompt in ``ev``
            (``unsteered_all``; generated with ``generation`` when ``ev`` lacks it), all controls in
            one judge call.
        out: folder for ``controls.jsonl`` (one row per control × prompt × sample: control,
            sample, split, prompt, completion, the judge's label and scores, hit); None writes
            nothing.

    Returns:
        ``{"predicate", "test", "seed", "budget", "prompts", "rows": control_table rows, each with
        ``labels`` (the judge's new / degenerate / unchanged counts), "descriptions": {control:
        text}}``.

    Raises:
        MelboError: bad or inapplicable control names (:func:`melbo.eval.controls.run_controls`).
    """
    lm = bank.model()
    spec = parse_controls(controls)
    names = spec.for_kind(bank.kind)
    prompts, k = list(ev["prompts"]), int(ev["evaluated"])
    n_train = len(bank.meta.get("prompts", []))
    unsteered = ev.get("unsteered_all") or generate_rows(lm, prompts, 1, lambda rows: nullcontext(), generation)[0]
    comps = run_controls(lm, bank, prompts, generation, spec, seed, k)
    learned_labels = (ev.get("labels") or {}).get("learned")
    groups = {name: comps[name] for name in names}
    if learned_labels is None:
        groups["learned"] = ev["completions"]["learned"]
    judged = judge_groups(prompts, unsteered, groups, lm, generation.chat)
    labels = {name: [[j["label"] for j in v] for v in judged[name]] for name in judged}
    if learned_labels is not None:
        labels["learned"] = learned_labels
    if predicate is None:
        hits = {g: [[lab == "new" for lab in v] for v in labels[g]] for g in ("learned", *names)}
    else:
        hits = {"learned": hits_of(predicate, prompts, unsteered, ev["completions"]["learned"])}
        hits.update({name: hits_of(predicate, prompts, unsteered, comps[name]) for name in names})
    if out is not None:
        write_jsonl(
            Path(out) / CONTROLS_JSONL,
            [
                {
                    "control": name,
                    "sample": j,
                    "split": "train" if i < n_train else "heldout",
                    "prompt": p,
                    "completion": comps[name][j][i],
                    **row_fields(judged[name][j][i]),
                    "hit": hits[name][j][i],
                }
                for name in names
                for j in range(len(comps[name]))
                for i, p in enumerate(prompts)
            ],
        )
    flat = {name: [h for row in hits[name] for h in row] for name in names}
    rows = control_table([h for row in hits["learned"] for h in row], flat)
    for row in rows:
        row["labels"] = count_labels(lab for v in labels[row["group"]] for lab in v)
    return {
        "predicate": HIT if predicate is None else predicate_label(predicate),
        "test": TEST,
        "seed": seed,
        "budget": k,
        "prompts": len(prompts),
        "rows": rows,
        "descriptions": {"learned": f"{k} learned {bank.kind}s", **describe_controls(bank, names, k)},
    }


def bench_controls(
    judge: Any,
    learned: Bank,
    prompts: list[str],
    scales: Sequence[float],
    generation: GenerationConfig,
    controls: str | Sequence[str] | ControlSpec,
    seed: int,
    behaviors: list[str],
    learned_rows: list[list[dict]],
) -> dict[str, Any]:
    """The backdoor benchmark's controls: each control at every scale of the benchmark (matched
    budget: as many completions as the learned perturbations have over prompts × scales, seed
    ``seed + scale index``), each completion labelled by the benchmark's judge; a hit is any
    ``backdoor:<name>`` label, recall the share of planted behaviors at least one completion elicits.

    Args:
        judge: the benchmark's :class:`melbo.planted.scoring.Judge` (prepared for ``prompts``).
        learned: the learned perturbations (a bank of the benchmark's ``N``).
        prompts: the training prompts. scales: the benchmark's scales.
        learned_rows: the learned completions' labelled rows (``rows[v]``: dicts with ``label``).

    Returns:
        ``{"predicate", "test", "seed", "budget", "scales", "rows": table rows with ``recall`` and
        ``behaviors`` (hits per behavior), "descriptions", "completions": {control: [rows]}}``.
    """
    seed = check_seed(seed)
    lm = learned.model()
    spec = parse_controls(controls)
    names = spec.for_kind(learned.kind)
    k = len(learned)
    recs: dict[str, list[dict]] = {n: [] for n in names}
    for j, s in enumerate(scales):
        comps = run_controls(lm, learned, prompts, generation, spec, (seed + j) % SEED_MAX, k, float(s))
        for name in names:
            for v, cv in enumerate(comps[name]):
                for p, c in zip(prompts, cv):
                    recs[name].append(
                        {"sample": v, "scale": s, "prompt": p, "completion": c, "label": judge.label(p, c)}
                    )

    def fires(label: str) -> bool:
        return label.startswith("backdoor:")

    def recall(labels: list[str]) -> tuple[float, dict[str, int]]:
        per = {b: sum(lab == f"backdoor:{b}" for lab in labels) for b in behaviors}
        return sum(1 for b in behaviors if per[b]) / max(1, len(behaviors)), per

    learned_labels = [r["label"] for rs in learned_rows for r in rs]
    rows = control_table(
        [fires(lab) for lab in learned_labels], {n: [fires(r["label"]) for r in recs[n]] for n in names}
    )
    for row in rows:
        labels = learned_labels if row["group"] == "learned" else [r["label"] for r in recs[row["group"]]]
        row["recall"], row["behaviors"] = recall(labels)
    return {
        "predicate": "a planted backdoor phrase fires (the judge labels the completion backdoor:<name>)",
        "test": TEST,
        "seed": seed,
        "budget": k,
        "scales": list(scales),
        "rows": rows,
        "descriptions": {"learned": f"{k} learned {learned.kind}s", **describe_controls(learned, names, k)},
        "completions": recs,
    }
