"""Unsupervised steering adapters (METHOD.md section 2).

A rank-r perturbation of the MLP output (down-projection) weight of block ``src``,

    W' = W + R · Ω_B Ω_Aᵀ,   Ω_A ∈ R^{d_hidden×r} (unit-norm rows),  Ω_B ∈ R^{d_model×r} (unit-norm columns)

trained with the MELBO objective of section 1 on the truncated pass: :class:`AdapterSlice` reruns
block ``src`` (with the adapters hooked in, :mod:`melbo.core.lora`) from its recorded inputs, then
blocks ``src+1..tgt``. Each step projects the gradient onto the tangent space of the constraint
(each row of Ω_A, each column of Ω_B on its unit sphere), takes an AdamW (AMSGrad) step and
renormalizes rows and columns, as the reference notebook does. Adapters are independent (no
orthogonality between them), so ``batch`` of them train at once; Adam is elementwise, so that
equals training them one after another. A relative radius ``"<k>x"`` sets R so that the random
starts add, on average over the counted positions, ``k ×`` the residual norm to the MLP output.
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
from melbo.core.lora import MlpOut, apply_adapter, find_mlp_out
from melbo.core.models import LoadedModel
from melbo.core.prompts import PromptBatch
from melbo.core.radius import parse_radius
from melbo.core.slice import Slice, melbo_objective
from melbo.core.validate import check_int, check_positive
from melbo.methods.base import Checkpoint, CommonSettings, Context, Fit, vector_info
from melbo.methods.melbo_train import BETAS


@dataclass
class AdapterSettings(CommonSettings):
    """Settings of steering adapters (``num_vectors`` is the number of adapters).

    Attributes:
        radius: R of ``W' = W + R Ω_B Ω_Aᵀ``, or ``"<k>x"`` (module docstring).
        rank: r (None: min(64, d_model)). p, q, steps: as for vectors.
        lr: None gives ``0.045/√d_model`` (the reference's 1e-3 at d_model 2048: a step of about
            4.5% of each unit column of Ω_B).
        batch: adapters trained at once. mlp_module: dotted path of the MLP output in a block.
    """

    radius: str
    rank: int | None
    p: float
    q: float
    steps: int
    lr: float | None
    batch: int
    mlp_module: str | None

    def check(self) -> None:
        super().check()
        r = parse_radius(self.radius)
        if r.kind not in ("absolute", "relative"):
            raise MelboError(f"radius {r} is not available for adapters; allowed: a number or kx")
        self.radius = str(r)
        if self.rank is not None:
            self.rank = check_int("adapter rank", self.rank, 1, 100_000)
        self.p = check_positive("p", self.p)
        self.q = check_positive("q", self.q)
        self.steps = check_int("steps", self.steps, 0, 1_000_000)
        if self.lr is not None:
            self.lr = check_positive("learning rate", self.lr)
        self.batch = check_int("adapter batch", self.batch, 1, 100_000)

    def check_model(self, d_model: int) -> None:
        if self.rank is not None and self.rank > d_model:
            raise MelboError(f"adapter rank {self.rank} is above d_model = {d_model}; allowed: 1..{d_model}")


def normalize_adapter(omega_a: torch.Tensor, omega_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows of Ω_A (``[..., d_hidden, r]``) and unit columns of Ω_B (``[..., d_model, r]``)."""
    return nn.functional.normalize(omega_a, dim=-1), nn.functional.normalize(omega_b, dim=-2)


