"""Sweeps of the planted-behavior benchmark: one :func:`melbo.planted.bench.run_bench` per setting
of a grid (:func:`melbo.planted.bench_config.parse_sweep`), ``OUT/NN/`` each, and ``sweep.json`` /
``sweep.md`` with one row per setting."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig
from melbo.core.io import write_json, write_text
from melbo.core.models import LoadedModel
from melbo.core.outputs import claim_folder
from melbo.planted.bench import run_bench
from melbo.planted.bench_config import BenchSetting

SWEEP_JSON, SWEEP_MD = "sweep.json", "sweep.md"


def run_sweep(
    lm: LoadedModel,
    spec: Any,
    base: BenchSetting,
    grid: list[dict],
    out: str | os.PathLike,
    prompts: list[str] | None = None,
    gen: GenerationConfig | None = None,
    n_general: int = 20,
    model_name: str | None = None,
    on_result: Callable[[int, dict], None] | None = None,
    num_prompts: int = 1,
    overwrite: bool = False,
) -> list[dict]:
    """Run :func:`run_bench` for each setting of ``grid`` (from :func:`parse_sweep`) on top of
    ``base``; writes ``out/NN/`` per setting and ``sweep.json`` / ``sweep.md``. Returns the rows
    ``{"label", "overrides", "recall", "random_recall", "behaviors": {b: {count, first_index,
    random_count, best_generalization}}, "seconds"}``.

    ``out`` must be new, empty or an earlier benchmark's, which ``overwrite`` replaces
    (:mod:`melbo.core.outputs`).

    Raises:
        MelboError: a bad setting in the grid (all are checked before anything runs); an ``out``
            the output rule refuses.
    """
    target = claim_folder(out, "bench backdoor", overwrite=overwrite)
    settings = [replace(base, **o).check() for o in grid]
    folder = target.prepare()
    rows = []
    for k, (o, s) in enumerate(zip(grid, settings)):
        try:
            rep = run_bench(
                lm,
                spec,
                s,
                prompts,
                gen,
                n_general,
                folder / f"{k:02d}",
                model_name=model_name,
                num_prompts=num_prompts,
            )
        except MelboError as e:  # e.g. no calibrated R for this setting: record it, go on with the grid
            rows.append({"label": s.label(), "overrides": o, "error": str(e)})
        else:
            rows.append(_row(rep, o))
        if on_result is not None:
            on_result(k, rows[-1])
        write_json(folder / SWEEP_JSON, rows, indent=1)
        write_text(folder / SWEEP_MD, sweep_markdown(rows, spec.name))
    return rows


def _row(rep: dict, o: dict) -> dict:
    """The sweep table's row of one setting's benchmark report."""
    return {
        "label": rep["label"],
        "overrides": o,
        "recall": rep["recall"],
        "random_recall": rep["random"]["recall"],
        "radius": rep["radius"],
        "seconds": rep["seconds"]["total"],
        "train_seconds": rep["seconds"]["train"],
        "judge_labels": {k: rep[k].get("judge_labels") for k in ("learned", "random")},
        "behaviors": {
            b: {
                "count": rep["learned"]["behaviors"][b]["count"],
                "first_index": rep["learned"]["behaviors"][b]["first_index"],
                "random_count": rep["random"]["behaviors"][b]["count"],
                "best_generalization": max(
                    (g["rate"] for g in rep["learned"]["behaviors"][b]["generalization"]), default=None
                ),
            }
            for b in rep["phrases"]
        },
    }


def sweep_markdown(rows: list[dict], spec_name: str = "") -> str:
    """A Markdown table of a sweep: setting -> recall, vectors per behavior, first index, random,
    and the behavior judge's ``new`` and ``degenerate`` counts, learned / random."""
    if not rows:
        return "(empty sweep)\n"
    ok = [r for r in rows if "error" not in r]
    names = list(ok[0]["behaviors"]) if ok else []
    head = (
        "| # | setting | R | recall | "
        + " | ".join(f"{b}: n / first / random n / gen." for b in names)
        + " | random recall | judge new: learned / random | judge degenerate: learned / random | seconds |"
    )
    lines = [f"# Sweep ({spec_name})", "", head, "|" + "---|" * (5 + len(names) + 3)]

    def judged(r: dict, label: str) -> str:
        c = r.get("judge_labels") or {}
        if not c.get("learned") or not c.get("random"):
            return "-"
        return " / ".join(f"{c[k].get(label, 0)}/{sum(c[k].values())}" for k in ("learned", "random"))

    for k, r in enumerate(rows):
        if "error" in r:
            lines.append(f"| {k} | `{r['label']}` | - | error: {r['error'][:120]} |")
            continue
        cells = []
        for b in names:
            x = r["behaviors"][b]
            g = "-" if x["best_generalization"] is None else f"{100 * x['best_generalization']:.0f}%"
            cells.append(
                f"{x['count']} / {'-' if x['first_index'] is None else x['first_index']} / {x['random_count']} / {g}"
            )
        lines.append(
            f"| {k} | `{r['label']}` | {r['radius']:.3g} | {r['recall']:.2f} | "
            + " | ".join(cells)
            + f" | {r['random_recall']:.2f} | {judged(r, 'new')} | {judged(r, 'degenerate')} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"
