"""The R-sphere and orthogonality: projections, rescaling, orthonormalization, random directions.

Everything works on *rows*: a set of ``k`` vectors in the residual stream is a ``[k, d_model]``
tensor. Projections are computed in float64 and returned in the input's dtype, so that the
hard constraints of METHOD.md section 1 (``‖θ‖ = R``, ``θ ⟂`` earlier vectors) hold to float32
precision after every step.
"""

from __future__ import annotations

import torch

from melbo.core.errors import MelboError


def orthonormal_basis(vectors: torch.Tensor | None) -> torch.Tensor | None:
    """Orthonormal rows (float64) spanning the rows of ``vectors`` ``[k, d]``; None for none."""
    if vectors is None or len(vectors) == 0:
        return None
    q, _ = torch.linalg.qr(vectors.double().T)
    return q.T.contiguous()


def project_out(x: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Component of each row of ``x`` ``[V, d]`` orthogonal to the (orthonormal) rows of ``basis``."""
    if basis is None:
        return x
    b = basis.to(device=x.device)
    xd = x.double()
    return (xd - (xd @ b.T) @ b).to(x.dtype)


def to_sphere(x: torch.Tensor, radius: float) -> torch.Tensor:
    """Rows of ``x`` rescaled to 2-norm ``radius``.

    Raises:
        MelboError: a row is zero (it has no direction to rescale).
    """
    norms = x.double().norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        raise MelboError("cannot scale a zero vector to the R-sphere: every steering vector needs a direction")
    return (x.double() * (radius / norms)).to(x.dtype)


def tangent(grad: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Component of each gradient row orthogonal to its θ row: the tangent space of the sphere."""
    u = theta / theta.norm(dim=-1, keepdim=True)
    return grad - (grad * u).sum(-1, keepdim=True) * u


def normalize_rows(x: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """Rows of ``x`` scaled to unit norm (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


def qr_orthogonalize(V: torch.Tensor) -> torch.Tensor:
    """Orthonormalize the rows of ``V`` ``[m, d]`` (m <= d) by QR with column signs fixed so that
    ``diag(R) > 0`` (METHOD.md section 5: plain QR flips signs, and exp-DCT is not odd).

    Row ℓ of the result is ``v_ℓ`` minus its projection on rows ``0..ℓ-1``, normalized (what
    Gram–Schmidt gives), so ``⟨q_ℓ, v_ℓ⟩ > 0``. Computed in float64, returned in V's dtype.

    Raises:
        MelboError: more rows than columns (m vectors cannot be orthonormal in d < m dimensions).
    """
    m, d = V.shape
    if m > d:
        raise MelboError(
            f"cannot orthonormalize {m} vectors in d_model = {d} dimensions; allowed: at most {d} "
            f"(use soft orthogonalization or fewer vectors)"
        )
    q, r = torch.linalg.qr(V.double().T)
    s = torch.sign(torch.diagonal(r))
    s[s == 0] = 1.0
    return (q * s[None, :]).T.to(V.dtype).contiguous()


def soft_orthogonalize(
    V: torch.Tensor, log_norms: torch.Tensor | None = None, steps: int = 10, temperature: float = 1.0
) -> torch.Tensor:
    """Soft orthogonalization of the rows of ``V`` (METHOD.md section 5): ``steps`` times,
    ``S = V Vᵀ / T + b_j`` (``b_j = log_norms[j]``, diagonal −∞), ``W = row-softmax(S)``,
    ``v_i ← normalize(v_i − Σ_j W_ij v_j)``. Works for any m (also m > d).

    Args:
        V: ``[m, d]`` unit rows.
        log_norms: ``[m]`` bias of each column (None: zeros), typically ``log‖G_V[j]‖``.
        steps: inner steps (10). temperature: T > 0 (1).
    """
    m = V.shape[0]
    if m < 2 or steps <= 0:
        return V
    x = V.double()
    b = torch.zeros(m, dtype=torch.float64, device=V.device) if log_norms is None else log_norms.double().to(V.device)
    b = torch.where(torch.isfinite(b), b, torch.full_like(b, -1e30))
    eye = torch.eye(m, dtype=torch.bool, device=V.device)
    for _ in range(steps):
        s = (x @ x.T) / temperature + b[None, :]
        w = torch.softmax(s.masked_fill(eye, float("-inf")), dim=-1)
        x = normalize_rows(x - w @ x)
    return x.to(V.dtype)


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """``[k, k]`` float64 cosines between the rows of ``x`` ``[k, d]``."""
    u = normalize_rows(x.double())
    return u @ u.T


def mean_abs_cos(x: torch.Tensor) -> float:
    """Mean |cos| between distinct rows of ``x`` (0 for orthogonal rows or fewer than two)."""
    k = x.shape[0]
    if k < 2:
        return 0.0
    c = cosine_matrix(x).abs()
    return float((c.sum() - c.diagonal().sum()) / (k * (k - 1)))


def max_abs_cos(x: torch.Tensor) -> float:
    """Largest |cos| between two distinct rows of ``x`` (0 for fewer than two)."""
    if len(x) < 2:
        return 0.0
    c = cosine_matrix(x).abs()
    c.fill_diagonal_(0)
    return float(c.max())


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def random_start(index: int, d_model: int, radius: float, seed: int, basis: torch.Tensor | None) -> torch.Tensor:
    """The random start of learned vector ``index``: a Gaussian direction drawn from ``(seed, index)``
    alone (so a resumed run starts vector k where an uninterrupted one does), projected onto the
    complement of ``basis`` and scaled to ``radius``. ``[d_model]`` float32."""
    x = torch.randn(1, d_model, generator=_generator(seed, index), dtype=torch.float64)
    return to_sphere(project_out(x, basis), radius)[0].float()


RANDOM_STREAM = 999_983


def random_vectors(
    n: int, d_model: int, radius: float, seed: int, basis: torch.Tensor | None = None, stream: int = RANDOM_STREAM
) -> torch.Tensor:
    """The random baseline (METHOD.md section 1): ``n`` mutually orthogonal random directions at
    norm ``radius``, ``[n, d_model]`` float32.

    Gaussian rows (drawn one after another from ``seed``) are orthonormalized by one QR with signs fixed
    (Gram–Schmidt order, :func:`qr_orthogonalize`), so row ``k`` depends only on rows ``0..k``:
    a longer baseline extends a shorter one. ``basis`` (orthonormal rows) is projected out
    first (e.g. MELBO-ortho's base vector). ``stream`` picks another independent draw for the
    same seed (the default is the baseline's).

    Raises:
        MelboError: ``n`` exceeds the dimensions available.
    """
    if n == 0:
        return torch.zeros(0, d_model)
    free = d_model - (0 if basis is None else len(basis))
    if n > free:
        raise MelboError(
            f"cannot draw {n} mutually orthogonal random vectors in {free} free dimensions; allowed: at most {free}"
        )
    g = _generator(seed, stream)  # row by row: torch's batched draws of [n, d] differ from n draws of [1, d]
    x = torch.cat([torch.randn(1, d_model, generator=g, dtype=torch.float64) for _ in range(n)])
    return (qr_orthogonalize(project_out(x, basis)) * radius).float()


def random_directions(num: int, d_model: int, seed: int = 0, stream: int = 7_777) -> torch.Tensor:
    """``num`` independent Gaussian directions of unit norm (not orthogonalized). ``[num, d_model]`` float32."""
    x = torch.randn(num, d_model, generator=_generator(seed, stream), dtype=torch.float64)
    return normalize_rows(x).float()
