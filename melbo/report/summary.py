"""``summary.md`` and ``summary.json`` of a run: settings, learned against the random baseline at
the same R, then every evaluated perturbation's completion beside the unsteered one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from melbo.bank import Bank
from melbo.core.io import write_json, write_text
from melbo.eval.control_stats import controls_markdown
from melbo.eval.labels import JUDGE_NAME, ORDER, counts_text
from melbo.measure import kl_label
from melbo.report.behaviors import behaviors_markdown

SUMMARY_MD, SUMMARY_JSON = "summary.md", "summary.json"
KL_ROWS = 100  # rows of the KL table in summary.md (all rows are in measures.csv)


def _num(key: str, fmt: str = ".4g") -> Callable[[int, dict], str]:
    return lambda v, info: format(info[key], fmt) if isinstance(info.get(key), (int, float)) else "-"


# Columns per method: (header, cell of perturbation v with info dict).
COLUMNS: dict[str, list[tuple[str, Callable[[int, dict], str]]]] = {
    "melbo": [
        ("vector", lambda v, i: str(v)),
        ("objective", _num("objective")),
        ("cos(start, end)", _num("cosine_start_end", ".3f")),
    ],
    "adapter": [
        ("adapter", lambda v, i: str(v)),
        ("objective", _num("objective")),
        ("cos(start, end)", _num("cosine_start_end", ".3f")),
        ("‖RΩ_BΩ_Aᵀx‖", _num("perturbation_norm")),
    ],
    "rank1": [
        ("factor", lambda v, i: str(v)),
        ("objective", _num("objective")),
        ("cos(start, end)", _num("cosine_start_end", ".3f")),
        ("‖R b aᵀx‖", _num("perturbation_norm")),
        ("max overlap", _num("max_overlap", ".2e")),
    ],
    "dct": [
        ("rank", lambda v, i: str(v)),
        ("α", _num("alpha")),
        ("c", _num("causal_importance")),
        ("‖Δ(Rv)‖", _num("objective")),
    ],
    "ortho": [("index", lambda v, i: str(v)), ("norm", _num("norm")), ("loss", _num("loss"))],
}
TITLES = {
    "melbo": "MELBO steering vectors (METHOD.md section 1)",
    "adapter": "steering adapters (section 2)",
    "rank1": "a rank-1 factor population (section 2 adapters, CPE-style soft orthogonality)",
    "dct": "deep causal transcoding (section 5)",
    "ortho": "MELBO-ortho (section 3)",
}


def cell(text: str, width: int = 300) -> str:
    """One table cell: whitespace folded, cut to ``width``, pipes escaped, ∅ for empty."""
    t = " ".join(text.split())
    t = t if len(t) <= width else t[: width - 1] + "…"
    return t.replace("|", "\\|") or "∅"


def settings_line(meta: dict) -> str:
    """One sentence with the run's layers, R, positions and method settings."""
    keys = ("p", "q", "steps", "lr", "rank", "num_factors", "iterations", "sigma", "min_norm", "seed")
    extra = ", ".join(
        f"{k} = {meta[k]:.3g}" if isinstance(meta[k], float) else f"{k} = {meta[k]}"
        for k in keys
        if meta.get(k) is not None
    )
    cal = meta.get("calibration")
    spec = meta.get("radius_spec")
    how = (
        f"calibrated with λ = {cal['lam']:g}, ratio {cal['ratio']:.3g}"
        if isinstance(cal, dict)
        else str(spec)
        if spec is not None
        else "the norm of θ₀"
        if meta.get("method") == "ortho"
        else f"{meta.get('radius', float('nan')):.4g}"
    )
    return (
        f"Source layer {meta.get('source_layer')} → target layer {meta.get('target_layer')} of "
        f"{meta.get('num_layers')}; R = {meta.get('radius', float('nan')):.4g} ({how}; median residual norm at "
        f"the source {meta.get('residual_norm', float('nan')):.4g}); positions {meta.get('positions')}; "
        f"{'only the blocks’ writes (Z(θ) − θ)' if meta.get('writes_only') else 'residual path kept'}; {extra}."
    )


