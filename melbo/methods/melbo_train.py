"""Training MELBO steering vectors (METHOD.md section 1): the sequential reference and the batched method.

The sequential method (:func:`melbo.methods.melbo.train_vector`) trains vector k orthogonal to
vectors 0..k-1, one after another. The batched method trains blocks of ``B`` vectors jointly:

1. the block starts from the same seeded Gaussian directions as the sequential starts, projected
   onto the complement of the earlier blocks and orthonormalized in index order (QR), at norm R;
2. each step evaluates the objective of all ``B`` vectors in one truncated pass (a leading vector
   dimension), optionally in chunks of vectors and of prompts so that memory stays under a
   budget (the objective is a sum over vectors and over prompts, so chunked gradients add up to
   the same gradient); projects each gradient onto its sphere's tangent space and the complement
   of the earlier blocks; takes one AdamW (AMSGrad) step; then projects onto that complement and
   orthonormalizes the block again: ``symmetric`` (Löwdin: the orthonormal set nearest to the
   block, ``U Vᵀ`` of its SVD, which treats every vector alike), ``qr`` (Gram–Schmidt in index
   order) or ``none`` (only the sphere; with ``effect_penalty`` this is soft orthogonality alone);
3. optionally a soft-orthogonality penalty on the *effects* ``δ_v = Z(θ_v) − Z(0)`` (over the
   counted positions; METHOD.md section 1, from the comments: orthogonal vectors' effects stay
   correlated): ``effect_penalty · Σ_v objective_v (detached) · mean_{v≠w} cos²(δ_v, δ_w)``, so
   that the weight is relative to the objective (1: a mean cos² of 0.1 costs 10% of it).

How the result differs from the sequential one: the constraint set is the same (mutually
orthogonal vectors of norm R), but vectors of one block are optimized together rather than the
later ones against the finished earlier ones, so no vector of a block gets first choice; with
``B = 1`` every step equals the sequential step exactly.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from melbo.core.slice import Slice, melbo_objective
from melbo.core.sphere import orthonormal_basis, project_out, qr_orthogonalize, random_start, tangent, to_sphere
from melbo.methods.base import vector_info

BETAS = (0.9, 0.98)
LR_SCALE = 0.1
"""The step relative to the sphere, lr·√d/R. The reference's lr 1e-3 at R = 4, d = 2048 is 0.011;
measured with 200 steps (issue 10 note), 0.1 reaches a 1.1-3.3x higher objective and more coherent
new behaviors on gemma-3-270m, stories260k and tinystories-656k (the vectors move away from their
random starts: cosine start/end 0.03-0.17 against 0.38-0.60 at 0.011)."""


def learning_rate(lr: float | None, radius: float, d_model: int) -> float:
    """``lr``, or ``LR_SCALE·R/√d_model`` (:data:`LR_SCALE`): Adam moves each coordinate by about
    lr, so the step relative to the sphere is ≈ lr·√d/R (METHOD.md section 1)."""
    return lr if lr is not None else LR_SCALE * radius / math.sqrt(d_model)


def make_optimizer(theta: torch.Tensor, lr: float) -> torch.optim.Optimizer:
    """AdamW with AMSGrad and the reference's betas (0.9, 0.98), weight decay 0."""
    return torch.optim.AdamW([theta], lr=lr, betas=BETAS, weight_decay=0.0, amsgrad=True)


def objective_of(slice_: Slice, theta: torch.Tensor, p: float, q: float) -> torch.Tensor:
    """``[V]`` MELBO objective of the vectors ``theta`` ``[V, d_model]``."""
    return melbo_objective(slice_(theta), slice_.z0, slice_.mask, p, q)


def train_step(
    slice_: Slice,
    theta: torch.Tensor,
    opt: torch.optim.Optimizer,
    radius: float,
    p: float,
    q: float,
    basis: torch.Tensor | None,
) -> torch.Tensor:
    """One projected ascent step on ``theta`` ``[V, d_model]`` (a leaf that requires grad).

    Returns:
        the ``[V]`` objective *before* the step (detached).
    """
    opt.zero_grad(set_to_none=True)
    obj = objective_of(slice_, theta, p, q)
    (-obj.sum()).backward()
    grad = theta.grad
    assert grad is not None  # backward() just filled it
    with torch.no_grad():
        theta.grad = tangent(project_out(grad, basis), theta)
    opt.step()
    with torch.no_grad():
        theta.copy_(to_sphere(project_out(theta, basis), radius))
    return obj.detach()


