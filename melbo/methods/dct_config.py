"""The hyper-parameters of a DCT fit and the initialization of its factors (METHOD.md section 5).

``jacobian``: ``v_ℓ = normalize(Jᵀu_ℓ)`` for random unit ``u_ℓ`` (one batched VJP at 0);
``svd``: the top right singular vectors of a 32-row random projection ``W J`` of the Jacobian,
with ``U = normalize(J V)``; ``random``: Gaussian unit U and V.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from melbo.core.errors import MelboError
from melbo.core.sphere import normalize_rows
from melbo.core.validate import check_choice, check_int, check_number, check_positive

SIGMAS = ("exp", "linear", "quadratic")
INITS = ("jacobian", "svd", "random")
ORTHOGONALIZE = ("qr", "soft", "none")
DEFAULT_FACTORS = 512


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
        if self.num_factors is not None:
            self.num_factors = check_int("number of DCT factors", self.num_factors, 1, 1_000_000)
        self.iterations = check_int("DCT iterations", self.iterations, 0, 100_000)
        check_choice("DCT activation", self.sigma, SIGMAS)
        check_choice("DCT init", self.init, INITS)
        check_choice("orthogonalization", self.orthogonalize, ORTHOGONALIZE)
        self.beta = check_number("damping β", self.beta, 0.0, 1.0, low_open=True)
        self.soft_steps = check_int("soft orthogonalization steps", self.soft_steps, 0, 10_000)
        self.temperature = check_positive("soft orthogonalization temperature", self.temperature)
        self.projection_rows = check_int("projection rows", self.projection_rows, 1, 100_000)

    def factors_for(self, d_model: int) -> int:
        """m for a model of width ``d_model``.

        Raises:
            MelboError: m > d_model with QR orthogonalization or the svd init.
        """
        m = int(self.num_factors) if self.num_factors is not None else min(DEFAULT_FACTORS, d_model)
        if m > d_model and (self.orthogonalize == "qr" or self.init == "svd"):
            what = "QR orthogonalization" if self.orthogonalize == "qr" else "the svd init"
            raise MelboError(
                f"{m} factors do not fit {what} in d_model = {d_model} dimensions; allowed: "
                f"1..{d_model}, or soft orthogonalization with a jacobian/random init"
            )
        return m

    def to_dict(self) -> dict:
        return asdict(self)


def init_factors(
    delta: Any, num_factors: int, cfg: DCTConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Initial ``(U, V, log_norms)`` (``[m, d]``, ``[m, d]``, ``[m]`` or None) on delta's device.

    ``jacobian``: random unit ``u_ℓ``, ``v_ℓ = normalize(Jᵀu_ℓ)`` (one batched VJP at 0;
    ``log_norms = log‖Jᵀu_ℓ‖``). ``svd``: random ``W [rows, d]``, ``P = W J`` (``rows`` VJPs),
    ``V`` = the first m right singular vectors of ``P`` (beyond ``rows`` they complete an
    orthonormal basis), ``U = normalize(J V)`` (JVPs). ``random``: Gaussian unit U and V.
    """
    d, m, dev = delta.d_model, num_factors, delta.device
    dt = getattr(delta, "dtype", torch.float32)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 31_337)

    def gauss(rows: int) -> torch.Tensor:
        return normalize_rows(torch.randn(rows, d, generator=g, dtype=torch.float64)).to(dev, dt)

    if cfg.init == "random":
        return gauss(m), gauss(m), None
    if cfg.init == "jacobian":
        U = gauss(m)
        _, jtu = delta.vjp(torch.zeros_like(U), U)
        norms = jtu.norm(dim=-1)
        if not (norms > 0).all():
            raise MelboError(
                "Jᵀu is zero for a random u: Δ does not depend on θ at first order "
                "(is the target layer after the source layer?)"
            )
        return U, normalize_rows(jtu), norms.log()
    if cfg.init == "svd":
        rows = int(cfg.projection_rows)
        W = torch.randn(rows, d, generator=g, dtype=torch.float64).to(dev, dt)
        _, P = delta.vjp(torch.zeros_like(W), W)  # rows of W J
        _, _, vh = torch.linalg.svd(P.double().cpu(), full_matrices=True)
        V = vh[:m].to(dev, dt)
        _, jv = delta.jvp(torch.zeros_like(V), V)
        return normalize_rows(jv), V, None
    raise MelboError(f"unknown DCT init {cfg.init!r}; allowed: {', '.join(INITS)}")
