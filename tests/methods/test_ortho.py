"""MELBO-ortho (melbo.methods.ortho, METHOD.md section 3) through melbo.ortho and melbo.train:
orthogonality, the loss falls, the stopping rules, the run folder's measures, resume."""

import functools
import json

import pytest
import torch
from conftest import tiny_loaded

import melbo
from melbo.core.errors import MelboError
from melbo.core.prompts import encode_prompts
from melbo.core.slice import Slice
from melbo.core.sphere import max_abs_cos, orthonormal_basis
from melbo.methods.ortho import ortho_loss, ortho_target, position_means, train_ortho_vector

PROMPT = "Hello there, friend"


@functools.cache
def loud_model(arch: str):
    """A tiny random model whose blocks write much more than their random init does (weights
    x10), so that, as in real models, what the blocks write can stand in for θ₀ itself."""
    lm = tiny_loaded(arch)
    with torch.no_grad():
        for block in lm.blocks:
            for p in block.parameters():
                if p.dim() == 2:
                    p.mul_(10)
    return lm


def _setup(arch="llama"):
    """The model, its 0 -> 3 slice on the prompt (all positions) and θ₀: a random direction at
    the median residual norm, as a SteeringVector that records its layers."""
    lm = loud_model(arch)
    s = Slice(lm.model, lm.blocks, encode_prompts(lm.tokenizer, [PROMPT]), 0, 3)
    base = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    base = base / base.norm() * s.residual_norm()
    return lm, s, melbo.SteeringVector(base, 0, lm.name, "vector 7", {"target_layer": 3})


