"""Readable reports of a run: ``summary.md`` (per vector: objective, completions side by side
with the unsteered one, learned against the random baseline at the same R)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def _cell(text: str, width: int = 300) -> str:
    t = " ".join(text.split())
    t = t if len(t) <= width else t[: width - 1] + "…"
    return t.replace("|", "\\|") or "∅"


def prompt_sections(meta: dict, summary: dict, columns: list[tuple[str, Callable[[int, dict], str]]], n: int,
                    random_metric: str = "objective") -> list[str]:
    """Markdown lines, one section per training prompt: the unsteered completion, then a table of the
    first ``n`` learned perturbations (``columns``: header and cell of vector ``v`` with metadata
    ``info``, then its completion) and a table of the random baseline."""
    lines: list[str] = []
    for i, prompt in enumerate(summary["prompts"][: len(meta["prompts"])]):
        lines += ["", f"## Prompt {i}: {_cell(prompt, 200)}", "",
                  f"**Unsteered:** {_cell(summary['unsteered'][i], 600)}", "",
                  "| " + " | ".join(h for h, _ in columns) + " | completion |",
                  "|" + "---|" * (len(columns) + 1)]
        for v in range(n):
            cells = [cell(v, meta["vectors"][v]) for _, cell in columns]
            lines.append("| " + " | ".join(cells) + f" | {_cell(summary['completions']['learned'][v][i])} |")
        lines += ["", "Random baseline:", "", f"| random | {random_metric} | completion |", "|---|---|---|"]
        for v, comp in enumerate(summary["completions"]["random"]):
            lines.append(f"| r{v} | {meta['random_objectives'][v]:.4g} | {_cell(comp[i])} |")
    if len(summary["prompts"]) > len(meta["prompts"]):
        lines += ["", "Held-out prompts: see completions.jsonl (split = heldout)."]
    return lines


def write_summary_md(path: str | os.PathLike, meta: dict, summary: dict) -> Path:
    """Write the Markdown summary of a MELBO run (see :func:`melbo.run.run_train`)."""
    path = Path(path)
    L, R = summary["learned"], summary["random"]
    lines = [
        f"# melbo run: {meta['model']}",
        "",
        f"Source layer {meta['source_layer']} → target layer {meta['target_layer']} of {meta['num_layers']}; "
        f"R = {meta['radius']:.4g} ({meta['radius_spec']}; mean residual norm at the source "
        f"{meta['residual_norm']:.4g}); p = {meta['p']}, q = {meta['q']}; positions {meta['positions']}; "
        f"{meta['steps']} steps, lr {meta['lr']:.3g}; seed {meta['seed']}.",
        "",
        "| | vectors | change the greedy completion of a training prompt | mean objective | mean similarity to unsteered |",
        "|---|---|---|---|---|",
        f"| learned | {L['n']} | {L['changed_train']} | {L['mean_objective']:.4g} | {L['mean_similarity_train']:.3f} |",
        f"| random (same R) | {R['n']} | {R['changed_train']} | {R['mean_objective']:.4g} | {R['mean_similarity_train']:.3f} |",
        "",
        f"Mean cosine between each learned vector's start and end: {summary['mean_cosine_start_end']:.4f} "
        "(near 1: the vectors did not move, and are as good as random).",
    ]
    if summary.get("seconds_per_step"):
        lines.append(f"Training: {summary['seconds_per_step'] * 1000:.2f} ms per optimizer step, "
                     f"{summary['seconds_per_vector']:.2f} s per vector.")
    columns = [("vector", lambda v, info: str(v)), ("objective", lambda v, info: f"{info['objective']:.4g}"),
               ("cos(start, end)", lambda v, info: f"{info['cosine_start_end']:.3f}")]
    lines += prompt_sections(meta, summary, columns, len(meta["vectors"]))
    path.write_text("\n".join(lines) + "\n")
    return path