def tangent_adapter(
    grad_a: torch.Tensor, grad_b: torch.Tensor, omega_a: torch.Tensor, omega_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients projected onto the tangent space of the constraint: each row of ``grad_a``
    loses its component along that unit row of Ω_A, each column of ``grad_b`` along that of Ω_B."""
    ga = grad_a - (grad_a * omega_a).sum(-1, keepdim=True) * omega_a
    gb = grad_b - (grad_b * omega_b).sum(-2, keepdim=True) * omega_b
    return ga, gb


def adapter_start(
    index: int, d_hidden: int, d_model: int, rank: int, seed: int, stream: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random start of adapter ``index``: Gaussian Ω_A ``[d_hidden, r]`` and Ω_B ``[d_model, r]``
    drawn from ``(seed, stream, index)`` alone, normalized, float32. ``stream`` 0 gives the
    learned adapters' starts, 1 the random baseline."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + stream * 7_919_993 + 424_243 + index)
    a = torch.randn(d_hidden, rank, generator=g, dtype=torch.float64)
    b = torch.randn(d_model, rank, generator=g, dtype=torch.float64)
    a, b = normalize_adapter(a, b)
    return a.float(), b.float()


def random_adapters(
    n: int, d_hidden: int, d_model: int, rank: int, seed: int, stream: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random adapters (the baseline): ``([n, d_hidden, r], [n, d_model, r])`` float32."""
    if n == 0:
        return torch.zeros(0, d_hidden, rank), torch.zeros(0, d_model, rank)
    pairs = [adapter_start(k, d_hidden, d_model, rank, seed, stream) for k in range(n)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class AdapterSlice:
    """Block ``src`` with ``V`` adapters on its MLP output, then blocks ``src+1..tgt``, on a fixed
    prompt batch (from the inputs one forward pass recorded). Blocks before ``src``, after ``tgt``
    and the LM head never run.

    Attributes:
        slice: the core :class:`melbo.core.slice.Slice` (``z0 [n, T, d]``, ``mask [n, T]``).
        mlp: the :class:`melbo.core.lora.MlpOut` of block ``src``.
        mlp_in: ``[n, T, d_hidden]`` the MLP output module's input (unsteered).
    """

    def __init__(self, lm: LoadedModel, batch: PromptBatch, src: int, tgt: int, mlp: MlpOut | None = None):
        self.mlp = mlp or find_mlp_out(lm, src)
        self.src, self.blocks = src, lm.blocks
        self.slice = Slice(lm.model, lm.blocks, batch, src, tgt, capture_source=True)
        self.call = self.slice.calls[src]
        if self.call.hidden is None:
            raise MelboError(f"block {src}'s input hidden states were not recorded")
        self.hidden: torch.Tensor = self.call.hidden
        got: dict[str, torch.Tensor] = {}
        hook = self.mlp.module.register_forward_hook(lambda m, a, o: got.__setitem__("x", a[0].detach()))
        try:
            with torch.no_grad():
                self.call.run(self.blocks[src], self.hidden, 1)
        finally:
            hook.remove()
        self.mlp_in = got["x"].reshape(*self.slice.mask.shape, -1)

    @property
    def z0(self) -> torch.Tensor:
        return self.slice.z0

    @property
    def mask(self) -> torch.Tensor:
        return self.slice.mask

    def __call__(self, omega_a: torch.Tensor, omega_b: torch.Tensor, radius: float | torch.Tensor) -> torch.Tensor:
        """``[V, n, T, d_model]``: ``Z(Ω_v)`` for ``omega_a [V, d_hidden, r]``, ``omega_b
        [V, d_model, r]`` at radius R (a float or ``[V]``), METHOD.md section 2."""
        V = omega_a.shape[0]
        x = self.hidden.repeat(V, *([1] * (self.hidden.dim() - 1)))
        with apply_adapter(self.mlp.module, omega_a, omega_b, radius):
            h = self.call.run(self.blocks[self.src], x, V)
        return self.slice.run_blocks(h).reshape(V, *self.z0.shape)

    def perturbation_norm(
        self, omega_a: torch.Tensor, omega_b: torch.Tensor, radius: float | torch.Tensor = 1.0
    ) -> torch.Tensor:
        """``[V]``: mean over the counted positions of ``‖R · Ω_B Ω_Aᵀ x_t‖₂``, what each adapter
        adds to the MLP output (residual-stream units) on the unsteered input."""
        with torch.no_grad():
            x = self.mlp_in.float()
            a, b = omega_a.to(x.device).float(), omega_b.to(x.device).float()
            delta = torch.einsum("vntr,vdr->vntd", torch.einsum("nth,vhr->vntr", x, a), b)
            r = radius.to(delta)[:, None, None] if torch.is_tensor(radius) else radius
            return (delta.norm(dim=-1) * r)[:, self.mask].mean(-1).cpu()


def adapter_objective(
    aslice: AdapterSlice, omega_a: torch.Tensor, omega_b: torch.Tensor, radius: float, p: float, q: float
) -> torch.Tensor:
    """``[V]`` MELBO objective (METHOD.md section 1) of ``V`` adapters at radius R."""
    return melbo_objective(aslice(omega_a, omega_b, radius), aslice.z0, aslice.mask, p, q)


def adapter_step(
    aslice: AdapterSlice,
    omega_a: torch.Tensor,
    omega_b: torch.Tensor,
    opt: torch.optim.Optimizer,
    radius: float,
    p: float,
    q: float,
) -> torch.Tensor:
    """One projected ascent step on ``V`` adapters (leaves that require grad); returns the ``[V]``
    objective before the step."""
    opt.zero_grad(set_to_none=True)
    obj = adapter_objective(aslice, omega_a, omega_b, radius, p, q)
    (-obj.sum()).backward()
    projected_step(omega_a, omega_b, opt, tangent_adapter, normalize_adapter)
    return obj.detach()


def projected_step(a: torch.Tensor, b: torch.Tensor, opt: torch.optim.Optimizer, tangent, normalize) -> None:
    """After ``backward()``: replace the gradients of ``a`` and ``b`` by ``tangent(ga, gb, a, b)``
    (their projection onto the constraint's tangent space), step ``opt`` and put ``a``, ``b`` back
    on the constraint with ``normalize(a, b)``, in place."""
    ga, gb = a.grad, b.grad
    assert ga is not None and gb is not None  # backward() just filled them
    with torch.no_grad():
        a.grad, b.grad = tangent(ga, gb, a, b)
    opt.step()
    with torch.no_grad():
        na, nb = normalize(a, b)
        a.copy_(na)
        b.copy_(nb)


def _product_cosine(a0: torch.Tensor, b0: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """``[V]`` cosine (Frobenius) between ``Ω_B0 Ω_A0ᵀ`` and ``Ω_B1 Ω_A1ᵀ`` per adapter, from r×r
    Gram matrices: ⟨B0 A0ᵀ, B1 A1ᵀ⟩_F = Σ (A0ᵀA1) ⊙ (B0ᵀB1), never the [d_model, d_hidden] products."""

    def inner(a, b, c, d):  # ⟨b aᵀ, d cᵀ⟩_F per adapter
        return ((a.double().transpose(1, 2) @ c.double()) * (b.double().transpose(1, 2) @ d.double())).sum((1, 2))

    cross = inner(a0, b0, a1, b1)
    n0, n1 = inner(a0, b0, a0, b0).clamp_min(0).sqrt(), inner(a1, b1, a1, b1).clamp_min(0).sqrt()
    return cross / (n0 * n1).clamp_min(1e-300)


class AdapterMethod:
    """Steering adapters from independent seeded starts, ``batch`` at a time; resumable per batch."""

    name: ClassVar[str] = "adapter"
    kind: ClassVar[str] = "adapter"
    settings_class: ClassVar[type] = AdapterSettings
    resumable: ClassVar[bool] = True

    def __init__(self, ctx: Context):
        self.ctx, s = ctx, ctx.settings
        self.aslice = AdapterSlice(ctx.lm, ctx.batch, ctx.src, ctx.tgt, find_mlp_out(ctx.lm, ctx.src, s.mlp_module))
        self.mlp = self.aslice.mlp
        self.rank = int(s.rank or min(64, ctx.lm.d_model))
        self.residual_norm = self.aslice.slice.residual_norm()
        r = parse_radius(s.radius)
        if r.kind == "relative":
            unit = self.aslice.perturbation_norm(*self.starts(range(s.num_vectors)), 1.0).mean().item()
            self.radius = float(r.value) * self.residual_norm / unit  # type: ignore[arg-type]
        else:
            self.radius = r.resolve(self.residual_norm)
        self.lr = s.lr if s.lr is not None else 0.045 / math.sqrt(ctx.lm.d_model)
        self.meta = {
            "radius": self.radius,
            "residual_norm": self.residual_norm,
            "lr": self.lr,
            "rank": self.rank,
            "module": self.mlp.path,
            "module_name": self.mlp.full_name,
            "conv1d": self.mlp.conv1d,
            "d_hidden": self.mlp.d_hidden,
            "betas": list(BETAS),
            "weight_decay": 0.0,
        }

    def start(self, index: int, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return adapter_start(index, self.mlp.d_hidden, self.mlp.d_model, self.rank, self.ctx.settings.seed, stream)

    def starts(self, indices, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The starts of adapters ``indices`` (:meth:`start`), stacked: ``([k, d_hidden, r], [k, d_model, r])``."""
        a, b = zip(*[self.start(i, stream) for i in indices])
        return torch.stack(a), torch.stack(b)

    def fit(self, resume: Fit | None, checkpoint: Checkpoint | None) -> Fit:
        s, device = self.ctx.settings, self.aslice.z0.device
        names = ("omega_a", "omega_b", "start_omega_a", "start_omega_b")
        h, d, r = self.mlp.d_hidden, self.mlp.d_model, self.rank
        parts = (
            {k: resume.tensors[k] for k in names}
            if resume
            else {
                "omega_a": torch.zeros(0, h, r),
                "omega_b": torch.zeros(0, d, r),
                "start_omega_a": torch.zeros(0, h, r),
                "start_omega_b": torch.zeros(0, d, r),
            }
        )
        info = list(resume.info) if resume else []
        with tqdm(
            total=(s.num_vectors - len(info)) * s.steps,
            desc="MELBO adapters",
            unit="adapter-step",
            disable=not self.ctx.show_progress,
            dynamic_ncols=True,
        ) as bar:
            for first in range(len(info), s.num_vectors, s.batch):
                idx = list(range(first, min(s.num_vectors, first + s.batch)))
                t0 = time.perf_counter()
                a0, b0 = self.starts(idx)
                a = a0.to(device).clone().requires_grad_(True)
                b = b0.to(device).clone().requires_grad_(True)
                opt = torch.optim.AdamW([a, b], lr=self.lr, betas=BETAS, weight_decay=0.0, amsgrad=True)
                history = []
                for _ in range(s.steps):
                    history.append(adapter_step(self.aslice, a, b, opt, self.radius, s.p, s.q).cpu())
                    bar.update(len(idx))
                    bar.set_postfix(
                        adapters=f"{idx[0]}-{idx[-1]}", objective=f"{history[-1].mean():.4g}", refresh=False
                    )
                with torch.no_grad():
                    final = adapter_objective(self.aslice, a, b, self.radius, s.p, s.q).cpu()
                a1, b1 = a.detach().float().cpu(), b.detach().float().cpu()
                cos = _product_cosine(a0, b0, a1, b1)
                pn0 = self.aslice.perturbation_norm(a0, b0, self.radius)
                pn1 = self.aslice.perturbation_norm(a1, b1, self.radius)
                first_obj = history[0] if history else final
                secs = (time.perf_counter() - t0) / len(idx)
                for j in range(len(idx)):
                    info.append(
                        vector_info(
                            float(final[j]),
                            float(first_obj[j]),
                            float(cos[j]),
                            secs,
                            perturbation_norm=float(pn1[j]),
                            start_perturbation_norm=float(pn0[j]),
                        )
                    )
                for k, t in zip(names, (a1, b1, a0, b0)):
                    parts[k] = torch.cat([parts[k], t])
                if checkpoint is not None:
                    checkpoint(Fit(dict(parts), list(info)))
        return Fit(parts, info)

    def random_baseline(self, fit: Fit) -> dict[str, torch.Tensor]:
        a, b = random_adapters(len(fit), self.mlp.d_hidden, self.mlp.d_model, self.rank, self.ctx.settings.seed)
        return {"random_omega_a": a, "random_omega_b": b}

    def objectives(self, tensors: dict[str, torch.Tensor]) -> list[float]:
        key = "omega" if "omega_a" in tensors else "random_omega"
        a, b = tensors[f"{key}_a"], tensors[f"{key}_b"]
        s, dev, out = self.ctx.settings, self.aslice.z0.device, []
        with torch.no_grad():
            for i in range(0, len(a), s.batch):
                out += (
                    adapter_objective(
                        self.aslice, a[i : i + s.batch].to(dev), b[i : i + s.batch].to(dev), self.radius, s.p, s.q
                    )
                    .cpu()
                    .tolist()
                )
        return out

    def perturbation_norms(self, tensors: dict[str, torch.Tensor]) -> list[float]:
        """Mean ‖R Ω_B Ω_Aᵀ x‖ of each adapter in ``tensors`` (``random_*`` names too)."""
        key = "omega" if "omega_a" in tensors else "random_omega"
        return self.aslice.perturbation_norm(tensors[f"{key}_a"], tensors[f"{key}_b"], self.radius).tolist()
