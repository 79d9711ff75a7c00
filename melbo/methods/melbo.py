"""Unsupervised steering vectors (MELBO), exactly as METHOD.md section 1.

For each vector ``k = 0..N-1``, one after another:

1. start from a random unit direction, orthogonal to the earlier vectors, scaled to radius R;
2. each step: compute the objective ``Σ_i (Σ_{t∈I_i} ‖Z_i,t(θ) − Z_i,t(0)‖^p)^(1/q)`` on the
   truncated ``src -> tgt`` pass; project the gradient onto the tangent space of the R-sphere
   and onto the orthogonal complement of the earlier vectors; take an AdamW (AMSGrad) step that
   *raises* the objective; project θ back onto the complement and rescale it to norm R (Adam's
   per-coordinate scaling breaks both projections, so the post-step projection is required);
3. record the objective at the start and the end, and the cosine between start and end.

:func:`train_step` works on a ``[V, d_model]`` batch of vectors (V = 1 in the sequential method).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from melbo.core.radius import parse_radius
from melbo.core.slice import Slice, melbo_objective
from melbo.core.sphere import orthonormal_basis, project_out, random_start, random_vectors, tangent, to_sphere
from melbo.core.validate import check_int, check_positive
from melbo.methods.base import Checkpoint, CommonSettings, Context, Fit, perturbations, vector_info
from melbo.methods.calibrate import resolve_radius

BETAS = (0.9, 0.98)


@dataclass
class MelboSettings(CommonSettings):
    """Settings of MELBO steering vectors (METHOD.md section 1).

    Attributes:
        radius: R: a number, ``"<k>x"`` (k × the median residual norm at the source),
            ``"calibrate"`` (METHOD.md section 5) or ``"auto"`` (resolved by the orchestrator's sweep).
        p, q: the objective's powers (> 0). steps: optimizer steps per vector.
        lr: AdamW learning rate; None gives ``0.011·R/√d_model`` (METHOD.md section 1).
        writes_only: measure ``Z(θ) − θ`` (METHOD.md section 5, "The residual path").
        lam: λ of ``radius="calibrate"``.
    """

    radius: str
    p: float
    q: float
    steps: int
    lr: float | None
    writes_only: bool
    lam: float

    def check(self) -> None:
        super().check()
        self.radius = str(parse_radius(self.radius))
        self.p = check_positive("p", self.p)
        self.q = check_positive("q", self.q)
        self.steps = check_int("steps", self.steps, 0, 1_000_000)
        if self.lr is not None:
            self.lr = check_positive("learning rate", self.lr)
        self.lam = check_positive("calibration ratio λ", self.lam)
        self.writes_only = bool(self.writes_only)


def learning_rate(lr: float | None, radius: float, d_model: int) -> float:
    """``lr``, or ``0.011·R/√d_model``: Adam moves each coordinate by about lr, so the step
    relative to the sphere is ≈ lr·√d/R; 0.011 is the reference's lr 1e-3 at R = 4, d = 2048."""
    return lr if lr is not None else 0.011 * radius / math.sqrt(d_model)


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


class MelboMethod:
    """MELBO steering vectors, trained one after another (module docstring). Resumable per vector."""

    name: ClassVar[str] = "melbo"
    kind: ClassVar[str] = "vector"
    settings_class: ClassVar[type] = MelboSettings
    resumable: ClassVar[bool] = True

    def __init__(self, ctx: Context):
        self.ctx, s = ctx, ctx.settings
        self.slice = Slice(ctx.lm.model, ctx.lm.blocks, ctx.batch, ctx.src, ctx.tgt, writes_only=s.writes_only)
        self.residual_norm = self.slice.residual_norm()
        self.radius, calibration = resolve_radius(s.radius, self.residual_norm, ctx, s.writes_only, s.lam, s.seed)
        self.lr = learning_rate(s.lr, self.radius, self.slice.d_model)
        self.meta = {
            "radius": self.radius,
            "residual_norm": self.residual_norm,
            "lr": self.lr,
            "betas": list(BETAS),
            "weight_decay": 0.0,
            "calibration": calibration,
        }

    def fit(self, resume: Fit | None, checkpoint: Checkpoint | None) -> Fit:
        s, d = self.ctx.settings, self.slice.d_model
        vectors = resume.tensors["vectors"] if resume else torch.zeros(0, d)
        starts = resume.tensors["start_vectors"] if resume else torch.zeros(0, d)
        info = list(resume.info) if resume else []
        todo = range(len(vectors), s.num_vectors)
        with tqdm(
            total=len(todo) * s.steps,
            desc="MELBO vectors",
            unit="step",
            dynamic_ncols=True,
            disable=not self.ctx.show_progress,
        ) as bar:
            for k in todo:
                vec, start, row = train_vector(
                    self.slice,
                    k,
                    self.radius,
                    s.p,
                    s.q,
                    s.steps,
                    self.lr,
                    s.seed,
                    vectors if len(vectors) else None,
                    bar,
                )
                vectors, starts = torch.cat([vectors, vec[None]]), torch.cat([starts, start[None]])
                info.append(row)
                if checkpoint is not None:
                    checkpoint(Fit({"vectors": vectors, "start_vectors": starts}, list(info)))
        return Fit({"vectors": vectors, "start_vectors": starts}, info)

    def random_baseline(self, fit: Fit) -> dict[str, torch.Tensor]:
        return {"random_vectors": random_vectors(len(fit), self.slice.d_model, self.radius, self.ctx.settings.seed)}

    def objectives(self, tensors: dict[str, torch.Tensor]) -> list[float]:
        v = perturbations(tensors)
        s = self.ctx.settings
        out = []
        with torch.no_grad():
            for chunk in torch.split(v, 64):
                out += objective_of(self.slice, chunk.to(self.slice.h_src.device), s.p, s.q).cpu().tolist()
        return out
