"""MELBO-ortho: many mutually orthogonal vectors with the behaviour of one (METHOD.md section 3).

Given a base vector ``θ₀`` added after block ``src`` and prompts, with ``z₀,i = mean_{t∈I_i}
h_tgt,i,t(θ₀)`` (the target activations of prompt ``i`` averaged over its positions; all
positions by default, as in the reference), find ``θ₁, θ₂, …`` one after another, ``θ_k``
minimizing

    loss(θ) = Σ_i ‖ mean_{t∈I_i} h_tgt,i,t(θ) − z₀,i ‖₂        (one prompt: the reference's loss)

subject to ``θ_k ⟂ θ₀, …, θ_{k-1}``: Adam (lr 0.01, torch's default betas), 1000 steps per
vector, ``θ`` projected onto the orthogonal complement after every step, no norm constraint.
Each ``θ_k`` starts at the projection of ``θ₀`` onto that complement, i.e. at 0 (the reference
starts at ``θ₀`` and projects after its first step). Stops after ``num_vectors`` vectors, when a
vector's norm falls below ``min_norm`` (the reference dropped norms ≤ 0.1; such a vector is not
kept; norms below 1e-6·‖θ₀‖ are float noise and always stop it), on a NaN, or when the
complement is empty (``d_model`` vectors). The forward is the core's truncated
:class:`melbo.core.slice.Slice` (blocks ``src+1..tgt`` only).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from melbo.core.errors import MelboError
from melbo.core.slice import Slice
from melbo.core.sphere import max_abs_cos, project_out, random_vectors
from melbo.core.validate import check_int, check_number, check_positive
from melbo.methods.base import Checkpoint, CommonSettings, Context, Fit, perturbations

BETAS = (0.9, 0.999)  # torch's defaults, as the reference used


@dataclass
class OrthoSettings(CommonSettings):
    """Settings of MELBO-ortho (defaults from the reference).

    Attributes:
        base: θ₀, a :class:`melbo.vector.SteeringVector` (or a ``[d_model]`` tensor with
            ``source_layer`` given). num_vectors: new vectors to find (the bank then has up to
            N + 1 rows, row 0 = θ₀). steps: Adam steps per vector. lr: Adam's learning rate.
        min_norm: stop when a new vector's norm is below this (0 disables the rule).
    """

    base: Any
    steps: int
    lr: float
    min_norm: float

    def check(self) -> None:
        super().check()
        if self.base is None:
            raise MelboError("MELBO-ortho needs a base vector θ₀: pass base=bank[k] (a SteeringVector)")
        self.steps = check_int("steps", self.steps, 1, 1_000_000)
        self.lr = check_positive("learning rate", self.lr)
        self.min_norm = check_number("minimum norm", self.min_norm, 0.0)

    def layers_hint(self) -> tuple[int | None, int | None]:
        """θ₀'s own source and target layers (a SteeringVector records them)."""
        meta = getattr(self.base, "meta", {}) or {}
        return getattr(self.base, "layer", None), meta.get("target_layer")

    def base_tensor(self) -> torch.Tensor:
        v = getattr(self.base, "vector", self.base)
        if not isinstance(v, torch.Tensor):
            raise MelboError(f"base vector must be a SteeringVector or a tensor, got {type(self.base).__name__}")
        return v.detach().float().cpu().reshape(-1)


