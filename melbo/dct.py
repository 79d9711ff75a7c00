"""Deep causal transcoding (DCT): hundreds of steering vectors at once (METHOD.md section 5).

The slice ``f`` maps ``h_src`` to ``h_tgt`` (blocks ``src+1..tgt``). For prompts ``x_i`` with
cached ``y_i = f(x_i)`` and positions ``I_i`` (the last 3 tokens by default; padding never counts),

    Δ(θ) = mean_i mean_{t∈I_i} [f(x_i + θ) − y_i]_t                      (one d_model vector)

with θ added at every position (``writes_only``: ``Δ(θ) − θ``, only what the blocks write,
METHOD.md "The residual path"). DCT models ``Δ(R·θ) ≈ Σ_ℓ α_ℓ σ(⟨v_ℓ, θ⟩) u_ℓ`` with unit
``u_ℓ, v_ℓ`` and σ(x) = e^x − 1 (exponential, the default), x (linear) or x² (quadratic); the
steering vectors are ``R·v_ℓ``.

Everything works on *rows*: ``U``, ``V`` are ``[m, d_model]`` (factor ℓ is row ℓ), and ``Δ`` is
evaluated for a batch of ``V`` vectors at once (:class:`DeltaMap`, built on
:class:`melbo.objective.Slice`). Products with the Jacobian are row-wise too: ``jvp`` (forward
mode, ``torch.func.jvp``) and ``vjp`` (reverse mode).

Fitting (:func:`fit_dct`, orthogonalized gradient iteration): initialize ``V`` (``jacobian``:
``v_ℓ = normalize(Jᵀu_ℓ)`` for random unit ``u_ℓ``; ``svd``: the top right singular vectors of
a 32-row random projection ``W J`` of the Jacobian, with ``U = normalize(J V)``; or ``random``),
then τ = 10 iterations of

    V ← orthogonalize(V)                  (QR with diag(R) > 0, or soft orthogonalization)
    G_U = Δ(R v_ℓ),  G_V = ∇_v ⟨u_ℓ, Δ(R v)⟩|_{v=v_ℓ}          (exp; one batched VJP)
    U ← normalize(β·normalize(G_U) + (1 − β)·U),  V ← normalize(β·normalize(G_V) + (1 − β)·V)

(β = 1: no damping). Linear: ``G_U = J v``, ``G_V = Jᵀu``; quadratic: ``G_U = D²Δ[v, v]``,
``G_V = D²Δ[u; v, ·]``, all at θ = 0. Ranking: ``α = K⁻¹c`` with ``K = (UᵀU) ∘ σ(VᵀV)``
(elementwise) and ``c_ℓ = ⟨u_ℓ, Δ(R v_ℓ)⟩`` (exp; ``R⟨u, Jv⟩`` linear, ``R²/2·⟨u, D²Δ[v,v]⟩``
quadratic, so α is in activation units at scale R for every σ); factors are ranked by α²
(or by a user readout).

Forward-mode AD does not go through SDPA/flash attention kernels: :meth:`DeltaMap.from_model`
builds the slice with eager attention and runs every evaluation under it (the model is switched
back afterwards), so a model loaded with the default ``sdpa`` works unchanged.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from melbo.calibrate import Calibration, calibrate_radius, format_curve
from melbo.errors import MelboError
from melbo.objective import Slice
from melbo.prompts import PromptBatch, encode_prompts, parse_positions
from melbo.train import check_positive

SIGMAS = ("exp", "linear", "quadratic")
INITS = ("jacobian", "svd", "random")
ORTHOGONALIZE = ("qr", "soft", "none")
DEFAULT_POSITIONS = "last:3"
DEFAULT_FACTORS = 512


# ---------------------------------------------------------------- attention for forward-mode AD

@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Run ``model`` with eager attention inside the block; restore its implementation after.

    Forward-mode AD (JVPs) is not implemented for the SDPA / flash attention kernels. Models that
    cannot switch (no ``set_attn_implementation``) are left as they are.
    """
    cfg = getattr(model, "config", None)
    old = getattr(cfg, "_attn_implementation", None)
    switch = old not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        try:
            model.set_attn_implementation("eager")
        except Exception as e:  # noqa: BLE001 -- transformers raises several types
            raise MelboError(f"cannot switch {type(model).__name__} to eager attention ({e}); "
                             f"load it with attn_implementation='eager'") from e
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(old)


def _forward_ad_error(e: Exception) -> MelboError:
    return MelboError(
        f"forward-mode AD (a JVP) failed: {str(e).splitlines()[0]}. JVPs need eager attention: build Δ with "
        f"DeltaMap.from_model / DeltaMap.from_batch (they switch to eager attention), or load the model "
        f"with attn_implementation='eager'")


# ---------------------------------------------------------------- Δ and its derivatives

