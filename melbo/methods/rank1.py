"""Rank-1 factor populations: many rank-1 steering adapters trained at once, soft orthogonalized
(the CPE recipe, wusche1/cpe 2026, on METHOD.md section 2's adapters).

Factor i perturbs the MLP output (down-projection) weight of block ``src`` by

    ΔW_i = R · b_i a_iᵀ,   ‖a_i‖ = ‖b_i‖ = 1   (a_i ∈ R^{d_hidden}, b_i ∈ R^{d_model}),

a steering adapter of rank r = 1. All N factors ascend, together, the mean MELBO objective
(METHOD.md section 1) minus a soft orthogonality penalty on the weight perturbations,

    L = mean_i f_i − λ · mean_i f_i (detached) · mean_{i≠j} ⟨ΔW_i, ΔW_j⟩²_F / R⁴,
    ⟨ΔW_i, ΔW_j⟩_F / R² = (a_i·a_j)(b_i·b_j)  (the cosine of the two rank-1 matrices),

so that the penalty is in the objective's own units and λ (``ortho``) is scale-free. Each step
projects the gradients onto the unit spheres of a_i and b_i, takes one AdamW (AMSGrad) step and
renormalizes; ``chunk`` factors run through the truncated pass at a time with their gradients
accumulated, so chunking changes memory, not the result. A band of source layers is not done:
every factor sits in block ``src`` (so the bank is an ordinary adapter bank: PEFT export,
generation, reports work unchanged).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from melbo.core.errors import MelboError
from melbo.core.validate import check_int
from melbo.methods.adapter import (
    AdapterMethod,
    AdapterSettings,
    AdapterSlice,
    _product_cosine,
    adapter_objective,
    projected_step,
)
from melbo.methods.base import Checkpoint, Fit, vector_info
from melbo.methods.melbo_train import BETAS


@dataclass
class Rank1Settings(AdapterSettings):
    """Settings of a rank-1 population (``num_vectors`` factors; ``rank`` is always 1).

    Attributes:
        ortho: λ of the soft orthogonality penalty (0: independent factors, as ``adapter``).
        batch: factors per forward chunk (memory only). Others: as :class:`AdapterSettings`.
    """

    ortho: float

    def check(self) -> None:
        super().check()
        if self.rank not in (None, 1):
            raise MelboError(f"rank-1 factors have rank 1, got rank = {self.rank}; use method 'adapter' for rank r")
        self.rank = 1
        if isinstance(self.ortho, bool) or not (isinstance(self.ortho, (int, float)) and self.ortho >= 0):
            raise MelboError(f"ortho weight λ = {self.ortho!r} is not allowed; allowed: a number >= 0")
        self.ortho = float(self.ortho)
        self.batch = check_int("factor chunk", self.batch, 1, 100_000)


def normalize_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit columns of ``a [..., d_hidden, 1]`` and ``b [..., d_model, 1]`` (not the adapters' unit
    rows of Ω_A, which at r = 1 would make every entry of a ±1)."""
    return nn.functional.normalize(a, dim=-2), nn.functional.normalize(b, dim=-2)