def position_means(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[V, n, d]``: mean over each prompt's counted positions of ``z`` (``[V, n, T, d]``)."""
    m = mask.to(z.dtype)[None, :, :, None]
    return (z * m).sum(2) / m.sum(2).clamp_min(1)


def ortho_target(slice_: Slice, base: torch.Tensor) -> torch.Tensor:
    """``z₀ [n, d_model]`` float32: ``mean_t h_tgt(θ₀)`` for each prompt."""
    with torch.no_grad():
        z = slice_(base.reshape(1, -1).to(slice_.h_src.device))
    return position_means(z.float(), slice_.mask)[0]


def ortho_loss(slice_: Slice, theta: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[V]``: ``Σ_i ‖mean_t h_tgt,i(θ_v) − z₀,i‖₂`` (METHOD.md section 3) for ``theta [V, d]``."""
    return (position_means(slice_(theta).float(), slice_.mask) - target[None]).norm(dim=-1).sum(-1)


def train_ortho_vector(
    slice_: Slice, target: torch.Tensor, basis: torch.Tensor, steps: int, lr: float, progress: tqdm | None = None
) -> tuple[torch.Tensor, dict]:
    """Find one vector orthogonal to the rows of ``basis`` (``[k, d]`` orthonormal, float64).

    Starts at 0 (θ₀ projected onto the complement); each step: loss, backward, Adam step, then
    θ projected onto the orthogonal complement of ``basis``.

    Returns:
        ``(vector [d_model] float32, info)`` with the loss before the first step and at the end,
        the norm and the seconds.
    """
    t0 = time.perf_counter()
    device = slice_.h_src.device
    basis = basis.to(device)
    theta = torch.zeros(1, slice_.d_model, device=device, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr, betas=BETAS)
    first = None
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = ortho_loss(slice_, theta, target)
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            theta.copy_(project_out(theta, basis))
        value = loss.item()
        first = value if first is None else first
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{value:.4g}", refresh=False)
        if not math.isfinite(value):
            break
    with torch.no_grad():
        final = ortho_loss(slice_, theta, target).item()
    vec = theta.detach()[0].float().cpu()
    return vec, {
        "start_loss": first,
        "loss": final,
        "objective": final,
        "norm": float(vec.double().norm()),
        "seconds": time.perf_counter() - t0,
    }


class OrthoMethod:
    """MELBO-ortho (module docstring): row 0 of the bank is θ₀, then the vectors found, one after
    another; resumable per vector. ``meta["stop_reason"]`` says why it stopped."""

    name: ClassVar[str] = "ortho"
    kind: ClassVar[str] = "vector"
    settings_class: ClassVar[type] = OrthoSettings
    resumable: ClassVar[bool] = True
    writes_measures: ClassVar[bool] = True

    def __init__(self, ctx: Context):
        self.ctx, s = ctx, ctx.settings
        self.base = s.base_tensor()
        d = ctx.lm.d_model
        if self.base.shape[0] != d:
            raise MelboError(f"base vector is {self.base.shape[0]} wide, the model has d_model={d}")
        if not self.base.norm() > 0 or not torch.isfinite(self.base).all():
            raise MelboError("the base vector is zero or not finite; MELBO-ortho needs a steering vector θ₀")
        self.slice = Slice(ctx.lm.model, ctx.lm.blocks, ctx.batch, ctx.src, ctx.tgt)
        self.target = ortho_target(self.slice, self.base)
        self.radius = float(self.base.norm())
        self.meta = {
            "radius": self.radius,
            "residual_norm": self.slice.residual_norm(),
            "betas": list(BETAS),
            "base": getattr(s.base, "label", "") or "θ₀",
            "stop_reason": None,
            "rejected_norm": None,
        }

    def fit(self, resume: Fit | None, checkpoint: Checkpoint | None) -> Fit:
        s, d = self.ctx.settings, self.slice.d_model
        base_info = {"norm": self.radius, "base": True, "objective": 0.0}
        vectors = resume.tensors["vectors"] if resume else self.base[None]
        info = list(resume.info) if resume else [base_info]
        u = vectors.double()
        basis = torch.linalg.qr(u.T)[0].T.contiguous()
        floor = max(s.min_norm, 1e-6 * self.radius)  # below ~1e-6·‖θ₀‖ a projected vector is float noise
        reason = "num_vectors"
        todo = max(0, min(s.num_vectors + 1, d) - len(vectors))
        with tqdm(
            total=todo * s.steps,
            desc="MELBO-ortho",
            unit="step",
            disable=not self.ctx.show_progress,
            dynamic_ncols=True,
        ) as bar:
            while len(vectors) < s.num_vectors + 1:
                if len(basis) >= d:
                    reason = "full_basis"
                    break
                vec, row = train_ortho_vector(self.slice, self.target, basis, s.steps, s.lr, bar)
                if not (math.isfinite(row["loss"]) and torch.isfinite(vec).all()):
                    reason = "nan"
                    break
                if row["norm"] < floor:
                    reason = "min_norm"
                    self.meta["rejected_norm"] = row["norm"]
                    break
                w = project_out(vec.double()[None], basis)
                basis = torch.cat([basis, w / w.norm()])
                vectors = torch.cat([vectors, vec[None]])
                info.append(row)
                if checkpoint is not None:
                    checkpoint(Fit({"vectors": vectors}, list(info)))
        self.meta["stop_reason"] = reason
        self.meta["max_abs_cosine"] = max_abs_cos(vectors)
        return Fit({"vectors": vectors}, info)

    def random_baseline(self, fit: Fit) -> dict[str, torch.Tensor]:
        """Random directions orthogonal to θ₀, each at the norm of the learned row of the same index."""
        vecs = fit.tensors["vectors"]
        unit = (self.base.double() / self.base.double().norm())[None]
        rand = random_vectors(len(vecs), self.slice.d_model, 1.0, self.ctx.settings.seed, basis=unit)
        return {"random_vectors": rand * vecs.double().norm(dim=-1, keepdim=True).float()}

    def objectives(self, tensors: dict[str, torch.Tensor]) -> list[float]:
        v = perturbations(tensors)
        with torch.no_grad():
            return ortho_loss(self.slice, v.to(self.slice.h_src.device), self.target).cpu().tolist()
