"""The R-sphere and orthogonality helpers (melbo.core.sphere): projections, rescaling, QR with
fixed signs, soft orthogonalization, the seeded random starts and the random baseline."""

import math

import pytest
import torch

from melbo.core.errors import MelboError
from melbo.core.sphere import (
    RANDOM_STREAM,
    cosine_matrix,
    max_abs_cos,
    mean_abs_cos,
    normalize_rows,
    orthonormal_basis,
    project_out,
    qr_orthogonalize,
    random_directions,
    random_start,
    random_vectors,
    soft_orthogonalize,
    tangent,
    to_sphere,
)


def naive_max_abs_cos(v):
    u = v.double() / v.double().norm(dim=-1, keepdim=True)
    c = u @ u.T
    return (c - torch.eye(len(v), dtype=c.dtype)).abs().max().item()


def gram_schmidt(V):
    out = []
    for v in V.double():
        w = v.clone()
        for q in out:
            w = w - (q @ w) * q
        out.append(w / w.norm())
    return torch.stack(out)


# ---------------------------------------------------------------- projections and the sphere


def test_projections_and_sphere():
    g = torch.Generator().manual_seed(0)
    earlier = torch.randn(3, 10, generator=g)
    basis = orthonormal_basis(earlier)
    assert basis.dtype == torch.float64 and basis.shape == (3, 10)
    torch.testing.assert_close(basis @ basis.T, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert orthonormal_basis(None) is None and orthonormal_basis(torch.zeros(0, 10)) is None
    x = torch.randn(4, 10, generator=g)
    y = project_out(x, basis)
    assert y.dtype == x.dtype
    assert (y.double() @ earlier.double().T).abs().max() < 1e-5  # ⟂ every earlier vector
    torch.testing.assert_close(project_out(y, basis), y, atol=1e-6, rtol=0)  # a projection
    assert project_out(x, None) is x
    s = to_sphere(x, 2.5)
    torch.testing.assert_close(s.norm(dim=-1), torch.full((4,), 2.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalize_rows(s), normalize_rows(x), atol=1e-6, rtol=0)  # same directions
    t = tangent(torch.randn(4, 10, generator=g), x)
    assert ((t * x).sum(-1)).abs().max() < 1e-5  # tangent to each θ's sphere
    torch.testing.assert_close(normalize_rows(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_zero_vector_cannot_go_on_the_sphere():
    with pytest.raises(MelboError, match="zero vector"):
        to_sphere(torch.zeros(2, 8), 1.0)


def test_cosine_measures():
    v = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    c = cosine_matrix(v)
    assert c.dtype == torch.float64 and c[0, 1].item() == pytest.approx(1 / math.sqrt(2))
    assert max_abs_cos(v) == pytest.approx(naive_max_abs_cos(v))
    assert mean_abs_cos(v) == pytest.approx((2 / math.sqrt(2) + 0.0) / 3)
    assert max_abs_cos(v[:1]) == 0.0 and mean_abs_cos(v[:1]) == 0.0


# ---------------------------------------------------------------- orthogonalization


def test_qr_keeps_column_signs():
    g = torch.Generator().manual_seed(4)
    V = normalize_rows(torch.randn(12, 20, generator=g) + 0.8)  # correlated rows
    Q = qr_orthogonalize(V)
    torch.testing.assert_close(Q @ Q.T, torch.eye(12), atol=1e-5, rtol=0)
    R = Q.double() @ V.double().T  # V = Qᵀ R with R upper-triangular
    assert (torch.diagonal(R) > 0).all()
    torch.testing.assert_close(torch.tril(R, -1), torch.zeros(12, 12, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(Q.double(), gram_schmidt(V), atol=1e-6, rtol=0)  # the same as Gram–Schmidt
    with pytest.raises(MelboError, match="at most 20"):
        qr_orthogonalize(torch.randn(21, 20))


def test_soft_orthogonalization_lowers_mean_abs_cos():
    g = torch.Generator().manual_seed(5)
    common = torch.randn(1, 32, generator=g)
    V = normalize_rows(common + 0.7 * torch.randn(48, 32, generator=g))  # m > d is allowed
    before = mean_abs_cos(V)
    after = soft_orthogonalize(V, torch.randn(48, generator=g), steps=10)
    assert mean_abs_cos(after) < 0.5 * before
    torch.testing.assert_close(after.norm(dim=-1), torch.ones(48), atol=1e-5, rtol=0)


def test_soft_orthogonalization_matches_a_naive_loop():
    g = torch.Generator().manual_seed(10)
    V = normalize_rows(torch.randn(5, 7, generator=g, dtype=torch.float64) + 0.5)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    x = [v.clone() for v in V]
    for _ in range(3):
        new = []
        for i in range(5):
            logits = [float(x[i] @ x[j]) / 0.7 + float(b[j]) if j != i else -math.inf for j in range(5)]
            top = max(logits)
            w = [math.exp(s - top) for s in logits]
            avg = sum(wj / sum(w) * xj for wj, xj in zip(w, x))
            y = x[i] - avg
            new.append(y / y.norm())
        x = new
    torch.testing.assert_close(soft_orthogonalize(V, b, steps=3, temperature=0.7), torch.stack(x))


# ---------------------------------------------------------------- random starts and the baseline


def test_random_baseline_is_orthogonal_on_sphere_and_prefix_stable():
    r = random_vectors(6, 16, 2.5, 7)
    assert r.dtype == torch.float32 and r.shape == (6, 16)
    assert torch.allclose(r.norm(dim=-1), torch.full((6,), 2.5), atol=1e-5)
    assert max_abs_cos(r) <= 1e-5 and naive_max_abs_cos(r) <= 1e-5
    torch.testing.assert_close(random_vectors(3, 16, 2.5, 7), r[:3])
    assert not torch.allclose(random_vectors(3, 16, 2.5, 8), r[:3])
    assert random_vectors(0, 16, 2.5, 7).shape == (0, 16)
    # one QR in Gram–Schmidt order of Gaussian rows drawn one after another from (seed, RANDOM_STREAM)
    g = torch.Generator().manual_seed(7 * 1_000_003 + RANDOM_STREAM)
    draws = torch.cat([torch.randn(1, 16, generator=g, dtype=torch.float64) for _ in range(6)])
    torch.testing.assert_close(r.double(), 2.5 * gram_schmidt(draws), atol=1e-6, rtol=0)


def test_random_baseline_avoids_a_basis_and_refuses_too_many():
    base = torch.randn(1, 16, generator=torch.Generator().manual_seed(1))
    unit = orthonormal_basis(base)
    r = random_vectors(15, 16, 1.0, 0, basis=unit)
    assert (r.double() @ unit.T).abs().max() < 1e-6
    assert max_abs_cos(r) <= 1e-5
    with pytest.raises(MelboError, match="at most 15"):
        random_vectors(16, 16, 1.0, 0, basis=unit)
    with pytest.raises(MelboError, match="at most 16"):
        random_vectors(17, 16, 1.0, 0)


def test_random_start_depends_on_seed_and_index_only():
    a = random_start(2, 16, 3.0, 5, None)
    assert a.dtype == torch.float32 and a.norm().item() == pytest.approx(3.0, rel=1e-6)
    torch.testing.assert_close(random_start(2, 16, 3.0, 5, None), a)  # no global RNG state
    assert not torch.allclose(random_start(3, 16, 3.0, 5, None), a)
    assert not torch.allclose(random_start(2, 16, 3.0, 6, None), a)
    basis = orthonormal_basis(torch.randn(4, 16, generator=torch.Generator().manual_seed(2)))
    b = random_start(2, 16, 3.0, 5, basis)
    assert (b.double() @ basis.T).abs().max() < 1e-5 and b.norm().item() == pytest.approx(3.0, rel=1e-6)
    # the same draw, projected: the start of vector k does not depend on how many came before
    torch.testing.assert_close(b, to_sphere(project_out(a[None].double(), basis), 3.0)[0].float(), atol=1e-6, rtol=0)


def test_random_directions_are_unit_and_seeded():
    d = random_directions(30, 8, seed=3)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(30), atol=1e-6, rtol=0)
    torch.testing.assert_close(random_directions(30, 8, seed=3), d)
    assert not torch.allclose(random_directions(30, 8, seed=4), d)