def ortho(vec, lm, **kw):
    return melbo.ortho(vec, [PROMPT], lm=lm, show_progress=False, **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ortho_vectors_orthogonal_and_loss_falls(arch):
    lm, s, base = _setup(arch)
    bank = ortho(base, lm, num_vectors=3, steps=100, lr=0.2, min_norm=0)
    assert bank.meta["stop_reason"] == "num_vectors" and bank.vectors.shape == (4, lm.d_model)
    assert bank.meta["source_layer"] == 0 and bank.meta["target_layer"] == 3 and bank.meta["method"] == "ortho"
    assert torch.equal(bank.vectors[0], base.vector)
    assert max_abs_cos(bank.vectors) <= 1e-5 and bank.meta["max_abs_cosine"] <= 1e-5
    target = ortho_target(s, base.vector)
    for row in bank.meta["vectors"][1:]:
        assert row["loss"] < 0.5 * row["start_loss"]  # falls well below its start
        assert row["start_loss"] == pytest.approx(ortho_loss(s, torch.zeros(1, lm.d_model), target).item(), rel=1e-5)
    # the loss at θ₀ itself is 0
    assert ortho_loss(s, base.vector[None], target).item() < 1e-4
    # the recorded losses are the method's objective of the saved rows
    losses = ortho_loss(s, bank.vectors[1:], target)
    assert [r["loss"] for r in bank.meta["vectors"][1:]] == pytest.approx(losses.tolist(), rel=1e-4)


def test_loss_is_the_distance_of_position_means():
    lm, s, base = _setup()
    theta = torch.randn(2, lm.d_model, generator=torch.Generator().manual_seed(1))
    z, zb = s(theta), s(base.vector[None])
    n = int(s.mask[0].sum())
    want = (z[:, 0, :n].mean(1) - zb[0, 0, :n].mean(0)).norm(dim=-1)  # one prompt, all positions
    torch.testing.assert_close(ortho_loss(s, theta, ortho_target(s, base.vector)), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(position_means(z, s.mask)[:, 0], z[:, 0, :n].mean(1))


def test_one_vector_stays_in_the_complement():
    lm, s, base = _setup()
    basis = orthonormal_basis(base.vector[None])
    vec, info = train_ortho_vector(s, ortho_target(s, base.vector), basis, 20, 0.2)
    assert abs(float(vec.double() @ basis[0])) < 1e-5 * float(vec.double().norm())
    assert info["norm"] == pytest.approx(float(vec.double().norm())) and info["loss"] < info["start_loss"]


def test_ortho_stops_on_min_norm_and_bad_input():
    lm, s, base = _setup()
    bank = ortho(base, lm, num_vectors=3, steps=5, lr=0.2, min_norm=1e6)
    assert bank.meta["stop_reason"] == "min_norm" and len(bank) == 1 and bank.meta["rejected_norm"] < 1e6
    zero = melbo.SteeringVector(torch.zeros(lm.d_model), 0, lm.name, "", {"target_layer": 3})
    with pytest.raises(MelboError, match="zero"):
        ortho(zero, lm, num_vectors=1, steps=1)
    with pytest.raises(MelboError, match="minimum norm"):
        ortho(base, lm, min_norm=-1)
    with pytest.raises(MelboError, match="d_model=32"):
        ortho(melbo.SteeringVector(torch.ones(16), 0), lm, num_vectors=1, steps=1)
    with pytest.raises(MelboError, match="needs prompts"):
        melbo.ortho(base, lm=lm)  # θ₀ records no prompts
    with pytest.raises(MelboError, match="needs the model"):
        melbo.ortho(melbo.SteeringVector(base.vector, 0), [PROMPT])
    with pytest.raises(MelboError, match="base vector"):
        melbo.train(lm, [PROMPT], "ortho", num_vectors=1, steps=1)


def test_ortho_more_than_room_stops_cleanly():
    """Asking for more vectors than the complement has room for stops (empty complement, or
    vectors shrunk to float noise) with orthogonal rows, never with noise directions."""
    lm, s, base = _setup()
    d = lm.d_model
    bank = ortho(base, lm, num_vectors=d + 3, steps=10, lr=0.2, min_norm=0)
    assert bank.meta["stop_reason"] in ("full_basis", "min_norm") and 2 <= len(bank) <= d
    assert max_abs_cos(bank.vectors) <= 1e-5


def test_train_ortho_writes_bank_and_measures(tmp_path):
    lm, s, base = _setup()
    out = tmp_path / "ortho"
    bank = melbo.train(
        lm,
        [PROMPT],
        "ortho",
        base=base,
        out=out,
        num_vectors=3,
        steps=20,
        lr=0.2,
        min_norm=0,
        generation=melbo.GenerationConfig(max_new_tokens=4),
        show_progress=False,
    )
    saved = melbo.Bank.load(out)
    assert len(saved) == 4 and saved.meta["method"] == "ortho" and saved.meta["source_layer"] == 0
    assert bank.meta["num_vectors"] == 3 and saved.meta["stop_reason"] == "num_vectors"
    assert saved.meta["base"] == "vector 7"
    torch.testing.assert_close(saved.vectors, bank.vectors)
    # the baseline: random directions ⟂ θ₀, each at the norm of the learned row of the same index
    rnd = saved.random_vectors
    torch.testing.assert_close(rnd.norm(dim=-1), saved.vectors.norm(dim=-1), atol=1e-4, rtol=1e-5)
    assert (rnd.double() @ base.vector.double()).abs().max() < 1e-4 * base.norm**2
    for f in ("kl.png", "norms.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (out / "measures.csv").read_text().splitlines()
    assert rows[0] == "index,norm,kl_to_reference,kl_to_unsteered" and len(rows) == 5
    first = rows[1].split(",")
    assert float(first[1]) == pytest.approx(base.norm, rel=1e-5) and float(first[2]) < 1e-6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kl_to_base"][0] < 1e-6 and len(summary["kl_to_base"]) == 4
    assert summary["method"] == "ortho" and summary["learned"]["n"] == 4
    assert "KL(P_k ‖ P_0)" in (out / "summary.md").read_text()
    with pytest.raises(MelboError, match="already holds a run"):
        melbo.train(lm, [PROMPT], "ortho", base=base, out=out, num_vectors=1, steps=1, show_progress=False)


def test_resume_of_an_ortho_run(tmp_path):
    lm, s, base = _setup()
    kw = dict(steps=15, lr=0.2, min_norm=0, evaluate=False)
    full = ortho(base, lm, num_vectors=4, **kw)
    out = tmp_path / "run"
    part = ortho(base, lm, num_vectors=2, out=out, **kw)
    assert len(part) == 3
    more = ortho(base, lm, num_vectors=4, out=out, resume=True, **kw)
    assert len(more) == 5 and more.meta["stop_reason"] == "num_vectors" and more.meta["complete"]
    torch.testing.assert_close(more.vectors[:3], part.vectors)
    torch.testing.assert_close(more.vectors, full.vectors, atol=1e-5, rtol=1e-4)
    assert max_abs_cos(more.vectors) <= 1e-5
    with pytest.raises(MelboError, match="lr"):
        ortho(base, lm, num_vectors=5, out=out, resume=True, steps=15, lr=0.1, min_norm=0, evaluate=False)
