"""PNG pictures of a bank's measures (METHOD.md section 3): KL divergence and vector norms over
the vector index, raw and with a moving average.

Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it works on
machines without a display and does not disturb a user's interactive session.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from melbo.core.io import atomic_write, make_dir
from melbo.measure import effective_window, kl_label, moving_average


def plot_curves(
    path: str | os.PathLike,
    series: dict[str, np.ndarray | list[float]],
    ylabel: str,
    title: str,
    window: int = 50,
    xlabel: str = "vector index k",
    hlines: dict[str, float] | None = None,
    logy: bool = False,
    x=None,
) -> Path:
    """Plot each series over its index, raw (thin) and with a moving average (thick).

    Args:
        path: the PNG to write (its folder is created).
        series: label -> values (the index is the position in the list).
        ylabel, title, xlabel: axis texts (state units and, for KL, the direction).
        window: moving-average window, shrunk for short series (:func:`melbo.measure.effective_window`).
        hlines: label -> y of horizontal reference lines (e.g. the base vector's norm).
        logy: logarithmic y axis (non-positive values are not drawn).
        x: the x value of each point (default ``0..len-1``), e.g. the bank indices of a subset.

    Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    make_dir(path.parent)
    fig = Figure(figsize=(10, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    for (label, values), color in zip(series.items(), colors):
        y = np.asarray(values, dtype=np.float64)
        xs = np.arange(len(y)) if x is None else np.asarray(x, dtype=np.float64)
        ax.plot(xs, y, color=color, alpha=0.45, linewidth=1, marker="." if len(y) <= 200 else None, label=f"{label}")
        w = effective_window(len(y), window)
        if w > 1 and len(y) >= w:
            ma = moving_average(y, w)
            ax.plot(
                moving_average(xs, w), ma, color=color, linewidth=2.2, label=f"{label}, moving average (window {w})"
            )
    for label, level in (hlines or {}).items():
        ax.axhline(level, color="gray", linestyle="--", linewidth=1, label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png"))
    return path


def plot_measures(
    out_dir: str | os.PathLike,
    norms,
    kl_reference=None,
    kl_unsteered=None,
    direction: str = "k||ref",
    reference_index: int | None = 0,
    window: int = 50,
    title: str = "",
    base_norm: float | None = None,
    indices=None,
) -> list[Path]:
    """Write ``norms.png`` and (when KL values are given) ``kl.png`` into ``out_dir``.

    Args:
        norms: ``[V]`` vector norms (residual-stream units).
        kl_reference, kl_unsteered: ``[V]`` KL divergences (nats) against the reference vector
            and against the unsteered model, direction ``direction`` (see :mod:`melbo.measure`).
        reference_index: row of the reference vector in the bank (for the labels).
        title: prefix of both titles (e.g. the bank and prompt).
        base_norm: drawn as a horizontal line on the norm plot.
        indices: bank index of each value (default ``0..V-1``).

    Returns the paths written.
    """
    out = Path(out_dir)
    ref = "ref" if reference_index is None else str(reference_index)
    paths = [
        plot_curves(
            out / "norms.png",
            {"‖θ_k‖₂": norms},
            "norm ‖θ_k‖₂ (residual-stream units)",
            f"{title}norm of each vector",
            window,
            hlines={f"norm of vector {ref}: {base_norm:.3g}": base_norm} if base_norm else None,
            x=indices,
        )
    ]
    series = {}
    if kl_reference is not None:
        series[f"{kl_label(direction, ref)}: steered by θ_k vs by θ_{ref}"] = kl_reference
    if kl_unsteered is not None:
        series[f"{kl_label(direction, 'unsteered')}: steered by θ_k vs unsteered"] = kl_unsteered
    if series:
        labels = ([kl_label(direction, ref)] if kl_reference is not None else []) + (
            [kl_label(direction, "unsteered")] if kl_unsteered is not None else []
        )
        paths.append(
            plot_curves(
                out / "kl.png",
                series,
                f"{' and '.join(labels)} (nats)",
                f"{title}next-token KL at the last prompt position, P_k = steered by θ_k",
                window,
                x=indices,
            )
        )
    return paths


def plot_sweep(path: str | os.PathLike, sweep: dict) -> Path:
    """The radius sweep (:mod:`melbo.methods.radius_sweep`): diversity, coherent share and changed
    share of the completions against R (log axis), learned and random; the chosen R marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    rows = sweep["rows"]
    r = [row["radius"] for row in rows]
    fig = Figure(figsize=(10, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    styles = {"learned": "-", "random": "--"}
    for kind, ls in styles.items():
        for key, color in (
            ("diversity", "tab:blue"),
            ("coherent", "tab:green"),
            ("different", "tab:purple"),
            ("changed", "tab:orange"),
        ):
            ax.plot(
                r, [row[kind][key] for row in rows], ls, color=color, marker="o", markersize=3, label=f"{kind}: {key}"
            )
    ax.plot(
        r,
        [row["score"] for row in rows],
        "-",
        color="black",
        linewidth=2.2,
        marker="o",
        label="score: diversity x coherent, learned minus random",
    )
    ax.axvline(
        sweep["chosen"]["radius"],
        color="gray",
        linestyle=":",
        label=f"chosen R = {sweep['chosen']['radius']:.3g} ({sweep['chosen']['relative']:.3g}x)",
    )
    ax.set_xscale("log")
    ax.set_xlabel(f"R (residual-stream units; median residual norm {sweep['residual_norm']:.4g})")
    ax.set_ylabel("share of completions / mean cosine distance (embeddings)")
    ax.set_title(f"Radius sweep: {sweep['per_radius']} learned and random perturbations per R", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path