def tangent_factors(
    ga: torch.Tensor, gb: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients minus their components along the unit columns ``a`` and ``b``."""
    return ga - (ga * a).sum(-2, keepdim=True) * a, gb - (gb * b).sum(-2, keepdim=True) * b


def factor_start(index: int, d_hidden: int, d_model: int, seed: int, stream: int = 0) -> tuple:
    """Random start of factor ``index``: Gaussian ``a [d_hidden, 1]``, ``b [d_model, 1]`` from
    ``(seed, stream, index)`` alone, unit columns, float32; ``stream`` 1 is the random baseline."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + stream * 7_919_993 + 424_243 + index)
    a = torch.randn(d_hidden, 1, generator=g, dtype=torch.float64)
    b = torch.randn(d_model, 1, generator=g, dtype=torch.float64)
    a, b = normalize_factors(a, b)
    return a.float(), b.float()


def overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` cosines ``(a_i·a_j)(b_i·b_j)`` of rank-1 factors ``a [N, d_hidden, 1]``,
    ``b [N, d_model, 1]`` (unit columns), with zeros on the diagonal."""
    ga = a[..., 0] @ a[..., 0].T
    gb = b[..., 0] @ b[..., 0].T
    g = ga * gb
    return g - torch.diag_embed(torch.diagonal(g))


def population_step(
    aslice: AdapterSlice,
    a: torch.Tensor,
    b: torch.Tensor,
    opt: torch.optim.Optimizer,
    radius: float,
    p: float,
    q: float,
    ortho: float,
    chunk: int,
) -> tuple[torch.Tensor, float]:
    """One step of the whole population (module docstring): ``(objective [N] before the step,
    mean squared off-diagonal overlap before the step)``."""
    N = a.shape[0]
    opt.zero_grad(set_to_none=True)
    objs = []
    for i in range(0, N, chunk):
        obj = adapter_objective(aslice, a[i : i + chunk], b[i : i + chunk], radius, p, q)
        (-obj.sum() / N).backward()
        objs.append(obj.detach())
    obj_all = torch.cat(objs)
    g = overlap(a, b)
    pen = (g**2).sum() / max(1, N * (N - 1))
    if ortho > 0 and N > 1:
        (ortho * obj_all.mean() * pen).backward()
    projected_step(a, b, opt, tangent_factors, normalize_factors)
    return obj_all, float(pen.detach())


class Rank1Method(AdapterMethod):
    """A population of rank-1 factors in one fit (not resumable: the factors are coupled)."""

    name: ClassVar[str] = "rank1"
    settings_class: ClassVar[type] = Rank1Settings
    resumable: ClassVar[bool] = False

    def __init__(self, ctx):
        super().__init__(ctx)
        if ctx.settings.lr is None:  # unit a and b: a larger step than the adapters' unit rows take
            self.lr = 0.2 / math.sqrt(ctx.lm.d_model)
        self.meta.update(lr=self.lr, ortho=ctx.settings.ortho)

    def start(self, index: int, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return factor_start(index, self.mlp.d_hidden, self.mlp.d_model, self.ctx.settings.seed, stream)

    def random_baseline(self, fit: Fit) -> dict[str, torch.Tensor]:
        a, b = self.starts(range(len(fit)), 1)
        return {"random_omega_a": a, "random_omega_b": b}

    def fit(self, resume: Fit | None, checkpoint: Checkpoint | None) -> Fit:
        s, device = self.ctx.settings, self.aslice.z0.device
        t0 = time.perf_counter()
        a0, b0 = self.starts(range(s.num_vectors))
        a = a0.to(device).clone().requires_grad_(True)
        b = b0.to(device).clone().requires_grad_(True)
        opt = torch.optim.AdamW([a, b], lr=self.lr, betas=BETAS, weight_decay=0.0, amsgrad=True)
        first = None
        with tqdm(total=s.steps, desc="rank-1 population", unit="step", disable=not self.ctx.show_progress) as bar:
            for _ in range(s.steps):
                obj, pen = population_step(self.aslice, a, b, opt, self.radius, s.p, s.q, s.ortho, s.batch)
                first = obj.cpu() if first is None else first
                bar.update(1)
                bar.set_postfix(objective=f"{obj.mean():.4g}", overlap=f"{pen:.2e}", refresh=False)
        a1, b1 = a.detach().float().cpu(), b.detach().float().cpu()
        final = torch.tensor(self.objectives({"omega_a": a1, "omega_b": b1}))
        first = final if first is None else first
        cos = _product_cosine(a0, b0, a1, b1)
        pn0 = self.aslice.perturbation_norm(a0, b0, self.radius)
        pn1 = self.aslice.perturbation_norm(a1, b1, self.radius)
        secs = (time.perf_counter() - t0) / s.num_vectors
        g = overlap(a1, b1).abs()
        info = [
            vector_info(
                float(final[j]),
                float(first[j]),
                float(cos[j]),
                secs,
                perturbation_norm=float(pn1[j]),
                start_perturbation_norm=float(pn0[j]),
                max_overlap=float(g[j].max()) if len(g) > 1 else 0.0,
            )
            for j in range(s.num_vectors)
        ]
        parts = {"omega_a": a1, "omega_b": b1, "start_omega_a": a0, "start_omega_b": b0}
        return Fit(parts, info)
