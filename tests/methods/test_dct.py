"""DCT as a melbo method (melbo.methods.dct) through melbo.train: a ranked bank of every factor, its
random baseline, the files of a run folder, and orthonormal saved factors (QR)."""

import json

import pytest
import torch
from conftest import shared_model_path, tiny_loaded

import melbo
from melbo.core.errors import MelboError
from melbo.core.sphere import max_abs_cos, normalize_rows, random_vectors
from melbo.methods.dct import DCTMethod, DCTSettings
from melbo.methods.dct_fit import fit_dct
from melbo.methods.delta import DeltaMap


def test_train_dct_writes_a_ranked_bank_that_generate_reads(tmp_path):
    lm = tiny_loaded("llama")
    out = tmp_path / "run"
    bank = melbo.train(
        lm,
        "hello there",
        "dct",
        factors=8,
        num_vectors=3,
        iterations=2,
        radius="0.5x",
        out=out,
        generation=melbo.GenerationConfig(max_new_tokens=4),
        show_progress=False,
    )
    saved = melbo.Bank.load(out)
    for b in (bank, saved):
        assert b.meta["method"] == "dct" and b.meta["positions"] == "last:3" and b.kind == "vector"
        assert len(b) == 8 and b.random_vectors.shape == (8, 32) and b.meta["num_factors"] == 8
    R = saved.meta["radius"]
    assert R == pytest.approx(0.5 * saved.meta["residual_norm"])
    torch.testing.assert_close(saved.vectors.norm(dim=-1), torch.full((8,), R), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(saved.random_vectors, random_vectors(8, 32, R, 0))
    alphas = [v["alpha"] for v in saved.meta["vectors"]]
    assert alphas == sorted(alphas, key=lambda a: -a * a)
    assert sorted(v["factor"] for v in saved.meta["vectors"]) == list(range(8))
    assert saved.tensors["u_directions"].shape == (8, 32)
    rows = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "learned" for r in rows) == 3 and sum(r["kind"] == "random" for r in rows) == 3
    assert bank.evaluation["evaluated"] == 3
    assert "deep causal transcoding" in (out / "summary.md").read_text()
    assert "The bank holds 8 perturbations; the first 3 are evaluated" in (out / "summary.md").read_text()
    comps = saved.attach(lm).generate("hi", vectors="0,7", max_new_tokens=3)
    assert list(comps) == ["unsteered", "vector 0", "vector 7"]


def test_objective_is_the_norm_of_delta_and_matches_a_direct_fit():
    lm = tiny_loaded("qwen2")
    bank = melbo.train(
        lm,
        ["hello there", "a b"],
        "dct",
        factors=6,
        iterations=2,
        radius=0.7,
        source_layer=0,
        target_layer=2,
        show_progress=False,
    )
    delta = DeltaMap.from_model(lm, ["hello there", "a b"], 0, 2, positions="last:3")
    res = fit_dct(delta, 0.7, num_factors=6, iterations=2)
    torch.testing.assert_close(bank.vectors, res.vectors)
    objective = delta(bank.vectors).norm(dim=-1)
    assert [v["objective"] for v in bank.meta["vectors"]] == pytest.approx(objective.tolist(), rel=1e-5)
    assert bank.meta["random_objectives"] == pytest.approx(delta(bank.random_vectors).norm(dim=-1).tolist(), rel=1e-5)


def test_qr_factors_saved_by_a_run_are_orthonormal(tmp_path):
    lm = tiny_loaded("gpt2")
    out = tmp_path / "run"
    melbo.train(
        lm,
        ["hello there, friend", "a b"],
        "dct",
        factors=32,
        iterations=3,
        radius="0.5x",
        out=out,
        evaluate=False,
        show_progress=False,
    )  # m = d_model: a full basis
    bank = melbo.Bank.load(out)
    assert len(bank) == 32 and bank.meta["dct"]["orthogonalize"] == "qr"
    assert max_abs_cos(bank.vectors) <= 1e-5
    torch.testing.assert_close(bank.vectors.norm(dim=-1), torch.full((32,), bank.meta["radius"]), atol=1e-5, rtol=1e-5)
    assert bank.meta["mean_abs_cos_V"] < 1e-6
    torch.testing.assert_close(bank.tensors["u_directions"].norm(dim=-1), torch.ones(32), atol=1e-5, rtol=0)


def test_qr_factors_of_stories260k_are_orthonormal(tmp_path):
    lm = melbo.load_model(str(shared_model_path("stories260k")), "cpu")
    out = tmp_path / "run"
    melbo.train(
        lm,
        ["Once upon a time, there was a little girl named Lily."],
        "dct",
        iterations=3,
        out=out,
        evaluate=False,
        show_progress=False,
    )  # R calibrated, m = d_model = 64
    bank = melbo.Bank.load(out)
    R = bank.meta["radius"]
    assert len(bank) == 64 and abs(bank.meta["calibration"]["ratio"] - 0.5) < 0.005
    assert max_abs_cos(bank.vectors) <= 1e-5
    torch.testing.assert_close(bank.vectors.norm(dim=-1), torch.full((64,), R), atol=1e-5 * R, rtol=1e-5)


def test_dct_settings_are_checked_before_any_work(tmp_path):
    lm = tiny_loaded("llama")
    with pytest.raises(MelboError, match="do not fit QR"):
        melbo.train(lm, "hello", "dct", factors=33, show_progress=False)
    with pytest.raises(MelboError, match="unknown DCT activation"):
        melbo.train(lm, "hello", "dct", sigma="tanh", out=tmp_path / "x", show_progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(MelboError, match="unknown setting 'steps' for method 'dct'"):
        melbo.train(lm, "hello", "dct", steps=3)
    out = tmp_path / "r"
    melbo.train(lm, "hello", "dct", factors=4, iterations=1, radius=0.5, out=out, evaluate=False, show_progress=False)
    first = melbo.Bank.load(out)
    again = melbo.train(
        lm,
        "hello",
        "dct",
        factors=4,
        iterations=1,
        radius=0.5,
        out=out,
        resume=True,
        evaluate=False,
        show_progress=False,
    )  # a finished fit resumes to itself
    torch.testing.assert_close(again.vectors, first.vectors, rtol=0, atol=0)
    assert DCTMethod.settings_class is DCTSettings and DCTMethod.resumable is True


def test_soft_orthogonalization_allows_more_factors_than_d_model():
    lm = tiny_loaded("llama")
    bank = melbo.train(
        lm,
        "hello there",
        "dct",
        factors=40,
        orthogonalize="soft",
        init="random",
        iterations=2,
        radius=0.5,
        show_progress=False,
    )
    assert len(bank) == 40
    torch.testing.assert_close(normalize_rows(bank.vectors) * 0.5, bank.vectors, atol=1e-5, rtol=0)
    # the baseline: blocks of d_model mutually orthogonal random vectors at R, the first the usual one
    rnd = bank.random_vectors
    assert rnd.shape == (40, 32)
    torch.testing.assert_close(rnd[:32], random_vectors(32, 32, 0.5, 0))
    torch.testing.assert_close(rnd.norm(dim=-1), torch.full((40,), 0.5), atol=1e-5, rtol=0)
    assert max_abs_cos(rnd[:32]) <= 1e-5 and max_abs_cos(rnd[32:]) <= 1e-5
    assert (rnd[32:] - rnd[:8]).abs().max() > 0.1  # an independent draw, not a repeat
