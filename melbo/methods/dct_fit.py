"""Deep causal transcoding (DCT): hundreds of steering vectors at once (METHOD.md section 5).

The slice ``f`` maps ``h_src`` to ``h_tgt`` (blocks ``src+1..tgt``). For prompts ``x_i`` with
cached ``y_i = f(x_i)`` and positions ``I_i`` (the last 3 tokens by default; padding never counts),

    Δ(θ) = mean_i mean_{t∈I_i} [f(x_i + θ) − y_i]_t                      (one d_model vector)

with θ added at every position (``writes_only``: ``Δ(θ) − θ``, only what the blocks write,
METHOD.md "The residual path"). DCT models ``Δ(R·θ) ≈ Σ_ℓ α_ℓ σ(⟨v_ℓ, θ⟩) u_ℓ`` with unit
``u_ℓ, v_ℓ`` and σ(x) = e^x − 1 (exponential, the default), x (linear) or x² (quadratic); the
steering vectors are ``R·v_ℓ``.

Everything works on *rows*: ``U``, ``V`` are ``[m, d_model]`` (factor ℓ is row ℓ); Δ and its
Jacobian products come from :mod:`melbo.methods.delta`.

Fitting (:func:`fit_dct`, orthogonalized gradient iteration): initialize ``V`` (``jacobian``:
``v_ℓ = normalize(Jᵀu_ℓ)`` for random unit ``u_ℓ``; ``svd``: the top right singular vectors of
a 32-row random projection ``W J`` of the Jacobian, with ``U = normalize(J V)``; or ``random``),
then τ = 10 iterations of

    V ← orthogonalize(V)                  (QR with diag(R) > 0, or soft orthogonalization)
    G_U = Δ(R v_ℓ),  G_V = ∇_v ⟨u_ℓ, Δ(R v)⟩|_{v=v_ℓ}          (exp; one batched VJP)
    U ← normalize(β·normalize(G_U) + (1 − β)·U),  V ← normalize(β·normalize(G_V) + (1 − β)·V)

(β = 1: no damping). Linear: ``G_U = J v``, ``G_V = Jᵀu``; quadratic: ``G_U = D²Δ[v, v]``,
``G_V = D²Δ[u; v, ·]``, all at θ = 0.

**The final V.** The last update leaves ``V = normalize(G_V)``, which is not orthogonal (mean
|cos| 0.20 between factors on stories260k, one pair at 0.92): a benchmark would count one
direction twice. melbo therefore orthogonalizes once more after the last iteration (as every
iteration starts by doing, METHOD.md section 5) and sets ``U = normalize(G_U)`` at that final V,
so the saved factors are orthonormal (QR) and each u matches its v.

Ranking: ``α = K⁻¹c`` with ``K = (UᵀU) ∘ σ(VᵀV)`` (elementwise) and ``c_ℓ = ⟨u_ℓ, Δ(R v_ℓ)⟩``
(exp; ``R⟨u, Jv⟩`` linear, ``R²/2·⟨u, D²Δ[v,v]⟩`` quadratic, so α is in activation units at
scale R for every σ); factors are ranked by α² (or by a user readout). With V orthonormal,
``VᵀV = I``, K is diagonal and α only reorders by c.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from melbo.core.errors import MelboError
from melbo.core.sphere import mean_abs_cos, normalize_rows, qr_orthogonalize, soft_orthogonalize
from melbo.core.validate import check_positive
from melbo.methods.calibrate import Calibration, calibrate_radius
from melbo.methods.dct_config import SIGMAS, DCTConfig, init_factors

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


def importance_from(U: torch.Tensor, gu: torch.Tensor, radius: float, sigma: str = "exp") -> torch.Tensor:
    """``c_ℓ`` from ``G_U`` (:func:`output_gradient`): ``⟨u_ℓ, G_U,ℓ⟩`` times 1 (exp), R (linear)
    or R²/2 (quadratic), so that c is in activation units at scale R for every σ. ``[m]``."""
    factor = {"exp": 1.0, "linear": radius, "quadratic": 0.5 * radius**2}.get(sigma)
    if factor is None:
        raise MelboError(f"unknown DCT activation {sigma!r}; allowed: {', '.join(SIGMAS)}")
    return factor * (U * gu).sum(-1)


def gradients(
    delta: Any, U: torch.Tensor, V: torch.Tensor, radius: float, sigma: str = "exp"
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
        gv = radius * gv
    elif sigma == "linear":
        _, gu = delta.jvp(zero, V)
        _, gv = delta.vjp(zero, U)
    elif sigma == "quadratic":
        gu = delta.second_derivative(zero, V)
        gv = delta.second_vjp(zero, V, U)
    else:
        raise MelboError(f"unknown DCT activation {sigma!r}; allowed: {', '.join(SIGMAS)}")
    return gu, gv, importance_from(U, gu, radius, sigma)


def output_gradient(delta: Any, V: torch.Tensor, radius: float, sigma: str = "exp") -> torch.Tensor:
    """``G_U`` alone (no VJP): ``Δ(R v_ℓ)`` (exp), ``J v_ℓ`` (linear) or ``D²Δ(0)[v_ℓ, v_ℓ]``
    (quadratic). ``[m, d]``."""
    if sigma == "exp":
        return delta(radius * V)
    if sigma == "linear":
        return delta.jvp(torch.zeros_like(V), V)[1]
    if sigma == "quadratic":
        return delta.second_derivative(torch.zeros_like(V), V)
    raise MelboError(f"unknown DCT activation {sigma!r}; allowed: {', '.join(SIGMAS)}")


def causal_importance(delta: Any, U: torch.Tensor, V: torch.Tensor, radius: float, sigma: str = "exp") -> torch.Tensor:
    """``c_ℓ``, the model's ``Σ_k α_k ⟨u_ℓ,u_k⟩ σ(⟨v_k,v_ℓ⟩)`` measured on Δ: ``⟨u_ℓ, Δ(R v_ℓ)⟩``
    (exp), ``R⟨u_ℓ, J v_ℓ⟩`` (linear), ``R²/2·⟨u_ℓ, D²Δ[v_ℓ, v_ℓ]⟩`` (quadratic). ``[m]``."""
    return importance_from(U, output_gradient(delta, V, radius, sigma), radius, sigma)


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


def _orthogonalize(
    V: torch.Tensor, how: str, log_norms: torch.Tensor | None, steps: int, temperature: float
) -> torch.Tensor:
    if how == "qr":
        return qr_orthogonalize(V)
    if how == "soft":
        return soft_orthogonalize(V, log_norms, steps, temperature)
    return V


@dataclass
class DCTState:
    """A DCT fit between iterations (to checkpoint and resume): ``U``, ``V`` ``[m, d]``, the
    ``log_norms`` ``[m]`` of the last ``G_V`` (or None), the initial ``start_V``, the ``history``
    of mean c and the number of iterations done."""

    U: torch.Tensor
    V: torch.Tensor
    log_norms: torch.Tensor | None
    start_V: torch.Tensor
    history: list[float]
    iteration: int


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
        calibration: the :class:`melbo.methods.calibrate.Calibration` when R was calibrated, else None.
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


def rank_factors(
    U: torch.Tensor,
    V: torch.Tensor,
    alpha: torch.Tensor,
    radius: float,
    readout: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
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
            raise MelboError(
                f"the readout returned {tuple(score.shape)} scores for {V.shape[0]} vectors; "
                f"it must return one score per vector"
            )
    score = score.cpu()
    order = torch.argsort(-score, stable=True)
    return order, score[order]


def fit_dct(
    delta: Any,
    radius: float | None = None,
    *,
    config: DCTConfig | None = None,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
    readout: Callable[[torch.Tensor], torch.Tensor] | None = None,
    lam: float = 0.5,
    calibration_directions: int = 30,
    bracket: tuple[float, float] = (1e-3, 100.0),
    show_progress: bool = False,
    state: DCTState | None = None,
    on_iteration: Callable[[DCTState], None] | None = None,
    **overrides: Any,
) -> DCTResult:
    """Fit a DCT to Δ by orthogonalized gradient iteration and rank its factors (METHOD.md section 5).

    Args:
        delta: a :class:`DeltaMap` (``DeltaMap.from_model(lm, prompts, src, tgt)``) or any
            :class:`FunctionDelta`.
        radius: R (residual-stream units); None calibrates it (:func:`melbo.methods.calibrate.calibrate_radius`
            with ``lam``, ``calibration_directions``, ``bracket``).
        config: a :class:`DCTConfig`; keyword ``overrides`` (``num_factors=64``, ``sigma="linear"``,
            ``init="svd"``, ``orthogonalize="soft"``, ``beta=0.5``, ...) replace its fields.
        start: explicit initial ``(U0, V0)`` (``[m, d]`` each) instead of ``config.init``.
        readout: rank by ``readout(vectors [m, d]) -> [m]`` (higher first) instead of α².
        show_progress: a tqdm bar over the iterations.
        state: continue a fit from this :class:`DCTState` (a checkpoint of the same settings): the
            result equals the uninterrupted fit's.
        on_iteration: called with the state after every iteration (to checkpoint it).

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
    if state is not None:
        dev, dt = delta.device, getattr(delta, "dtype", torch.float32)
        U, V, start_V = (x.to(dev, dt) for x in (state.U, state.V, state.start_V))
        log_norms = None if state.log_norms is None else state.log_norms.to(dev, dt)
        history, done = list(state.history), state.iteration
    else:
        if start is not None:
            U, V, log_norms = normalize_rows(U0), normalize_rows(V0), None
        else:
            U, V, log_norms = init_factors(delta, m, cfg)
        start_V, history, done = V.clone(), [], 0
    for it in tqdm(
        range(done, cfg.iterations),
        desc=f"DCT ({cfg.sigma}, {m} factors)",
        unit="iter",
        disable=not show_progress,
        dynamic_ncols=True,
    ):
        Vo = _orthogonalize(V, cfg.orthogonalize, log_norms, cfg.soft_steps, cfg.temperature)
        gu, gv, c = gradients(delta, U, Vo, radius, cfg.sigma)
        history.append(float(c.mean()))
        log_norms = gv.norm(dim=-1).clamp(min=1e-30).log()
        U = _damped(U, gu, cfg.beta)
        V = _damped(Vo, gv, cfg.beta)
        if on_iteration is not None:
            on_iteration(
                DCTState(
                    U.detach().cpu(), V.detach().cpu(), log_norms.detach().cpu(), start_V.cpu(), list(history), it + 1
                )
            )
    V = _orthogonalize(V, cfg.orthogonalize, log_norms, cfg.soft_steps, cfg.temperature)
    gu = output_gradient(delta, V, radius, cfg.sigma)
    U = normalize_rows(gu)
    c = importance_from(U, gu, radius, cfg.sigma)
    alpha = solve_alpha(U, V, c, cfg.sigma)
    order, score = rank_factors(U, V, alpha, radius, readout)
    dev_order = order.to(V.device)
    Vr = V[dev_order].float().cpu()
    return DCTResult(
        vectors=(radius * Vr).float(),
        V=Vr,
        U=U[dev_order].float().cpu(),
        alpha=alpha[dev_order].float().cpu(),
        causal=c[dev_order].float().cpu(),
        score=score.float(),
        order=order,
        start_V=start_V[dev_order].float().cpu(),
        radius=radius,
        sigma=cfg.sigma,
        config=cfg.to_dict(),
        history=history,
        mean_abs_cos=mean_abs_cos(V),
        calibration=calibration,
        seconds=time.perf_counter() - t0,
    )