class FunctionDelta:
    """A row-wise map ``Δ: [V, d] -> [V, d]`` with the products DCT needs.

    Row ``v`` of the output depends only on row ``v`` of the input, so one batched call
    evaluates Δ at many points, and the JVP/VJP of the batch are the per-row JVPs/VJPs.

    Args:
        fn: a differentiable torch function of ``theta [V, d]`` returning ``[V, d]``.
        d_model: d.
        chunk_size: vectors per call of ``fn`` (None: all at once).
        device: where ``fn`` wants its input (default cpu).
        dtype: the float type inputs are cast to and results returned in (float32; float64 for
            checks that need the precision).
    """

    writes_only = False

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], d_model: int, chunk_size: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.fn = fn
        self._d = int(d_model)
        self.chunk_size = chunk_size
        self._device = torch.device(device)
        self.dtype = dtype

    @property
    def d_model(self) -> int:
        return self._d

    @property
    def device(self) -> torch.device:
        return self._device

    def _eval(self, theta: torch.Tensor) -> torch.Tensor:
        return self.fn(theta)

    def _context(self):
        return nullcontext()

    def _chunks(self, *xs: torch.Tensor):
        n = xs[0].shape[0]
        step = self.chunk_size or max(1, n)
        for s in range(0, max(n, 1), step):
            yield tuple(x[s:s + step].to(self.device, self.dtype) for x in xs)

    def _check(self, theta: torch.Tensor) -> None:
        if theta.dim() != 2 or theta.shape[1] != self.d_model:
            raise MelboError(f"Δ takes vectors of shape [V, {self.d_model}], got {tuple(theta.shape)}")

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        """``Δ(θ_v)`` for each row. ``theta [V, d]`` -> ``[V, d]`` in ``dtype`` (activation units)."""
        self._check(theta)
        with torch.no_grad(), self._context():
            return torch.cat([self._eval(t).to(self.dtype) for (t,) in self._chunks(theta)])

    def jvp(self, theta: torch.Tensor, tangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward mode: ``(Δ(θ_v), J(θ_v) t_v)`` for each row (``torch.func.jvp``). Both ``[V, d]``.

        Raises:
            MelboError: the model's attention kernel has no forward-mode AD (use eager).
        """
        self._check(theta)
        vals, jvs = [], []
        with torch.no_grad(), self._context():
            for t, tg in self._chunks(theta, tangent):
                try:
                    v, jv = torch.func.jvp(self._eval, (t,), (tg,))
                except NotImplementedError as e:
                    raise _forward_ad_error(e) from e
                vals.append(v.to(self.dtype))
                jvs.append(jv.to(self.dtype))
        return torch.cat(vals), torch.cat(jvs)

    def vjp(self, theta: torch.Tensor, cotangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse mode: ``(Δ(θ_v), J(θ_v)ᵀ c_v)`` for each row. Both ``[V, d]``."""
        self._check(theta)
        vals, grads = [], []
        with torch.enable_grad(), self._context():
            for t, c in self._chunks(theta, cotangent):
                t = t.detach().requires_grad_(True)
                out = self._eval(t).to(self.dtype)
                (g,) = torch.autograd.grad(out, t, grad_outputs=c)
                vals.append(out.detach())
                grads.append(g.to(self.dtype))
        return torch.cat(vals), torch.cat(grads)

    def second_derivative(self, theta: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """``D²Δ(θ_v)[w_v, w_v]`` for each row. ``[V, d]``.

        Reverse mode only (third-order autograd: ``∇_c ⟨w, ∇_x ⟨w, ∇_x ⟨c, Δ(x)⟩⟩⟩``, linear in
        the dummy cotangent ``c``): nested forward mode is not reliable (torch 2.x's forward-AD
        formula of ``layer_norm`` is wrong at second order, and ``silu``'s is missing).
        """
        self._check(theta)
        out = []
        with torch.enable_grad(), self._context():
            for t, w in self._chunks(theta, direction):
                t = t.detach().requires_grad_(True)
                y = self._eval(t).to(self.dtype)
                c = torch.zeros_like(y, requires_grad=True)
                (g,) = torch.autograd.grad(y, t, grad_outputs=c, create_graph=True)
                h = (torch.autograd.grad(g, t, grad_outputs=w, create_graph=True, allow_unused=True)[0]
                     if g.requires_grad else None)
                if h is None or not h.requires_grad:                    # Δ is linear: D²Δ = 0
                    out.append(torch.zeros_like(w))
                    continue
                (r,) = torch.autograd.grad(h, c, grad_outputs=w, allow_unused=True)
                out.append(torch.zeros_like(w) if r is None else r.to(self.dtype))
        return torch.cat(out)

    def second_vjp(self, theta: torch.Tensor, direction: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
        """``∇_x ⟨c_v, J(x) w_v⟩`` at ``x = θ_v`` = ``D²Δ(θ_v)[c_v; w_v, ·]``: the Hessian of
        ``⟨c_v, Δ⟩`` times ``w_v`` (double backward). ``[V, d]``."""
        self._check(theta)
        out = []
        with torch.enable_grad(), self._context():
            for t, w, c in self._chunks(theta, direction, cotangent):
                t = t.detach().requires_grad_(True)
                y = self._eval(t).to(self.dtype)
                (g,) = torch.autograd.grad(y, t, grad_outputs=c, create_graph=True)
                h = torch.autograd.grad(g, t, grad_outputs=w, allow_unused=True)[0] if g.requires_grad else None
                out.append(torch.zeros_like(w) if h is None else h.to(self.dtype))
        return torch.cat(out)


class DeltaMap(FunctionDelta):
    """``Δ(θ) = mean_i mean_{t∈I_i} [f(x_i + θ) − y_i]_t`` on a :class:`melbo.objective.Slice`
    (METHOD.md section 5), batched over vectors.

    Build it with :meth:`from_model` or :meth:`from_batch` (eager attention, for JVPs). Wrapping
    an existing ``Slice`` directly works for Δ and VJPs; its JVPs need the slice to have been
    built with eager attention.

    Args:
        slice_: the truncated pass; its ``writes_only`` decides whether Δ includes θ itself.
        model: when given, every evaluation runs under :func:`eager_attention` of it.
        chunk_size: vectors per batched call (None: ``max(1, 256 // n_prompts)``).

    Attributes:
        weights: ``[n, T]``, ``1 / (n·|I_i|)`` on counted positions, 0 elsewhere (padding).
        dtype: float32 (float64 for a float64 model); Δ and its products come in it.
    """

    def __init__(self, slice_: Slice, model=None, chunk_size: int | None = None):
        self.slice = slice_
        self.model = model
        mask = slice_.mask
        counts = mask.sum(dim=1).clamp(min=1).float()
        self.weights = mask.float() / (counts[:, None] * mask.shape[0])
        dtype = torch.float64 if slice_.h_src.dtype == torch.float64 else torch.float32
        self.weights = self.weights.to(dtype)
        self._z0 = slice_.z0.to(dtype)
        super().__init__(self._delta, slice_.d_model, chunk_size or max(1, 256 // slice_.n), slice_.h_src.device,
                         dtype)

    @classmethod
    def from_batch(cls, model, blocks, batch: PromptBatch, source_layer: int, target_layer: int,
                   writes_only: bool = False, chunk_size: int | None = None) -> "DeltaMap":
        """Δ on an encoded prompt batch (its ``target_mask`` are the positions ``I_i``), blocks
        ``source_layer+1..target_layer`` (both resolved, ``0 <= src < tgt < L``)."""
        with eager_attention(model):
            s = Slice(model, blocks, batch, source_layer, target_layer, writes_only=writes_only)
        return cls(s, model, chunk_size)

    @classmethod
    def from_model(cls, lm, prompts: list[str], source_layer: int | None = None, target_layer: int | None = None,
                   positions: str = DEFAULT_POSITIONS, writes_only: bool = False, chat: bool = False,
                   chunk_size: int | None = None) -> "DeltaMap":
        """Δ of a :class:`melbo.models.LoadedModel` on ``prompts`` (last 3 tokens by default).

        Layers default to :func:`melbo.models.default_layers`; negative ones count from the end.

        Raises:
            MelboError: bad prompts, positions or layers.
        """
        from melbo.models import check_layers, default_layers

        L = lm.num_layers
        d_src, d_tgt = default_layers(L)
        src, tgt = check_layers(d_src if source_layer is None else source_layer,
                                d_tgt if target_layer is None else target_layer, L)
        batch = encode_prompts(lm.tokenizer, prompts, parse_positions(positions) if isinstance(positions, str)
                               else positions, chat)
        return cls.from_batch(lm.model, lm.blocks, batch, src, tgt, writes_only, chunk_size)

    @property
    def writes_only(self) -> bool:  # type: ignore[override]
        return self.slice.writes_only

    @property
    def source_layer(self) -> int:
        return self.slice.src

    @property
    def target_layer(self) -> int:
        return self.slice.tgt

    def _context(self):
        return eager_attention(self.model) if self.model is not None else nullcontext()

    def _delta(self, theta: torch.Tensor) -> torch.Tensor:
        z = self.slice(theta).to(self.dtype)                           # [V, n, T, d]
        return torch.einsum("vntd,nt->vd", z - self._z0[None], self.weights)

    def residual_norm(self) -> float:
        """Mean ‖h_src‖₂ over the counted positions (the residual scale at the source)."""
        return self.slice.mean_norm()


# ---------------------------------------------------------------- orthogonalization

def normalize_rows(x: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """Rows of ``x`` scaled to unit norm (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


def qr_orthogonalize(V: torch.Tensor) -> torch.Tensor:
    """Orthonormalize the rows of ``V`` (``[m, d]``, m <= d) by QR with column signs fixed so
    that ``diag(R) > 0`` (METHOD.md section 5: plain QR flips signs, and exp-DCT is not odd).

    Row ℓ of the result is ``v_ℓ`` minus its projection on rows ``0..ℓ-1``, normalized (what
    Gram–Schmidt gives), so ``⟨q_ℓ, v_ℓ⟩ > 0``. Computed in float64, returned in V's dtype.

    Raises:
        MelboError: more rows than columns (m factors cannot be orthonormal in d < m dimensions).
    """
    m, d = V.shape
    if m > d:
        raise MelboError(f"QR orthogonalization needs num_factors <= d_model, got {m} > {d}; "
                         f"use soft orthogonalization or fewer factors")
    q, r = torch.linalg.qr(V.double().T)
    s = torch.sign(torch.diagonal(r))
    s[s == 0] = 1.0
    return (q * s[None, :]).T.to(V.dtype).contiguous()


def soft_orthogonalize(V: torch.Tensor, log_norms: torch.Tensor | None = None, steps: int = 10,
                       temperature: float = 1.0) -> torch.Tensor:
    """Soft orthogonalization of the rows of ``V`` (METHOD.md section 5): ``steps`` times,
    ``S = V Vᵀ / T + b_j`` (``b_j`` = ``log_norms[j]``, typically ``log‖G_V[j]‖``; diagonal −∞),
    ``W = row-softmax(S)``, ``v_i ← normalize(v_i − Σ_j W_ij v_j)``. Works for any m (also m > d).

    Args:
        V: ``[m, d]`` unit rows.
        log_norms: ``[m]`` bias of each column (None: zeros).
        steps: inner steps (10).
        temperature: T > 0 (1).
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
        s = s.masked_fill(eye, float("-inf"))
        w = torch.softmax(s, dim=-1)
        x = normalize_rows(x - w @ x)
    return x.to(V.dtype)


def mean_abs_cos(V: torch.Tensor) -> float:
    """Mean |cos| between distinct rows of ``V`` (0 for orthogonal rows)."""
    m = V.shape[0]
    if m < 2:
        return 0.0
    x = normalize_rows(V.double())
    c = (x @ x.T).abs()
    return float((c.sum() - c.diagonal().sum()) / (m * (m - 1)))


# ---------------------------------------------------------------- the iteration and the ranking

def sigma_fn(sigma: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """σ of the model: ``exp`` -> e^x − 1, ``linear`` -> x, ``quadratic`` -> x²."""
    if sigma == "exp":
        return torch.expm1
    if sigma == "linear":
        return lambda x: x
    if sigma == "quadratic":
        return lambda x: x * x
    raise MelboError(f"unknown DCT activation {sigma!r}; allowed: {', '.join(SIGMAS)}")


def gradients(delta, U: torch.Tensor, V: torch.Tensor, radius: float, sigma: str = "exp"
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(G_U, G_V, c)`` for all factors at once: the gradients of the causal importance
    ``c_ℓ`` (see :func:`causal_importance`) with respect to ``u_ℓ`` and ``v_ℓ``, and ``c``.

    exp: ``G_U = Δ(R v_ℓ)``, ``G_V = R·J(R v_ℓ)ᵀ u_ℓ`` (one batched VJP). linear: ``G_U = J v_ℓ``
    (JVP at 0), ``G_V = Jᵀ u_ℓ`` (VJP at 0). quadratic: ``G_U = D²Δ(0)[v_ℓ, v_ℓ]``,
    ``G_V = D²Δ(0)[u_ℓ; v_ℓ, ·]``. Shapes ``[m, d]``, ``[m, d]``, ``[m]``.
    """
    zero = torch.zeros_like(V)
    if sigma == "exp":
        gu, gv = delta.vjp(radius * V, U)
        return gu, radius * gv, (U * gu).sum(-1)
    if sigma == "linear":
        _, gu = delta.jvp(zero, V)
        _, gv = delta.vjp(zero, U)
        return gu, gv, radius * (U * gu).sum(-1)
    if sigma == "quadratic":
        gu = delta.second_derivative(zero, V)
        gv = delta.second_vjp(zero, V, U)
        return gu, gv, 0.5 * radius ** 2 * (U * gu).sum(-1)
    raise MelboError(f"unknown DCT activation {sigma!r}; allowed: {', '.join(SIGMAS)}")


def causal_importance(delta, U: torch.Tensor, V: torch.Tensor, radius: float, sigma: str = "exp") -> torch.Tensor:
    """``c_ℓ``, the model's ``Σ_k α_k ⟨u_ℓ,u_k⟩ σ(⟨v_k,v_ℓ⟩)`` measured on Δ: ``⟨u_ℓ, Δ(R v_ℓ)⟩``
    (exp), ``R⟨u_ℓ, J v_ℓ⟩`` (linear), ``R²/2·⟨u_ℓ, D²Δ[v_ℓ, v_ℓ]⟩`` (quadratic). ``[m]``."""
    if sigma == "exp":
        return (U * delta(radius * V)).sum(-1)
    if sigma == "linear":
        return radius * (U * delta.jvp(torch.zeros_like(V), V)[1]).sum(-1)
    if sigma == "quadratic":
        return 0.5 * radius ** 2 * (U * delta.second_derivative(torch.zeros_like(V), V)).sum(-1)
    raise MelboError(f"unknown DCT activation {sigma!r}; allowed: {', '.join(SIGMAS)}")


def factor_gram(U: torch.Tensor, V: torch.Tensor, sigma: str = "exp") -> torch.Tensor:
    """``K = (U Uᵀ) ∘ σ(V Vᵀ)`` (rows are factors; METHOD.md section 5). ``[m, m]`` float64."""
    u, v = U.double(), V.double()
    return (u @ u.T) * sigma_fn(sigma)(v @ v.T)


def solve_alpha(U: torch.Tensor, V: torch.Tensor, c: torch.Tensor, sigma: str = "exp") -> torch.Tensor:
    """``α = K⁻¹ c`` (least squares when K is singular, e.g. repeated factors). ``[m]`` float64."""
    K = factor_gram(U, V, sigma)
    cd = c.double().to(K.device)
    try:
        a = torch.linalg.solve(K, cd)
        if torch.isfinite(a).all():
            return a
    except RuntimeError:
        pass
    return torch.linalg.lstsq(K.cpu(), cd.cpu()[:, None], driver="gelsd").solution[:, 0].to(K.device)


def _damped(old: torch.Tensor, grad: torch.Tensor, beta: float) -> torch.Tensor:
    g = normalize_rows(grad)
    return g if beta >= 1.0 else normalize_rows(beta * g + (1.0 - beta) * old)


def _orthogonalize(V: torch.Tensor, how: str, log_norms: torch.Tensor | None, steps: int, temperature: float):
    if how == "qr":
        return qr_orthogonalize(V)
    if how == "soft":
        return soft_orthogonalize(V, log_norms, steps, temperature)
    return V


@dataclass
class DCTConfig:
    """Hyper-parameters of a DCT fit (METHOD.md section 5; reference defaults).

    Attributes:
        num_factors: m (None: 512, or d_model if smaller). QR and the svd init need m <= d_model.
        iterations: τ, orthogonalized gradient iterations (10).
        sigma: ``exp`` (recommended), ``linear`` or ``quadratic``.
        init: ``jacobian`` (v = normalize(Jᵀu), random u), ``svd`` (32-row random projection of
            the Jacobian) or ``random``.
        orthogonalize: ``qr`` (signs fixed), ``soft`` or ``none``.
        beta: damping β in (0, 1] (1: plain update).
        soft_steps, temperature: inner steps and T of soft orthogonalization.
        projection_rows: rows of the random projection of the ``svd`` init (32).
        seed: seed of the random init.
    """

    num_factors: int | None = None
    iterations: int = 10
    sigma: str = "exp"
    init: str = "jacobian"
    orthogonalize: str = "qr"
    beta: float = 1.0
    soft_steps: int = 10
    temperature: float = 1.0
    projection_rows: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_factors is not None and (int(self.num_factors) != self.num_factors or self.num_factors < 1):
            raise MelboError(f"number of DCT factors must be a whole number >= 1, got {self.num_factors!r}")
        if int(self.iterations) != self.iterations or self.iterations < 0:
            raise MelboError(f"DCT iterations must be a whole number >= 0, got {self.iterations!r}")
        if self.sigma not in SIGMAS:
            raise MelboError(f"unknown DCT activation {self.sigma!r}; allowed: {', '.join(SIGMAS)}")
        if self.init not in INITS:
            raise MelboError(f"unknown DCT init {self.init!r}; allowed: {', '.join(INITS)}")
        if self.orthogonalize not in ORTHOGONALIZE:
            raise MelboError(f"unknown orthogonalization {self.orthogonalize!r}; allowed: {', '.join(ORTHOGONALIZE)}")
        try:
            ok = 0 < float(self.beta) <= 1
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise MelboError(f"damping β must be in (0, 1], got {self.beta!r}")
        if int(self.soft_steps) != self.soft_steps or self.soft_steps < 0:
            raise MelboError(f"soft orthogonalization steps must be a whole number >= 0, got {self.soft_steps!r}")
        check_positive("soft orthogonalization temperature", self.temperature)
        if int(self.projection_rows) != self.projection_rows or self.projection_rows < 1:
            raise MelboError(f"projection rows must be a whole number >= 1, got {self.projection_rows!r}")

    def factors_for(self, d_model: int) -> int:
        """m for a model of width ``d_model``.

        Raises:
            MelboError: m > d_model with QR orthogonalization or the svd init.
        """
        m = int(self.num_factors) if self.num_factors is not None else min(DEFAULT_FACTORS, d_model)
        if m > d_model and (self.orthogonalize == "qr" or self.init == "svd"):
            what = "QR orthogonalization" if self.orthogonalize == "qr" else "the svd init"
            raise MelboError(f"{m} factors do not fit {what} in d_model = {d_model} dimensions; allowed: "
                             f"1..{d_model}, or soft orthogonalization with a jacobian/random init")
        return m

    def to_dict(self) -> dict:
        return asdict(self)


def init_factors(delta, num_factors: int, cfg: DCTConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Initial ``(U, V, log_norms)`` (``[m, d]``, ``[m, d]``, ``[m]`` or None) on delta's device.

    ``jacobian``: random unit ``u_ℓ``, ``v_ℓ = normalize(Jᵀu_ℓ)`` (one batched VJP at 0;
    ``log_norms = log‖Jᵀu_ℓ‖``). ``svd``: random ``W [rows, d]``, ``P = W J`` (``rows`` VJPs),
    ``V`` = the first m right singular vectors of ``P`` (beyond ``rows`` they complete an
    orthonormal basis), ``U = normalize(J V)`` (JVPs). ``random``: Gaussian unit U and V.
    """
    d, m, dev = delta.d_model, num_factors, delta.device
    dt = getattr(delta, "dtype", torch.float32)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 31_337)

    def gauss(rows):
        return normalize_rows(torch.randn(rows, d, generator=g, dtype=torch.float64)).to(dev, dt)

    if cfg.init == "random":
        return gauss(m), gauss(m), None
    if cfg.init == "jacobian":
        U = gauss(m)
        _, jtu = delta.vjp(torch.zeros_like(U), U)
        norms = jtu.norm(dim=-1)
        if not (norms > 0).all():
            raise MelboError("Jᵀu is zero for a random u: Δ does not depend on θ at first order "
                             "(is the target layer after the source layer?)")
        return U, normalize_rows(jtu), norms.log()
    if cfg.init == "svd":
        rows = int(cfg.projection_rows)
        W = torch.randn(rows, d, generator=g, dtype=torch.float64).to(dev, dt)
        _, P = delta.vjp(torch.zeros_like(W), W)                 # rows of W J
        _, _, vh = torch.linalg.svd(P.double().cpu(), full_matrices=True)
        V = vh[:m].to(dev, dt)
        _, jv = delta.jvp(torch.zeros_like(V), V)
        return normalize_rows(jv), V, None
    raise MelboError(f"unknown DCT init {cfg.init!r}; allowed: {', '.join(INITS)}")


@dataclass
class DCTResult:
    """A fitted DCT, factors ranked (best first).

    Attributes:
        vectors: ``[m, d]`` float32 steering vectors ``R·v_ℓ`` (norm R), ranked.
        V: ``[m, d]`` unit input directions, ranked. U: ``[m, d]`` unit output directions, ranked.
        alpha: ``[m]`` α = K⁻¹c (activation units at scale R), ranked.
        causal: ``[m]`` c_ℓ, the causal importance, ranked.
        score: ``[m]`` the ranking score (α², or the readout), descending.
        order: ``[m]`` long, the fit's factor index of each ranked factor.
        start_V: ``[m, d]`` the initial V, ranked.
        radius: R. sigma: the activation. config: the DCTConfig as a dict.
        history: mean c_ℓ at the start of each iteration (at the orthogonalized V).
        mean_abs_cos: mean |cos| between the final V's rows.
        calibration: the :class:`melbo.calibrate.Calibration` when R was calibrated, else None.
        seconds: fitting time (initialization, iterations, ranking), without calibration.
    """

    vectors: torch.Tensor
    V: torch.Tensor
    U: torch.Tensor
    alpha: torch.Tensor
    causal: torch.Tensor
    score: torch.Tensor
    order: torch.Tensor
    start_V: torch.Tensor
    radius: float
    sigma: str
    config: dict
    history: list[float] = field(default_factory=list)
    mean_abs_cos: float = 0.0
    calibration: Calibration | None = None
    seconds: float = 0.0

    def __len__(self) -> int:
        return self.vectors.shape[0]


def rank_factors(U: torch.Tensor, V: torch.Tensor, alpha: torch.Tensor, radius: float,
                 readout: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, score)``: the factors sorted by α² (default; noisy at the top, METHOD.md), or by
    ``readout(R·V)`` (``[m, d]`` steering vectors -> ``[m]`` scores, higher is better, e.g. a
    logit difference: :func:`logit_readout`), best first.

    Raises:
        MelboError: the readout's output is not ``[m]``.
    """
    if readout is None:
        score = alpha.double() ** 2
    else:
        score = torch.as_tensor(readout(radius * V.detach().float())).double().flatten()
        if score.shape[0] != V.shape[0]:
            raise MelboError(f"the readout returned {tuple(score.shape)} scores for {V.shape[0]} vectors; "
                             f"it must return one score per vector")
    score = score.cpu()
    order = torch.argsort(-score, stable=True)
    return order, score[order]


def fit_dct(delta, radius: float | None = None, *, config: DCTConfig | None = None,
            start: tuple[torch.Tensor, torch.Tensor] | None = None,
            readout: Callable[[torch.Tensor], torch.Tensor] | None = None,
            lam: float = 0.5, calibration_directions: int = 30, bracket: tuple[float, float] = (1e-3, 100.0),
            show_progress: bool = False, **overrides) -> DCTResult:
    """Fit a DCT to Δ by orthogonalized gradient iteration and rank its factors (METHOD.md section 5).

    Args:
        delta: a :class:`DeltaMap` (``DeltaMap.from_model(lm, prompts, src, tgt)``) or any
            :class:`FunctionDelta`.
        radius: R (residual-stream units); None calibrates it (:func:`melbo.calibrate.calibrate_radius`
            with ``lam``, ``calibration_directions``, ``bracket``).
        config: a :class:`DCTConfig`; keyword ``overrides`` (``num_factors=64``, ``sigma="linear"``,
            ``init="svd"``, ``orthogonalize="soft"``, ``beta=0.5``, ...) replace its fields.
        start: explicit initial ``(U0, V0)`` (``[m, d]`` each) instead of ``config.init``.
        readout: rank by ``readout(vectors [m, d]) -> [m]`` (higher first) instead of α².
        show_progress: a tqdm bar over the iterations.

    Returns:
        a :class:`DCTResult`: ``vectors`` (R·v, ranked), ``alpha``, ``radius``, ...

    Raises:
        MelboError: bad hyper-parameters; ``CalibrationError`` when R is calibrated and no root exists.
    """
    cfg = config or DCTConfig()
    if overrides:
        cfg = DCTConfig(**{**asdict(cfg), **overrides})
    d = delta.d_model
    if start is not None:
        U0, V0 = (torch.as_tensor(x).to(delta.device, getattr(delta, "dtype", torch.float32)) for x in start)
        if U0.shape != V0.shape or U0.dim() != 2 or U0.shape[1] != d:
            raise MelboError(f"start (U, V) must be two [m, {d}] tensors, got {tuple(U0.shape)} and {tuple(V0.shape)}")
        cfg = DCTConfig(**{**asdict(cfg), "num_factors": U0.shape[0]})
    m = cfg.factors_for(d)
    calibration = None
    if radius is None:
        calibration = calibrate_radius(delta, lam, calibration_directions, bracket, cfg.seed)
        radius = calibration.radius
    check_positive("radius R", radius)
    radius = float(radius)

    t0 = time.perf_counter()
    if start is not None:
        U, V, log_norms = normalize_rows(U0), normalize_rows(V0), None
    else:
        U, V, log_norms = init_factors(delta, m, cfg)
    start_V = V.clone()
    history = []
    for _ in tqdm(range(cfg.iterations), desc=f"DCT ({cfg.sigma}, {m} factors)", unit="iter",
                  disable=not show_progress, dynamic_ncols=True):
        Vo = _orthogonalize(V, cfg.orthogonalize, log_norms, cfg.soft_steps, cfg.temperature)
        gu, gv, c = gradients(delta, U, Vo, radius, cfg.sigma)
        history.append(float(c.mean()))
        log_norms = gv.norm(dim=-1).clamp(min=1e-30).log()
        U = _damped(U, gu, cfg.beta)
        V = _damped(Vo, gv, cfg.beta)
    c = causal_importance(delta, U, V, radius, cfg.sigma)
    alpha = solve_alpha(U, V, c, cfg.sigma)
    order, score = rank_factors(U, V, alpha, radius, readout)
    dev_order = order.to(V.device)
    Vr = V[dev_order].float().cpu()
    return DCTResult(
        vectors=(radius * Vr).float(), V=Vr, U=U[dev_order].float().cpu(), alpha=alpha[dev_order].float().cpu(),
        causal=c[dev_order].float().cpu(), score=score.float(), order=order, start_V=start_V[dev_order].float().cpu(),
        radius=radius, sigma=cfg.sigma, config=cfg.to_dict(), history=history, mean_abs_cos=mean_abs_cos(V),
        calibration=calibration, seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------- a readout: steered logit difference

def logit_readout(lm, prompts: list[str], layer: int, plus: list[int] | int, minus: list[int] | int | None = None,
                  chat: bool = False, batch_size: int = 64) -> Callable[[torch.Tensor], torch.Tensor]:
    """A readout for :func:`rank_factors`: for vectors ``[k, d]``, the mean over prompts of the
    next-token logit of ``plus`` minus that of ``minus`` (each token list averaged) at the last
    prompt token, with the vector added after block ``layer``. ``[k]`` float32.

    Raises:
        MelboError: no prompts, an empty token list.
    """
    from melbo.steer import steer

    batch = encode_prompts(lm.tokenizer, prompts, "last:1", chat)
    plus_ids = [plus] if isinstance(plus, int) else list(plus)
    minus_ids = [] if minus is None else ([minus] if isinstance(minus, int) else list(minus))
    if not plus_ids:
        raise MelboError("the logit readout needs at least one token id to raise")
    lengths = batch.attention_mask.sum(1) - 1
    n = len(batch)

    def readout(vectors: torch.Tensor) -> torch.Tensor:
        k = vectors.shape[0]
        scores = torch.zeros(k)
        per = max(1, batch_size // n)
        for s in range(0, k, per):
            vec = vectors[s:s + per].to(lm.device)
            kk = vec.shape[0]
            ids = batch.input_ids.repeat(kk, 1).to(lm.device)
            att = batch.attention_mask.repeat(kk, 1).to(lm.device)
            rows = vec.repeat_interleave(n, dim=0)
            with torch.no_grad(), steer(lm.blocks, layer, rows):
                logits = lm.model(input_ids=ids, attention_mask=att, use_cache=False).logits.float()
            last = logits[torch.arange(kk * n), lengths.repeat(kk).to(lm.device)]
            diff = last[:, plus_ids].mean(-1)
            if minus_ids:
                diff = diff - last[:, minus_ids].mean(-1)
            scores[s:s + kk] = diff.reshape(kk, n).mean(-1).cpu()
        return scores

    return readout


# ---------------------------------------------------------------- the `melbo train --method dct` run

def dct_options_from_spec(spec) -> DCTConfig:
    """The :class:`DCTConfig` of a :class:`melbo.run.RunSpec` (``spec.dct_options`` and seed)."""
    opts = dict(getattr(spec, "dct_options", None) or {})
    opts.setdefault("seed", spec.seed)
    unknown = set(opts) - set(DCTConfig.__dataclass_fields__)
    if unknown:
        raise MelboError(f"unknown DCT options {sorted(unknown)}; allowed: {', '.join(DCTConfig.__dataclass_fields__)}")
    return DCTConfig(**opts)


def is_auto(radius) -> bool:
    """Whether a radius spec asks for calibration (``"auto"``)."""
    return str(radius).strip().lower() == "auto"


def auto_radius(lm, batch: PromptBatch, src: int, tgt: int, writes_only: bool, lam: float = 0.5,
                seed: int = 0) -> Calibration:
    """Calibrate R for a run on ``batch`` (``--radius auto``; METHOD.md section 5). Builds Δ with
    eager attention on the same prompts, positions and layers as the run.

    Raises:
        CalibrationError: no root in [0.001, 100].
    """
    delta = DeltaMap.from_batch(lm.model, lm.blocks, batch, src, tgt, writes_only)
    return calibrate_radius(delta, lam=lam, seed=seed)


def run_dct(spec, lm=None) -> dict:
    """``melbo train --method dct``: fit a DCT and write the run folder like a MELBO run.

    ``bank.safetensors`` holds all m factors' steering vectors ``R·v`` ranked (best first), the
    random baseline (m unit-random orthogonalized directions at the same R), the output
    directions ``u`` and the starts; metadata has method ``dct``, R, λ, the calibration, α and
    c per vector. Completions (``completions.jsonl``) and ``summary.md`` cover the top
    ``spec.num_vectors`` factors and as many random vectors. ``melbo generate`` reads the bank
    unchanged. Returns the summary dict (as :func:`melbo.run.run_train`).

    Raises:
        MelboError: bad input (checked before anything is written); ``--resume`` (a DCT run is
            one fit, not resumable).
    """
    from melbo.bank import Bank, model_meta, save_bank
    from melbo.models import check_layers, default_layers, load_model
    from melbo.prompts import check_prompts
    from melbo.run import BANK, SUMMARY, _check_out, evaluate_run, parse_radius
    from melbo.train import random_vectors

    check_prompts(spec.prompts)
    for p in spec.heldout:
        check_prompts([p])
    positions = parse_positions(spec.positions)
    auto = is_auto(spec.radius)
    r_value, r_relative = (None, False) if auto else parse_radius(spec.radius)
    lam = float(getattr(spec, "calibration_lambda", 0.5))
    check_positive("calibration ratio λ", lam)
    cfg = dct_options_from_spec(spec)
    if int(spec.num_vectors) != spec.num_vectors or spec.num_vectors < 1:
        raise MelboError(f"number of vectors must be a whole number >= 1, got {spec.num_vectors!r}")
    if spec.resume:
        raise MelboError("--resume is for MELBO runs; a DCT run is a single fit: start a new run in another --out")
    out = Path(spec.out)
    _check_out(out, False)

    lm = lm or load_model(spec.model, spec.device, spec.dtype, spec.blocks_path)
    L = lm.num_layers
    d_src, d_tgt = default_layers(L)
    src, tgt = check_layers(d_src if spec.source_layer is None else spec.source_layer,
                            d_tgt if spec.target_layer is None else spec.target_layer, L)
    m = cfg.factors_for(lm.d_model)
    batch = encode_prompts(lm.tokenizer, spec.prompts, positions, spec.generation.chat)
    writes_only = bool(getattr(spec, "writes_only", False))
    delta = DeltaMap.from_batch(lm.model, lm.blocks, batch, src, tgt, writes_only)
    residual_norm = delta.residual_norm()
    calibration = None
    if auto:
        calibration = calibrate_radius(delta, lam=lam, seed=spec.seed)
        radius = calibration.radius
    else:
        radius = r_value * residual_norm if r_relative else r_value

    res = fit_dct(delta, radius, config=cfg, show_progress=spec.show_progress)
    k = min(int(spec.num_vectors), m)
    rand = random_vectors(m, lm.d_model, radius, spec.seed)
    objective = delta(res.vectors.to(delta.device)).norm(dim=-1).cpu()
    rand_objective = delta(rand[:k].to(delta.device)).norm(dim=-1).cpu()
    cos = torch.nn.functional.cosine_similarity(res.V.double(), res.start_V.double(), dim=-1)
    meta = {
        **model_meta(lm), "method": "dct", "kind": "vector",
        "source_layer": src, "target_layer": tgt, "radius": radius, "radius_spec": str(spec.radius),
        "residual_norm": residual_norm, "lambda": lam if auto else None,
        "calibration": calibration.to_dict() if calibration else None,
        "writes_only": writes_only, "positions": str(positions), "prompts": list(spec.prompts),
        "chat": spec.generation.chat, "seed": spec.seed, "dct": cfg.to_dict(), "num_factors": m,
        "sigma": cfg.sigma, "iterations": cfg.iterations, "history": res.history,
        "mean_abs_cos_V": res.mean_abs_cos, "fit_seconds": res.seconds,
        "calibration_seconds": calibration.seconds if calibration else None,
        "ranking": "alpha^2",
        "vectors": [
            {"index": i, "factor": int(res.order[i]), "alpha": float(res.alpha[i]), "causal_importance":
             float(res.causal[i]), "score": float(res.score[i]), "objective": float(objective[i]),
             "cosine_start_end": float(cos[i])}
            for i in range(m)
        ],
        "objective_definition": "‖Δ(R v)‖ (mean over prompts and positions of the target-layer change)",
        "random_objectives": rand_objective.tolist(),
    }
    out.mkdir(parents=True, exist_ok=True)
    extra = {"random_vectors": rand, "u_directions": res.U, "start_vectors": radius * res.start_V}
    save_bank(out / BANK, Bank(res.vectors, meta, extra))

    eval_meta = {**meta, "vectors": meta["vectors"][:k]}
    summary = evaluate_run(lm, out, res.vectors[:k], rand[:k], eval_meta, spec.heldout, spec.generation)
    summary.update({"method": "dct", "num_factors": m, "evaluated": k, "fit_seconds": res.seconds,
                    "calibration_seconds": meta["calibration_seconds"], "lambda": meta["lambda"],
                    "seconds_per_step": None, "seconds_per_vector": None, "writes_only": writes_only})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_dct_summary_md(out / SUMMARY, meta, summary, calibration)
    return summary


def write_dct_summary_md(path: str | os.PathLike, meta: dict, summary: dict,
                         calibration: Calibration | None = None) -> Path:
    """Write ``summary.md`` of a DCT run: settings, learned-versus-random table, calibration
    curve, and per ranked vector α, c, ‖Δ(Rv)‖ and the completion beside the unsteered one."""
    from melbo.report import prompt_sections

    path = Path(path)
    L, R = summary["learned"], summary["random"]
    cal = (f"calibrated with λ = {meta['lambda']:g} ({calibration.num_directions} random directions, ratio "
           f"{calibration.ratio:.4g} at R, {calibration.seconds:.2f} s)" if calibration else meta["radius_spec"])
    lines = [
        f"# melbo run (deep causal transcoding): {meta['model']}",
        "",
        f"Source layer {meta['source_layer']} → target layer {meta['target_layer']} of {meta['num_layers']}; "
        f"R = {meta['radius']:.4g} ({cal}; mean residual norm at the source {meta['residual_norm']:.4g}); "
        f"σ = {meta['sigma']}, {meta['num_factors']} factors, τ = {meta['iterations']}, init {meta['dct']['init']}, "
        f"orthogonalization {meta['dct']['orthogonalize']}, β = {meta['dct']['beta']}; positions {meta['positions']}; "
        f"{'only the blocks’ writes (Δ(θ) − θ)' if meta['writes_only'] else 'residual path kept'}; seed {meta['seed']}.",
        f"Fit: {meta['fit_seconds']:.2f} s. Factors ranked by α² (α = K⁻¹c); the top {summary['evaluated']} "
        f"are evaluated below.",
        "",
        "| | vectors | change the greedy completion of a training prompt | mean ‖Δ(Rv)‖ | mean similarity to unsteered |",
        "|---|---|---|---|---|",
        f"| DCT (top {L['n']}) | {L['n']} | {L['changed_train']} | {L['mean_objective']:.4g} | {L['mean_similarity_train']:.3f} |",
        f"| random (same R) | {R['n']} | {R['changed_train']} | {R['mean_objective']:.4g} | {R['mean_similarity_train']:.3f} |",
        "",
        f"Mean iteration objective (mean c) per iteration: {', '.join(f'{h:.4g}' for h in meta['history'])}.",
        f"Mean |cos| between the final input directions: {meta['mean_abs_cos_V']:.4f}.",
    ]
    if calibration:
        lines += ["", "Calibration curve (nonlinearity ratio against r):", "", "```",
                  format_curve(calibration.curve, calibration.lam, calibration.radius), "```"]
    columns = [("rank", lambda v, info: str(v)), ("α", lambda v, info: f"{info['alpha']:.4g}"),
               ("c", lambda v, info: f"{info['causal_importance']:.4g}"),
               ("‖Δ(Rv)‖", lambda v, info: f"{info['objective']:.4g}")]
    lines += prompt_sections(meta, summary, columns, summary["evaluated"], random_metric="‖Δ(Rv)‖")
    path.write_text("\n".join(lines) + "\n")
    return path
