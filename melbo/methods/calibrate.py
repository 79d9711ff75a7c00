"""Calibrating the radius R of steering vectors (METHOD.md section 5, "Calibrating R").

For ``k`` random unit directions ``v`` (30 by default) and the Jacobian ``J`` of ``Δ`` at 0
(forward-mode JVPs), the *nonlinearity ratio* at radius ``r`` is

    ratio(r) = sqrt( Σ_v ‖Δ(r v) − r J v‖² / Σ_v ‖r J v‖² )

(the mean over directions is taken of the numerator and of the denominator; with directions of
similar ``‖J v‖`` this equals the mean of the per-direction ratios, and it is not dominated by a
direction that ``J`` nearly kills). ``ratio(r) → 0`` as ``r → 0`` (Δ is linear at 0) and grows
as ``Δ`` turns nonlinear. The calibrated R solves ``ratio(R) = λ`` (λ = 0.5 by default) with
Brent's method (``scipy.optimize.brentq``) on ``[0.001, 100]``: the ratio is first evaluated on
a log-spaced grid over the bracket, and Brent runs between the first two grid points where it
crosses λ from below (the smallest R with ratio λ; the same root as Brent on the whole bracket
when the ratio is monotone). Where the ratio never reaches λ in the bracket (a shallow slice
whose Jacobian is near the identity: measure only the blocks' writes, ``writes_only``), or is
above λ already at its low end (float noise, e.g. bfloat16), :class:`CalibrationError` says so
and carries the ratio curve.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.optimize import brentq

from melbo.core.errors import MelboError
from melbo.core.radius import parse_radius
from melbo.core.sphere import random_directions
from melbo.core.validate import check_int, check_positive
from melbo.methods.delta import DeltaMap

if TYPE_CHECKING:
    from melbo.methods.base import Context


class CalibrationError(MelboError):
    """No radius in the bracket has the asked-for nonlinearity ratio.

    Attributes:
        curve: ``[(r, ratio), ...]`` evaluated over the bracket (log-spaced), for a report.
    """

    def __init__(self, message: str, curve: list[tuple[float, float]]):
        super().__init__(message)
        self.curve = curve


@dataclass
class Calibration:
    """A calibrated radius and how it was found.

    Attributes:
        radius: R with ``ratio(R) = lam`` (residual-stream units).
        lam: the target ratio λ.
        ratio: the ratio at ``radius`` (equals ``lam`` up to Brent's tolerance).
        num_directions: random unit directions used.
        bracket: ``(lo, hi)`` searched.
        curve: ``[(r, ratio(r)), ...]`` on the log-spaced grid and at Brent's evaluations, sorted by r.
        seconds: wall-clock time.
        writes_only: whether Δ measured only the blocks' writes (``Δ(θ) − θ``).
    """

    radius: float
    lam: float
    ratio: float
    num_directions: int
    bracket: tuple[float, float]
    curve: list[tuple[float, float]] = field(default_factory=list)
    seconds: float = 0.0
    writes_only: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bracket"] = list(self.bracket)
        d["curve"] = [[float(r), float(x)] for r, x in self.curve]
        return d


class RatioCurve:
    """``ratio(r)`` of the module docstring for fixed directions ``v`` (``[k, d]``, unit rows).

    ``J v`` is computed once by forward-mode JVPs at θ = 0 (``delta.jvp``); each ``ratio(r)`` is
    one batched evaluation of ``Δ`` on the ``k`` vectors ``r v``.

    Raises:
        MelboError: ``J v`` is zero for every direction (Δ does not depend on θ at first order).
    """

    def __init__(self, delta: Any, directions: torch.Tensor):
        self.delta = delta
        self.v = directions
        _, jv = delta.jvp(torch.zeros_like(directions), directions)
        self.jv = jv.double()
        self.jv_sq = float((self.jv**2).sum())
        if not self.jv_sq > 0:
            raise MelboError(
                "the Jacobian of Δ at 0 is zero along every calibration direction: "
                "steering at the source layer does not change the target layer"
            )
        self.evaluated: dict[float, float] = {}

    def __call__(self, r: float) -> float:
        r = float(r)
        if r not in self.evaluated:
            out = self.delta(self.v * r).double()
            num = float(((out - r * self.jv) ** 2).sum())
            val = math.sqrt(num / (r * r * self.jv_sq))
            self.evaluated[r] = val if math.isfinite(val) else float("inf")
        return self.evaluated[r]

    def curve(self) -> list[tuple[float, float]]:
        return sorted(self.evaluated.items())


def calibrate_radius(
    delta: Any,
    lam: float = 0.5,
    num_directions: int = 30,
    bracket: tuple[float, float] = (1e-3, 100.0),
    seed: int = 0,
    grid_points: int = 21,
    rtol: float = 1e-6,
) -> Calibration:
    """Solve ``ratio(R) = λ`` for R (METHOD.md section 5, "Calibrating R"; module docstring).

    Args:
        delta: a map with ``delta(theta [V, d]) -> [V, d]``, ``delta.jvp`` and ``delta.d_model``
            (a :class:`melbo.methods.delta.DeltaMap` or :class:`melbo.methods.delta.FunctionDelta`).
        lam: target ratio λ > 0 (0.5 in the reference, for depth tgt − src ≈ 10).
        num_directions: random unit directions (30 in the reference).
        bracket: ``(lo, hi)``, 0 < lo < hi, residual-stream units ([0.001, 100] in the reference).
        seed: seed of the directions.
        grid_points: log-spaced points over the bracket evaluated before Brent (>= 2).
        rtol: Brent's relative tolerance on R.

    Returns:
        a :class:`Calibration` (``radius``, the ratio there, the curve).

    Raises:
        MelboError: bad λ, number of directions or bracket.
        CalibrationError: the ratio does not cross λ inside the bracket (its message gives the
            ratio at both ends and what to try; ``.curve`` holds the evaluated curve).
    """
    t0 = time.perf_counter()
    check_positive("calibration ratio λ", lam)
    num_directions = check_int("number of calibration directions", num_directions, 1, 100_000)
    try:
        lo, hi = (float(x) for x in bracket)
    except (TypeError, ValueError):
        raise MelboError(f"bad calibration bracket {bracket!r}; give two numbers 0 < lo < hi, like 0.001,100") from None
    if not (0 < lo < hi and math.isfinite(hi)):
        raise MelboError(f"bad calibration bracket {bracket!r}; give two numbers 0 < lo < hi, like 0.001,100")
    dirs = random_directions(int(num_directions), delta.d_model, seed).to(delta.device)
    ratio = RatioCurve(delta, dirs)
    grid = np.geomspace(lo, hi, max(2, int(grid_points)))
    values = [ratio(r) for r in grid]
    writes_only = bool(getattr(delta, "writes_only", False))
    if values[0] >= lam:
        raise CalibrationError(
            f"the nonlinearity ratio is already {values[0]:.3g} >= λ = {lam:g} at the low end r = {lo:g} of the "
            f"bracket: Δ is not close to linear even there (float noise? use float32), or λ is too small; "
            f"try a smaller lower bound or a larger λ",
            ratio.curve(),
        )
    k = next((i for i, v in enumerate(values) if v >= lam), None)
    if k is None:
        best = max(range(len(values)), key=lambda i: values[i])
        hint = (
            "measure only what the blocks write (writes_only / --writes-only): with the residual path "
            "kept, a shallow slice's Jacobian is near the identity and the ratio stays small"
            if not writes_only
            else "use a deeper slice or a smaller λ"
        )
        if best == len(values) - 1:
            hint = f"the ratio is still rising at r = {hi:g}: try a larger upper bound of the bracket; or " + hint
        raise CalibrationError(
            f"no root in the bracket: the nonlinearity ratio stays below λ = {lam:g} on [{lo:g}, {hi:g}] "
            f"(ratio {values[0]:.3g} at r = {lo:g}, {values[-1]:.3g} at r = {hi:g}, at most {values[best]:.3g} "
            f"at r = {grid[best]:.4g}); {hint}",
            ratio.curve(),
        )
    a, b = float(grid[k - 1]), float(grid[k])
    radius = brentq(lambda r: ratio(r) - lam, a, b, rtol=rtol, xtol=1e-12 * b, maxiter=200)
    return Calibration(
        radius=float(radius),
        lam=float(lam),
        ratio=ratio(radius),
        num_directions=int(num_directions),
        bracket=(lo, hi),
        curve=ratio.curve(),
        seconds=time.perf_counter() - t0,
        writes_only=writes_only,
    )


def format_curve(
    curve: list[tuple[float, float]], lam: float | None = None, radius: float | None = None, max_rows: int = 25
) -> str:
    """A plain-text table of ``(r, ratio)``, thinned to ``max_rows``, marking λ's crossing."""
    rows: list[tuple[float, float]] = []
    for r, x in sorted(curve):  # Brent's evaluations cluster near R: keep one of each
        is_r = radius is not None and math.isclose(r, radius, rel_tol=1e-9)
        if rows and math.isclose(r, rows[-1][0], rel_tol=1e-3) and not is_r:
            continue
        if rows and is_r and math.isclose(r, rows[-1][0], rel_tol=1e-3):
            rows.pop()
        rows.append((r, x))
    if len(rows) > max_rows:
        step = len(rows) / max_rows
        keep = {int(i * step) for i in range(max_rows)} | {len(rows) - 1}
        keep |= {i for i, (r, _) in enumerate(rows) if radius is not None and math.isclose(r, radius, rel_tol=1e-9)}
        rows = [rows[i] for i in sorted(keep)]
    lines = ["         r      ratio"]
    for r, x in rows:
        mark = "  <- R" if radius is not None and math.isclose(r, radius, rel_tol=1e-9) else ""
        lines.append(f"{r:10.4g} {x:10.4g}{mark}")
    if lam is not None:
        lines.append(f"(target λ = {lam:g})")
    return "\n".join(lines)


def resolve_radius(
    spec: str, residual_norm: float, ctx: Context, writes_only: bool, lam: float, seed: int
) -> tuple[float, dict | None]:
    """R of a run from its radius setting: a number, ``"<k>x"`` (k × ``residual_norm``) or
    ``"calibrate"`` (:func:`calibrate_radius` on Δ of the run's prompts, positions and layers).

    Returns:
        ``(R, calibration as a dict or None)``.

    Raises:
        MelboError: ``"auto"`` (the orchestrator resolves it before), or no calibrated root.
    """
    r = parse_radius(spec)
    if r.kind == "auto":
        raise MelboError(
            "radius 'auto' is resolved by melbo.train's sweep before a method runs; give a number, kx or calibrate here"
        )
    if r.kind != "calibrate":
        return r.resolve(residual_norm), None
    delta = DeltaMap.from_batch(ctx.lm.model, ctx.lm.blocks, ctx.batch, ctx.src, ctx.tgt, writes_only)
    cal = calibrate_radius(delta, lam=lam, seed=seed)
    return cal.radius, cal.to_dict()
