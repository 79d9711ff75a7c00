"""The radius sweep (radius="auto"): the cusp picker on synthetic curves, the group scores, and a
whole sweep on a tiny model with a stand-in embedder (no sentence-embedding model needed)."""

import sys

import pytest
import torch
from conftest import fake_embed, tiny_loaded

import melbo
import melbo.methods.radius_sweep as rs
from melbo.core.errors import MelboError
from melbo.methods.radius_sweep import group_scores, pick_cusp


def test_pick_cusp_on_synthetic_curves():
    radii = [1, 2, 4, 8, 16, 32]
    assert pick_cusp(radii, [0.0, 0.1, 0.5, 0.9, 0.2, 0.0]) == 3  # rises, peaks, collapses into gibberish
    assert pick_cusp(radii, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]) == 5  # still rising: the largest tried
    assert pick_cusp(radii, [0.4, 0.4, 0.1, 0.0, 0.0, 0.0]) == 0  # a tie goes to the smaller R
    assert pick_cusp(radii, [float("nan"), 0.2, float("nan"), 0.1, 0.0, 0.0]) == 1
    with pytest.raises(MelboError, match="one score per radius"):
        pick_cusp(radii, [0.1])
    with pytest.raises(MelboError, match="no finite"):
        pick_cusp([1.0], [float("nan")])


def test_group_scores():
    e = torch.eye(4)
    base = e[0]
    # two coherent completions pointing elsewhere, one incoherent: diversity over {base, coherent ones}
    s = group_scores(["a", "b", "c"], "u", e[1:], base, [True, True, False])
    assert s["coherent"] == pytest.approx(2 / 3) and s["changed"] == 1.0 and s["different"] == pytest.approx(2 / 3)
    assert s["diversity"] == pytest.approx(1.0) and s["score"] == pytest.approx(2 / 3)
    same = group_scores(["u", "u"], "u", torch.stack([base, base]), base, [True, True])
    assert same["changed"] == 0 and same["diversity"] == pytest.approx(0.0) and same["different"] == 0


def test_auto_radius_runs_the_sweep_and_records_it(tmp_path, monkeypatch):
    monkeypatch.setattr(rs, "embed", fake_embed)
    monkeypatch.setattr(sys.modules["melbo.eval.judge"], "embed", fake_embed)  # the judge of completions.jsonl
    lm = tiny_loaded("llama")
    bank = melbo.train(
        lm,
        "Hello there, world!",
        out=tmp_path / "run",
        num_vectors=2,
        steps=3,
        sweep_options={"grid": (0.05, 0.2, 0.8), "per_radius": 2, "max_new_tokens": 6},
        generation=melbo.GenerationConfig(max_new_tokens=6),
        show_progress=False,
    )
    sw = bank.meta["radius_sweep"]
    assert [r["relative"] for r in sw["rows"]] == [0.05, 0.2, 0.8][: len(sw["rows"])]
    chosen = sw["rows"][sw["chosen"]["index"]]
    assert bank.meta["radius"] == pytest.approx(chosen["radius"], rel=1e-5)
    assert bank.meta["radius_spec"] == "auto" and sw["steps"] == 3
    for row in sw["rows"]:
        assert set(row["learned"]) == {
            "changed",
            "coherent",
            "different",
            "diversity",
            "distance_to_unsteered",
            "score",
        }
    assert (tmp_path / "run" / "radius_sweep.json").is_file()
    assert (tmp_path / "run" / "radius_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "R was chosen by the diversity sweep" in (tmp_path / "run" / "summary.md").read_text(encoding="utf-8")
