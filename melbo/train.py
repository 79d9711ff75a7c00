"""Training unsupervised steering vectors (MELBO), exactly as METHOD.md section 1.

For each vector ``k = 0..N-1``, one after another:

1. start from a random unit direction, orthogonal to the earlier vectors, scaled to radius R;
2. each step: compute the objective on the truncated ``src -> tgt`` pass; project the gradient
   onto the tangent space of the R-sphere and onto the orthogonal complement of the earlier
   vectors; take an AdamW (AMSGrad) step that *raises* the objective; project θ back onto the
   complement and rescale it to norm R (Adam's per-coordinate scaling breaks both projections,
   so the post-step projection is required);
3. record the objective at the start and the end, and the cosine between start and end.

The step works on a ``[V, d_model]`` batch of vectors (V = 1 in the sequential method), so that
optimizing many vectors at once is an extension of :func:`train_step`, not a rewrite.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from melbo.errors import MelboError
from melbo.objective import Slice, melbo_objective


@dataclass
class TrainConfig:
    """Hyper-parameters of a MELBO run (METHOD.md section 1; defaults from the post).

    Attributes:
        radius: R, the norm of every vector (residual-stream units, > 0).
        p: power on each position's distance (> 0); 2 default, 4 concentrates on few positions.
        q: the per-prompt sum is raised to 1/q (> 0); 1 or p.
        num_vectors: N, vectors trained one after another, each orthogonal to all earlier ones.
        steps: optimizer steps per vector.
        lr: AdamW learning rate; ``None`` gives ``0.011 * R / sqrt(d_model)`` (METHOD.md section 1:
            Adam moves each coordinate by about lr, so the step relative to the sphere is
            ≈ lr·√d / R; 0.011 is the reference's lr 1e-3 at R = 4, d = 2048).
        betas, weight_decay, amsgrad: the reference's AdamW settings.
        seed: vector ``k`` starts from a direction drawn from ``seed`` and ``k`` alone, so a
            resumed run trains the same vectors as an uninterrupted one.
    """

    radius: float
    p: float = 2.0
    q: float = 1.0
    num_vectors: int = 16
    steps: int = 300
    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    amsgrad: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive("radius R", self.radius)
        check_positive("p", self.p)
        check_positive("q", self.q)
        if self.lr is not None:
            check_positive("learning rate", self.lr)
        if int(self.num_vectors) != self.num_vectors or self.num_vectors < 1:
            raise MelboError(f"number of vectors must be a whole number >= 1, got {self.num_vectors!r}")
        if int(self.steps) != self.steps or self.steps < 0:
            raise MelboError(f"steps must be a whole number >= 0, got {self.steps!r}")

    def learning_rate(self, d_model: int) -> float:
        """The lr actually used: ``lr`` or ``0.011 * R / sqrt(d_model)``."""
        return self.lr if self.lr is not None else 0.011 * self.radius / math.sqrt(d_model)

    def to_dict(self) -> dict:
        return asdict(self)


def check_positive(name: str, value) -> None:
    """Raises MelboError unless ``value`` is a finite number > 0."""
    try:
        ok = math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise MelboError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass
class VectorResult:
    """One trained vector and how its training went.

    Attributes:
        vector: ``[d_model]`` float32, norm R.
        start: ``[d_model]`` float32, the random start (norm R).
        start_objective, objective: the objective at the start and at the end.
        cosine_start_end: cosine between start and end; near 1 means the vector did not move
            (the lr was too small for this R, and the vector is as good as random).
        history: the objective before each step.
        seconds: wall-clock time spent training it.
    """

    vector: torch.Tensor
    start: torch.Tensor
    start_objective: float
    objective: float
    cosine_start_end: float
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------- the sphere and the complement

def orthonormal_basis(vectors: torch.Tensor | None) -> torch.Tensor | None:
    """Orthonormal rows spanning ``vectors`` (``[k, d]``), in float64; None for none."""
    if vectors is None or len(vectors) == 0:
        return None
    q, _ = torch.linalg.qr(vectors.double().T)
    return q.T.contiguous()


def project_out(x: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Component of each row of ``x`` (``[V, d]``) orthogonal to the rows of ``basis``."""
    if basis is None:
        return x
    b = basis.to(device=x.device)
    xd = x.double()
    return (xd - (xd @ b.T) @ b).to(x.dtype)


def to_sphere(x: torch.Tensor, radius: float) -> torch.Tensor:
    """Rows of ``x`` rescaled to norm ``radius``.

    Raises:
        MelboError: a row is zero (no direction to rescale).
    """
    norms = x.double().norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        raise MelboError("cannot scale a zero vector to the R-sphere: every steering vector needs a direction")
    return (x.double() * (radius / norms)).to(x.dtype)


def tangent(grad: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Component of each gradient row orthogonal to its θ row (the sphere's tangent space)."""
    u = theta / theta.norm(dim=-1, keepdim=True)
    return grad - (grad * u).sum(-1, keepdim=True) * u


def random_start(index: int, d_model: int, radius: float, seed: int, basis: torch.Tensor | None) -> torch.Tensor:
    """The random start of vector ``index``: a Gaussian direction drawn from ``(seed, index)``,
    projected onto the complement of ``basis`` and scaled to ``radius``. ``[d_model]`` float32."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    x = torch.randn(1, d_model, generator=g, dtype=torch.float64)
    return to_sphere(project_out(x, basis), radius)[0].float()


def random_vectors(n: int, d_model: int, radius: float, seed: int) -> torch.Tensor:
    """The random baseline (METHOD.md section 1): ``n`` Gaussian directions, orthogonalized one
    after another like the learned vectors, scaled to ``radius``. ``[n, d_model]`` float32.
    Row ``k`` depends only on ``seed`` and rows ``0..k``, so a longer baseline extends a shorter."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 999_983)
    rows: list[torch.Tensor] = []
    for _ in range(n):
        x = torch.randn(1, d_model, generator=g, dtype=torch.float64)
        basis = orthonormal_basis(torch.cat(rows)) if rows else None
        rows.append(to_sphere(project_out(x, basis), 1.0))
    return (torch.cat(rows) * radius).float() if rows else torch.zeros(0, d_model)


# ---------------------------------------------------------------- training

def make_optimizer(theta: torch.Tensor, cfg: TrainConfig, d_model: int) -> torch.optim.Optimizer:
    """AdamW with AMSGrad, the reference's betas and weight decay, lr scaled with R."""
    return torch.optim.AdamW([theta], lr=cfg.learning_rate(d_model), betas=cfg.betas,
                             weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad)


def objective_of(slice_: Slice, theta: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """``[V]`` MELBO objective of the vectors ``theta`` (``[V, d_model]``)."""
    return melbo_objective(slice_(theta), slice_.z0, slice_.mask, cfg.p, cfg.q)


def train_step(slice_: Slice, theta: torch.Tensor, opt: torch.optim.Optimizer, cfg: TrainConfig,
               basis: torch.Tensor | None) -> torch.Tensor:
    """One projected step on ``theta`` (``[V, d_model]``, a leaf that requires grad).

    Returns the ``[V]`` objective *before* the step (detached).
    """
    opt.zero_grad(set_to_none=True)
    obj = objective_of(slice_, theta, cfg)
    (-obj.sum()).backward()
    with torch.no_grad():
        theta.grad = tangent(project_out(theta.grad, basis), theta)
    opt.step()
    with torch.no_grad():
        theta.copy_(to_sphere(project_out(theta, basis), cfg.radius))
    return obj.detach()


def train_vector(slice_: Slice, cfg: TrainConfig, index: int, earlier: torch.Tensor | None,
                 progress: tqdm | None = None) -> VectorResult:
    """Train vector ``index``, orthogonal to ``earlier`` (``[k, d_model]``, may be None).

    Returns a :class:`VectorResult` whose vector has norm R and is orthogonal to ``earlier``.
    """
    t0 = time.perf_counter()
    d = slice_.d_model
    device = slice_.h_src.device
    basis = orthonormal_basis(earlier.to(device)) if earlier is not None and len(earlier) else None
    start = random_start(index, d, cfg.radius, cfg.seed, basis.cpu() if basis is not None else None)
    theta = start.to(device)[None].clone().requires_grad_(True)
    opt = make_optimizer(theta, cfg, d)
    history = []
    for _ in range(cfg.steps):
        obj = train_step(slice_, theta, opt, cfg, basis)
        history.append(obj.item())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(vector=index, objective=f"{history[-1]:.4g}", refresh=False)
    with torch.no_grad():
        final = objective_of(slice_, theta, cfg).item()
        start_obj = history[0] if history else final
    vec = theta.detach()[0].float().cpu()
    cos = torch.nn.functional.cosine_similarity(vec.double(), start.double(), dim=0).item()
    return VectorResult(vec, start, start_obj, final, cos, history, time.perf_counter() - t0)


def train_vectors(slice_: Slice, cfg: TrainConfig, done: torch.Tensor | None = None,
                  on_vector: Callable[[int, VectorResult], None] | None = None,
                  show_progress: bool = True) -> list[VectorResult]:
    """Train vectors ``len(done)..cfg.num_vectors-1``, each orthogonal to all earlier ones.

    Args:
        slice_: the truncated pass on the training prompts.
        cfg: hyper-parameters.
        done: ``[k, d_model]`` vectors already trained (a resumed run); they are not retrained.
        on_vector: called after each new vector (e.g. to save the bank).

    Returns:
        the new vectors' results, in order.
    """
    vectors = done.float().cpu() if done is not None and len(done) else torch.zeros(0, slice_.d_model)
    todo = range(len(vectors), cfg.num_vectors)
    results = []
    with tqdm(total=len(todo) * cfg.steps, desc="MELBO vectors", unit="step", disable=not show_progress,
              dynamic_ncols=True) as bar:
        for k in todo:
            res = train_vector(slice_, cfg, k, vectors if len(vectors) else None, bar)
            vectors = torch.cat([vectors, res.vector[None]])
            results.append(res)
            if on_vector is not None:
                on_vector(k, res)
    return results