def train_vector(
    slice_: Slice,
    index: int,
    radius: float,
    p: float,
    q: float,
    steps: int,
    lr: float,
    seed: int,
    earlier: torch.Tensor | None,
    progress: tqdm | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Train vector ``index``, orthogonal to ``earlier`` ``[k, d_model]`` (may be None).

    Returns:
        ``(vector [d_model], start [d_model], info)``, both float32 of norm R; ``info`` holds the
        objective at the start and the end, the cosine between start and end and the seconds.
    """
    t0 = time.perf_counter()
    device = slice_.h_src.device
    basis = orthonormal_basis(earlier.to(device)) if earlier is not None and len(earlier) else None
    start = random_start(index, slice_.d_model, radius, seed, basis.cpu() if basis is not None else None)
    theta = start.to(device)[None].clone().requires_grad_(True)
    opt = make_optimizer(theta, lr)
    first = None
    for _ in range(steps):
        obj = train_step(slice_, theta, opt, radius, p, q, basis).item()
        first = obj if first is None else first
        if progress is not None:
            progress.update(1)
            progress.set_postfix(vector=index, objective=f"{obj:.4g}", refresh=False)
    with torch.no_grad():
        final = objective_of(slice_, theta, p, q).item()
    vec = theta.detach()[0].float().cpu()
    cos = torch.nn.functional.cosine_similarity(vec.double(), start.double(), dim=0).item()
    return vec, start, vector_info(final, final if first is None else first, cos, time.perf_counter() - t0)


ORTHOGONALIZE = ("symmetric", "qr", "none")


def block_starts(
    indices: list[int], d_model: int, radius: float, seed: int, basis: torch.Tensor | None
) -> torch.Tensor:
    """``[B, d_model]`` float32 starts of the vectors ``indices``: the sequential starts' Gaussian
    draws (seeded by ``seed`` and the index alone), projected off ``basis``, orthonormalized in
    index order, at norm ``radius``. For one index this is :func:`melbo.core.sphere.random_start`."""
    rows = []
    for k in indices:
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        rows.append(torch.randn(1, d_model, generator=g, dtype=torch.float64))
    x = project_out(torch.cat(rows), basis)
    return (qr_orthogonalize(x) * radius).float() if len(indices) > 1 else to_sphere(x, radius).float()


def orthonormal_block(x: torch.Tensor, radius: float, how: str = "symmetric") -> torch.Tensor:
    """Rows of ``x`` ``[B, d]`` made orthonormal (``symmetric``: ``U Vᵀ`` of the SVD; ``qr``;
    ``none``: only normalized) and scaled to ``radius``, in ``x``'s dtype."""
    if len(x) == 1 or how == "none":
        return to_sphere(x, radius)
    if how == "qr":
        return qr_orthogonalize(x) * radius
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return ((u @ vh) * radius).to(x.dtype)


def effect_cosines(z: torch.Tensor, z0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, B]`` cosines between the effects ``δ_v = Z(θ_v) − Z(0)`` over the counted positions."""
    d = (z.float() - z0.float()[None])[:, mask].reshape(z.shape[0], -1)
    d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return d @ d.T


def chunked_objective(
    slice_: Slice,
    theta: torch.Tensor,
    p: float,
    q: float,
    vectors_per_chunk: int,
    prompts_per_chunk: int,
    backward: bool,
) -> torch.Tensor:
    """``[B]`` objective of ``theta`` ``[B, d]``, evaluated in chunks of vectors and of prompts;
    with ``backward`` each chunk's ``−objective`` is back-propagated into ``theta.grad`` as it
    goes (so only one chunk's activations are alive at a time). Detached."""
    out = torch.zeros(theta.shape[0], device=theta.device)
    parts = (
        [slice_]
        if prompts_per_chunk >= slice_.n
        else [
            slice_.subset(list(range(i, min(slice_.n, i + prompts_per_chunk))))
            for i in range(0, slice_.n, prompts_per_chunk)
        ]
    )
    for i in range(0, theta.shape[0], vectors_per_chunk):
        th = theta[i : i + vectors_per_chunk]
        for sl in parts:
            obj = melbo_objective(sl(th), sl.z0, sl.mask, p, q)
            if backward:
                (-obj.sum()).backward()
            out[i : i + vectors_per_chunk] += obj.detach().float()
    return out


def batch_step(
    slice_: Slice,
    theta: torch.Tensor,
    opt: torch.optim.Optimizer,
    radius: float,
    p: float,
    q: float,
    basis: torch.Tensor | None,
    how: str = "symmetric",
    effect_penalty: float = 0.0,
    vectors_per_chunk: int | None = None,
    prompts_per_chunk: int | None = None,
) -> torch.Tensor:
    """One projected ascent step on the block ``theta`` ``[B, d]`` (a leaf that requires grad); see
    the module docstring. Chunking needs ``effect_penalty == 0`` (the penalty couples the vectors).

    Returns:
        the ``[B]`` objective before the step (detached).
    """
    opt.zero_grad(set_to_none=True)
    B = theta.shape[0]
    if effect_penalty > 0 and B > 1:
        z = slice_(theta)
        obj = melbo_objective(z, slice_.z0, slice_.mask, p, q)
        c = effect_cosines(z, slice_.z0, slice_.mask)
        off = (c.pow(2).sum() - c.diagonal().pow(2).sum()) / (B * (B - 1))
        (-obj.sum() + effect_penalty * obj.detach().sum() * off).backward()
        obj = obj.detach()
    else:
        obj = chunked_objective(slice_, theta, p, q, vectors_per_chunk or B, prompts_per_chunk or slice_.n, True)
    grad = theta.grad
    assert grad is not None  # backward() just filled it
    with torch.no_grad():
        theta.grad = tangent(project_out(grad, basis), theta)
    opt.step()
    with torch.no_grad():
        theta.copy_(orthonormal_block(project_out(theta, basis), radius, how))
    return obj


def train_block(
    slice_: Slice,
    indices: list[int],
    radius: float,
    p: float,
    q: float,
    steps: int,
    lr: float,
    seed: int,
    earlier: torch.Tensor | None,
    how: str = "symmetric",
    effect_penalty: float = 0.0,
    vectors_per_chunk: int | None = None,
    prompts_per_chunk: int | None = None,
    progress: tqdm | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Train the vectors ``indices`` as one block, orthogonal to ``earlier`` ``[k, d]`` (may be None).

    Returns:
        ``(vectors [B, d], starts [B, d], infos)``: float32, norm R, mutually orthogonal (unless
        ``how="none"``) and orthogonal to ``earlier``; one info dict per vector (objective at the
        start and the end, cosine between start and end, seconds = the block's time / B).
    """
    t0 = time.perf_counter()
    device = slice_.h_src.device
    basis = orthonormal_basis(earlier.to(device)) if earlier is not None and len(earlier) else None
    starts = block_starts(indices, slice_.d_model, radius, seed, basis.cpu() if basis is not None else None)
    theta = starts.to(device).clone().requires_grad_(True)
    opt = make_optimizer(theta, lr)
    first = None
    for _ in range(steps):
        obj = batch_step(
            slice_, theta, opt, radius, p, q, basis, how, effect_penalty, vectors_per_chunk, prompts_per_chunk
        )
        first = obj.cpu() if first is None else first
        if progress is not None:
            progress.update(len(indices))
            progress.set_postfix(vectors=f"{indices[0]}-{indices[-1]}", objective=f"{obj.mean():.4g}", refresh=False)
    with torch.no_grad():
        final = chunked_objective(
            slice_, theta.detach(), p, q, vectors_per_chunk or len(indices), prompts_per_chunk or slice_.n, False
        ).cpu()
    vecs = theta.detach().float().cpu()
    cos = torch.nn.functional.cosine_similarity(vecs.double(), starts.double(), dim=-1)
    first = final if first is None else first
    secs = (time.perf_counter() - t0) / len(indices)
    infos = [
        vector_info(float(final[j]), float(first[j]), float(cos[j]), secs, block=indices[0])
        for j in range(len(indices))
    ]
    return vecs, starts, infos
