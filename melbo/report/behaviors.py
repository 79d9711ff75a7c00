"""A run's distinct behaviors (:mod:`melbo.eval.behaviors`) for people: the ``summary.md``
section, and PNG pictures of the enumeration curve (expected distinct behaviors against the number
of perturbations, one line per group) and of the fluency/novelty plane with its Pareto frontier
(matplotlib's Agg canvas, as in :mod:`melbo.report.plot`)."""

from __future__ import annotations

import os
from pathlib import Path

from melbo.core.io import atomic_write, make_dir

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: Path) -> Path:
    ax = fig.axes[0]
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    make_dir(path.parent)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def plot_enumeration(path: str | os.PathLike, curves: dict[str, list[float]]) -> Path:
    """``curves``: group -> expected distinct behaviors at k = 1..N (exact mean over all
    orderings of the group's perturbations); the learned group drawn thick. Returns the path."""
    fig, ax = _figure()
    styles = ("--", ":", "-.")
    for j, ((group, ys), color) in enumerate(zip(curves.items(), COLORS * (1 + len(curves) // len(COLORS)))):
        learned = group == "learned"
        ax.plot(
            range(1, len(ys) + 1),
            ys,
            color=color,
            linewidth=2.4 if learned else 1.3,
            linestyle="-" if learned else styles[j % len(styles)],
            marker="o" if len(ys) <= 64 else None,
            markersize=3,
            label=group,
        )
    ax.set_xlabel("number of perturbations k")
    ax.set_ylabel("distinct behaviors found (mean over all orderings)")
    ax.set_title("Enumeration curve: distinct behaviors of `new` completions, learned vs controls", fontsize=10)
    return _save(fig, Path(path))


def plot_frontier(path: str | os.PathLike, points: list[dict]) -> Path:
    """``points``: ``{"group", "index", "fluency", "novelty", "frontier"}`` per perturbation; a dot
    per perturbation coloured by group, the Pareto frontier circled, joined and labelled. Returns the path."""
    fig, ax = _figure()
    groups = list(dict.fromkeys(p["group"] for p in points))
    for group, color in zip(groups, COLORS * (1 + len(groups) // len(COLORS))):
        mine = [p for p in points if p["group"] == group]
        ax.scatter(
            [p["novelty"] for p in mine], [p["fluency"] for p in mine], s=22, color=color, alpha=0.7, label=group
        )
    front = sorted((p for p in points if p["frontier"]), key=lambda p: p["novelty"])
    if front:
        ax.plot(
            [p["novelty"] for p in front],
            [p["fluency"] for p in front],
            color="black",
            linewidth=1,
            linestyle="--",
            marker="o",
            markersize=9,
            markerfacecolor="none",
            label="Pareto frontier",
        )
        for p in front:
            ax.annotate(
                f"{p['group']} {p['index']}",
                (p["novelty"], p["fluency"]),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
    ax.set_xlabel("novelty: mean cosine distance to the unsteered completion (sentence embeddings)")
    ax.set_ylabel("fluency: 1 − mean degenerate score")
    ax.set_title("Fluency vs novelty per perturbation", fontsize=10)
    return _save(fig, Path(path))


def behaviors_markdown(result: dict, rows: int = 30) -> list[str]:
    """The ``## Distinct behaviors`` section of ``summary.md`` as lines (``result``:
    :func:`melbo.eval.behaviors.run_behaviors`)."""
    lines = ["", "## Distinct behaviors", ""]
    if "skipped" in result:
        return lines + [f"Not counted: {result['skipped']}"]
    lines += [
        f"`new` completions ({result['labeller']}) grouped into behaviors: sentence embeddings "
        f"({result['embedder']}), {result['linkage']} linkage cut at cosine distance {result['threshold']:g}, "
        "one prompt at a time, learned and control completions together; each named by its c-TF-IDF words. "
        "Expected distinct behaviors against the number of perturbations: enumeration.png; fluency against "
        "novelty: frontier.png. The counts are estimates: on hand-named behaviors the clusters come out tighter "
        "than the names (figures at melbo.eval.behaviors.THRESHOLD); compare groups, counted by one rule.",
        "",
        "| group | perturbations | new completions | distinct behaviors | shared (learned: with any other group; "
        "others: with learned) |",
        "|---|---|---|---|---|",
        *(
            f"| {g} | {s['perturbations']} | {s['new']} | {s['distinct']} | {s['shared']} |"
            for g, s in result["groups"].items()
        ),
    ]
    if len(result["groups"]) > 1:
        lines += ["", f"Behaviors only learned perturbations write: {result['learned_only']}."]
    if result["behaviors"]:
        lines += ["", "| behavior | words | prompt | completions | perturbations |", "|---|---|---|---|---|"]
        for b in result["behaviors"][:rows]:
            who = "; ".join(f"{g}: {', '.join(map(str, v))}" for g, v in b["members"].items())
            lines.append(f"| {b['id']} | {b['name']} | {_cell(b['prompt'])} | {b['completions']} | {who} |")
        if len(result["behaviors"]) > rows:
            lines.append(f"\nThe first {rows} of {len(result['behaviors'])} behaviors (all in summary.json).")
    front = [p for p in result["points"] if p["frontier"]]
    lines += [
        "",
        "Fluency/novelty frontier (fluency: 1 − mean degenerate score; novelty: mean embedding distance "
        "to the unsteered completion; no other perturbation is both at least as fluent and as novel):",
        "",
        "| group | index | novelty | fluency |",
        "|---|---|---|---|",
        *(f"| {p['group']} | {p['index']} | {p['novelty']:.3f} | {p['fluency']:.3f} |" for p in front),
    ]
    return lines


def _cell(text: str, width: int = 60) -> str:
    t = " ".join(text.split())
    return (t if len(t) <= width else t[: width - 1] + "…").replace("|", "\\|")
