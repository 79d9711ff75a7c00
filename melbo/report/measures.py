"""KL and norm measures of a bank over the vector index (METHOD.md section 3): ``measures.csv``,
``norms.png`` and ``kl.png``. Used by MELBO-ortho runs and ``melbo plot``."""

from __future__ import annotations

import os
from pathlib import Path

from melbo.bank import Bank
from melbo.core.io import make_dir, write_text
from melbo.measure import KLCurves, vector_norms
from melbo.report.plot import plot_measures

MEASURES = "measures.csv"


def write_measures(
    out: str | os.PathLike,
    bank: Bank,
    kl: KLCurves,
    indices: list[int],
    reference: int | None,
    scale: float = 1.0,
    window: int = 50,
    title: str = "",
) -> list[Path]:
    """Write ``measures.csv`` (index, norm, KL to the reference, KL to unsteered) and the plots
    for the vectors ``indices`` of ``bank`` with their KL curves ``kl``. Returns the files written."""
    folder = Path(out)
    make_dir(folder)
    vecs = bank.vectors[indices] * scale
    norms = vector_norms(vecs)
    lines = ["index,norm,kl_to_reference,kl_to_unsteered"]
    for j, i in enumerate(indices):
        kr = f"{kl.to_reference[j]:.6g}" if kl.to_reference is not None else ""
        lines.append(f"{i},{norms[j]:.6g},{kr},{kl.to_unsteered[j]:.6g}")
    csv = write_text(folder / MEASURES, "\n".join(lines) + "\n")
    ref_norm = float(bank.vectors[reference].norm() * abs(scale)) if reference is not None else None
    plots = plot_measures(
        folder,
        norms.tolist(),
        kl.to_reference.tolist() if kl.to_reference is not None else None,
        kl.to_unsteered.tolist(),
        kl.direction,
        reference,
        window,
        title=title,
        base_norm=ref_norm,
        indices=indices,
    )
    return [csv, *plots]
