"""PNG plots of measures and of the radius sweep."""

import numpy as np

from melbo.report.plot import plot_curves, plot_measures, plot_sweep


def test_plots_are_pngs(tmp_path):
    vals = np.linspace(0, 1, 40)
    p = plot_curves(tmp_path / "a" / "x.png", {"x": vals}, "y", "t", window=5, hlines={"one": 1.0})
    assert p.read_bytes()[:4] == b"\x89PNG"
    paths = plot_measures(tmp_path, vals, vals, vals, window=50, base_norm=7.0)
    assert [q.name for q in paths] == ["norms.png", "kl.png"]
    assert plot_measures(tmp_path / "n", vals)[0].name == "norms.png"


def test_sweep_plot_is_a_png(tmp_path):
    row = {"changed": 0.5, "coherent": 1.0, "different": 0.5, "diversity": 0.3, "score": 0.3}
    sweep = {
        "rows": [
            {"radius": r, "relative": r / 10, "learned": row, "random": row, "score": 0.1} for r in (1.0, 2.0, 4.0)
        ],
        "chosen": {"radius": 2.0, "relative": 0.2, "index": 1},
        "residual_norm": 10.0,
        "per_radius": 4,
    }
    assert plot_sweep(tmp_path / "s.png", sweep).read_bytes()[:4] == b"\x89PNG"