def sweep_table(sweep: dict) -> str:
    """The radius sweep as a text table: one line per R, learned and random side by side."""
    head = "changed coherent different diversity"
    lines = [f"        R  (x norm) | learned: {head} | random: {head} | score"]
    for i, r in enumerate(sweep["rows"]):
        cells = [
            " ".join(
                f"{r[kind][key]:{w}.2f}"
                for key, w in (("changed", 7), ("coherent", 8), ("different", 9), ("diversity", 9))
            )
            for kind in ("learned", "random")
        ]
        mark = "  <- chosen" if i == sweep["chosen"]["index"] else ""
        lines.append(f"{r['radius']:9.4g} ({r['relative']:6.3g}x) | {cells[0]} | {cells[1]} | {r['score']:6.3f}{mark}")
    return "\n".join(lines)


def share(x: float | None) -> str:
    """A share as a percentage ('-' when not measured)."""
    return "-" if x is None else f"{100 * x:.0f}%"


def label_cells(counts: dict | None) -> str:
    """``5 / 2 / 9``: the judge's new / degenerate / unchanged counts ('-' when not judged)."""
    return "-" if not counts else " / ".join(str(counts.get(k, 0)) for k in ORDER)


def judge_lines(ev: dict[str, Any]) -> list[str]:
    """How to read the label counts and the older flags, with the held-out prompts' counts."""
    L, R = ev["learned"], ev["random"]
    measure = (ev.get("judge") or {}).get("distance")
    lines = [
        f"Each steered completion is labelled by {JUDGE_NAME}, against the unsteered completion of its prompt: "
        "**new** (fluent, with content or style the unsteered completion lacks), **degenerate** (a loop, "
        "gibberish, mixed scripts or nothing) or **unchanged** (the unsteered content, re-phrased or not); "
        + (
            "new vs unchanged by sentence-embedding distance."
            if measure == "embedding"
            else "new vs unchanged by word overlap (no sentence-embedding model installed)."
        )
    ]
    if L.get("labels_heldout") or R.get("labels_heldout"):
        lines.append(
            f"Held-out prompts: learned {counts_text(L.get('labels_heldout') or {})}; "
            f"random {counts_text(R.get('labels_heldout') or {})}."
        )
    lines += [
        "",
        "Older flags, kept for comparison: coherent = at most 15% of the completion's tokens have probability "
        "below e^-6 under the unsteered model, and it is not a loop of word 3-grams (melbo.quality; a digit "
        "loop passes it); different = its sentence embedding is more than 0.15 (cosine distance) from the "
        "unsteered completion's.",
    ]
    return lines


