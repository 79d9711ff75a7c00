"""Calibrating R (melbo.methods.calibrate, METHOD.md section 5): the nonlinearity ratio reaches λ,
a clear error without a root, the notebook API (melbo.calibrate) and radius="calibrate" in a run."""

import math

import pytest
import torch
from conftest import tiny_loaded

import melbo
from melbo.core.errors import MelboError
from melbo.core.sphere import normalize_rows, random_directions
from melbo.methods.calibrate import Calibration, CalibrationError, calibrate_radius, format_curve
from melbo.methods.delta import DeltaMap, FunctionDelta


@pytest.fixture(scope="module")
def delta64():
    """Δ of a tiny random GPT-2 in float64 (blocks 1..3, last 3 positions)."""
    lm = tiny_loaded("gpt2", seed=1)
    lm.model.double()
    return DeltaMap.from_model(lm, ["hello there, friend", "a b"], 0, 3, positions="last:3")


def planted_exp(d=32, k=8, seed=0):
    """Δ(θ) = Σ_ℓ α_ℓ (e^{⟨v_ℓ,θ⟩} − 1) u_ℓ with random unit u, v and α in [1, 2]."""
    g = torch.Generator().manual_seed(seed)
    Vs = normalize_rows(torch.randn(k, d, generator=g, dtype=torch.float64))
    Us = normalize_rows(torch.randn(k, d, generator=g, dtype=torch.float64))
    alpha = 1 + torch.rand(k, generator=g, dtype=torch.float64)
    return FunctionDelta(lambda th: (torch.expm1(th.double() @ Vs.T) * alpha) @ Us, d)


def test_calibration_finds_lambda():
    delta = planted_exp()
    cal = calibrate_radius(delta, lam=0.5)
    assert isinstance(cal, Calibration) and cal.num_directions == 30 and cal.bracket == (1e-3, 100.0)
    # the ratio at R, recomputed naively direction by direction
    dirs = random_directions(30, 32, 0)
    num = den = 0.0
    for v in dirs:
        jv = delta.jvp(torch.zeros(1, 32), v[None])[1][0].double()
        num += float(((delta(cal.radius * v[None])[0].double() - cal.radius * jv) ** 2).sum())
        den += float(((cal.radius * jv) ** 2).sum())
    assert abs(math.sqrt(num / den) - 0.5) < 0.005
    assert abs(cal.ratio - 0.5) < 0.005
    assert cal.curve == sorted(cal.curve) and len(cal.curve) > 20
    d = cal.to_dict()
    assert d["radius"] == cal.radius and d["bracket"] == [1e-3, 100.0] and len(d["curve"]) == len(cal.curve)
    table = format_curve(cal.curve, 0.5, cal.radius)
    assert "<- R" in table and "(target λ = 0.5)" in table


def test_calibration_without_root_is_a_clear_error():
    linear = FunctionDelta(lambda th: 3.0 * th, 8)  # ratio 0 everywhere
    with pytest.raises(CalibrationError, match="no root in the bracket") as e:
        calibrate_radius(linear)
    assert len(e.value.curve) >= 21
    assert isinstance(e.value, MelboError)
    delta = planted_exp()
    with pytest.raises(CalibrationError, match="already"):
        calibrate_radius(delta, lam=1e-6)
    with pytest.raises(MelboError, match="bracket"):
        calibrate_radius(delta, bracket=(5, 1))
    with pytest.raises(MelboError, match="λ"):
        calibrate_radius(delta, lam=0)
    with pytest.raises(MelboError, match="Jacobian of Δ at 0 is zero"):
        calibrate_radius(FunctionDelta(lambda th: 0.0 * th, 8))


def test_calibration_on_a_tiny_model(delta64):
    cal = calibrate_radius(delta64, lam=0.3, num_directions=8)
    assert 0.001 < cal.radius < 100 and abs(cal.ratio - 0.3) < 0.003


def test_notebook_api_calibrates_and_reports_no_root():
    lm = tiny_loaded("llama")
    cal = melbo.calibrate(lm, "hello there", lam=0.3, directions=6)
    assert abs(cal.ratio - 0.3) < 0.003 and cal.num_directions == 6
    # the same as calibrating Δ of those prompts, layers and positions directly
    same = calibrate_radius(DeltaMap.from_model(lm, ["hello there"], positions="last:3"), lam=0.3, num_directions=6)
    assert cal.radius == pytest.approx(same.radius, rel=1e-9)
    with pytest.raises(CalibrationError, match="no root in the bracket") as e:
        melbo.calibrate(lm, "hello there", bracket=(0.001, 0.002))
    assert "ratio" in str(e.value) and e.value.curve


def test_train_with_a_calibrated_radius():
    lm = tiny_loaded("llama")
    bank = melbo.train(
        lm, "hello there", radius="calibrate", lam=0.3, writes_only=True, num_vectors=1, steps=2, show_progress=False
    )
    assert bank.meta["method"] == "melbo" and bank.meta["writes_only"] is True
    assert abs(bank.meta["radius"] - bank.meta["calibration"]["radius"]) < 1e-9
    assert abs(bank.meta["calibration"]["ratio"] - 0.3) < 0.003
    assert bank.meta["calibration"]["writes_only"] is True
    torch.testing.assert_close(bank.vectors.norm(dim=-1), torch.full((1,), bank.meta["radius"]), atol=1e-6, rtol=1e-5)