def summary_markdown(bank: Bank, ev: dict[str, Any]) -> str:
    """The Markdown of ``summary.md`` for ``bank`` and its evaluation
    (:func:`melbo.report.completions.evaluate_bank`)."""
    meta, L, R = bank.meta, ev["learned"], ev["random"]
    columns = COLUMNS.get(bank.method, COLUMNS["melbo"])
    lines = [
        f"# melbo run: {TITLES.get(bank.method, bank.method)} on {meta.get('model')}",
        "",
        settings_line(meta),
        "",
        "| | perturbations | judge, training prompts: new / degenerate / unchanged | change the greedy completion "
        "of a training prompt | coherent | coherent and different | mean objective | mean similarity to unsteered |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {name} | {x['n']} | {label_cells(x.get('labels_train'))} | {x['changed_train']} | "
            f"{share(x.get('coherent_train'))} | {share(x.get('coherent_and_different_train'))} | "
            f"{x['mean_objective']:.4g} | {x['mean_similarity_train']:.3f} |"
            for name, x in (("learned", L), ("random (same R)", R))
        ),
        "",
        *judge_lines(ev),
        "",
    ]
    if len(bank) > ev["evaluated"]:
        lines.append(f"The bank holds {len(bank)} perturbations; the first {ev['evaluated']} are evaluated below.")
    cos = [float(c) for i in range(len(bank)) if isinstance(c := bank.info(i).get("cosine_start_end"), (int, float))]
    if cos and bank.method != "dct":
        lines.append(
            f"Mean cosine between each perturbation's start and end: {sum(cos) / len(cos):.4f} "
            "(near 1: they did not move, and are as good as random)."
        )
    if ev.get("seconds_per_step"):
        lines.append(
            f"Training: {ev['seconds_per_step'] * 1000:.2f} ms per optimizer step, "
            f"{ev['seconds_per_vector']:.2f} s per perturbation."
        )
    for key in ("stop_reason", "max_abs_cosine", "mean_abs_cos_V", "fit_seconds"):
        if meta.get(key) is not None:
            lines.append(
                f"{key.replace('_', ' ')}: {meta[key]:.4g}"
                if isinstance(meta[key], float)
                else f"{key.replace('_', ' ')}: {meta[key]}"
            )
    kl = ev.get("kl_to_base")
    if kl and bank.kind == "vector":  # METHOD.md section 3: KL to θ₀ (row 0) and to unsteered, and norms
        unsteered = ev.get("kl_to_unsteered") or []
        shown = min(len(kl), KL_ROWS)
        lines += [
            "",
            f"{kl_label('k||ref', '0')} and {kl_label('k||ref', 'unsteered')} (nats): the next-token "
            "distribution at the last prompt position steered by θ_k, against steered by θ_0 and unsteered"
            + (
                f"; the first {shown} of {len(kl)} rows (all in measures.csv, kl.png, norms.png)"
                if shown < len(kl)
                else " (also in measures.csv, kl.png, norms.png)"
            )
            + ".",
            "",
            f"| k | norm | {kl_label('k||ref', '0')} | {kl_label('k||ref', 'unsteered')} |",
            "|---|---|---|---|",
        ]
        for k in range(shown):
            u = f"{unsteered[k]:.4g}" if k < len(unsteered) else "-"
            lines.append(f"| {k} | {float(bank.vectors[k].double().norm()):.4g} | {kl[k]:.4g} | {u} |")
    if meta.get("radius_sweep"):
        sw = meta["radius_sweep"]
        lines += [
            "",
            f"R was chosen by the diversity sweep ({sw['rule']}; {sw['per_radius']} learned and random "
            f"perturbations per R, {sw['steps']} steps, {sw['max_new_tokens']} new tokens, embeddings "
            f"{sw['embedder']}; radius_sweep.json, radius_sweep.png):",
            "",
            "```",
            sweep_table(sw),
            "```",
        ]
    if ev.get("controls"):
        lines += controls_markdown(ev["controls"])
        lines += ["", "Completions of the controls: controls.jsonl."]
    if ev.get("behaviors"):
        lines += behaviors_markdown(ev["behaviors"])
    n_train = len(meta.get("prompts", []))
    labels = ev.get("labels") or {}

    def label_of(kind: str, v: int, i: int) -> str:
        try:
            return str(labels[kind][v][i])
        except (KeyError, IndexError):
            return "-"

    for i, prompt in enumerate(ev["prompts"][:n_train]):
        lines += [
            "",
            f"## Prompt {i}: {cell(prompt, 200)}",
            "",
            f"**Unsteered:** {cell(ev['unsteered'][i], 600)}",
            "",
            "| " + " | ".join(h for h, _ in columns) + " | label | completion |",
            "|" + "---|" * (len(columns) + 2),
        ]
        for v, comp in enumerate(ev["completions"]["learned"]):
            cells = [c(v, bank.info(v)) for _, c in columns]
            lines.append("| " + " | ".join(cells) + f" | {label_of('learned', v, i)} | {cell(comp[i])} |")
        lines += ["", "Random baseline:", "", "| random | objective | label | completion |", "|---|---|---|---|"]
        robj = meta.get("random_objectives") or []
        for v, comp in enumerate(ev["completions"]["random"]):
            o = f"{robj[v]:.4g}" if v < len(robj) else "-"
            lines.append(f"| r{v} | {o} | {label_of('random', v, i)} | {cell(comp[i])} |")
    if len(ev["prompts"]) > n_train:
        lines += ["", "Held-out prompts: see completions.jsonl (split = heldout)."]
    return "\n".join(lines) + "\n"


def write_summary(out: str | os.PathLike, bank: Bank, ev: dict[str, Any]) -> Path:
    """Write ``summary.md`` and ``summary.json`` into ``out``. Returns the Markdown file."""
    folder = Path(out)
    write_json(folder / SUMMARY_JSON, ev)
    return write_text(folder / SUMMARY_MD, summary_markdown(bank, ev))
