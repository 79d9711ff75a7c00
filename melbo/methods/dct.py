"""Deep causal transcoding as a melbo method (METHOD.md section 5): all ``m`` factors fitted at once
by :func:`melbo.methods.dct_fit.fit_dct`, the steering vectors ``R·v_ℓ`` ranked by α² (best
first). The bank holds every factor; the orchestrator evaluates the top ``num_vectors``.

The objective reported per vector is ``‖Δ(R v)‖``, the norm of the mean change of the target
layer's activations (MELBO's objective with p = 2, q = 1, except that Δ averages over prompts and
positions first; METHOD.md section 5, "Relation to MELBO").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from melbo.core.radius import parse_radius
from melbo.core.sphere import RANDOM_STREAM, random_vectors
from melbo.core.validate import check_choice, check_positive
from melbo.methods.base import Checkpoint, CommonSettings, Context, Fit, perturbations
from melbo.methods.calibrate import calibrate_radius
from melbo.methods.dct_config import DCTConfig
from melbo.methods.dct_fit import DCTState, fit_dct
from melbo.methods.delta import DeltaMap


@dataclass
class DCTSettings(CommonSettings):
    """Settings of a DCT run (METHOD.md section 5).

    Attributes:
        radius: R: a number, ``"<k>x"``, or ``"calibrate"`` (the nonlinearity ratio is ``lam``).
        factors: m (None: min(512, d_model)). iterations: τ. sigma: ``exp``, ``linear``, ``quadratic``.
        init: ``jacobian``, ``svd`` or ``random``. orthogonalize: ``qr`` or ``soft``. beta: damping.
        lam: λ of the calibration. writes_only: Δ measures only what the blocks write.
    """

    radius: str
    factors: int | None
    iterations: int
    sigma: str
    init: str
    orthogonalize: str
    beta: float
    lam: float
    writes_only: bool

    def check(self) -> None:
        super().check()
        self.radius = str(parse_radius(self.radius))
        check_choice("orthogonalization", self.orthogonalize, ("qr", "soft"))  # "none" is for fit_dct experiments
        self.config()
        self.lam = check_positive("calibration ratio λ", self.lam)
        self.writes_only = bool(self.writes_only)

    def check_model(self, d_model: int) -> None:
        self.config().factors_for(d_model)

    def config(self) -> DCTConfig:
        """The fit's :class:`DCTConfig` (validated)."""
        return DCTConfig(
            num_factors=self.factors,
            iterations=self.iterations,
            sigma=self.sigma,
            init=self.init,
            orthogonalize=self.orthogonalize,
            beta=self.beta,
            seed=self.seed,
        )


class DCTMethod:
    """Exponential (or linear, quadratic) DCT, one fit (module docstring)."""

    name: ClassVar[str] = "dct"
    kind: ClassVar[str] = "vector"
    settings_class: ClassVar[type] = DCTSettings
    resumable: ClassVar[bool] = True

    def __init__(self, ctx: Context):
        self.ctx, s = ctx, ctx.settings
        lm = ctx.lm
        self.delta = DeltaMap.from_batch(lm.model, lm.blocks, ctx.batch, ctx.src, ctx.tgt, s.writes_only)
        self.residual_norm = self.delta.residual_norm()
        self.cfg = s.config()
        self.num_factors = self.cfg.factors_for(lm.d_model)
        r = parse_radius(s.radius)
        calibration = None
        if r.kind == "calibrate":
            cal = calibrate_radius(self.delta, lam=s.lam, seed=s.seed)
            self.radius, calibration = cal.radius, cal.to_dict()
        else:
            self.radius = r.resolve(self.residual_norm)
        self.meta = {
            "radius": self.radius,
            "residual_norm": self.residual_norm,
            "calibration": calibration,
            "num_factors": self.num_factors,
            "dct": self.cfg.to_dict(),
            "ranking": "alpha^2",
            "objective_definition": "‖Δ(R v)‖ (mean over prompts and positions of the target-layer change)",
        }

    def fit(self, resume: Fit | None, checkpoint: Checkpoint | None) -> Fit:
        """The fit, checkpointed after every iteration; ``resume`` continues one (or returns a
        finished one as it is)."""
        state = None
        if resume is not None and "dct_V" in resume.tensors:
            t = resume.tensors
            state = DCTState(
                t["dct_U"],
                t["dct_V"],
                t.get("dct_log_norms"),
                t["dct_start_V"],
                [float(x) for x in t["dct_history"].flatten()],
                int(t["dct_iteration"].item()),
            )
        elif resume is not None and len(resume):
            return resume

        def save(st: DCTState) -> None:
            if checkpoint is None:
                return
            tensors = {
                "vectors": self.radius * st.V,
                "dct_U": st.U,
                "dct_V": st.V,
                "dct_start_V": st.start_V,
                "dct_history": torch.tensor([st.history]),
                "dct_iteration": torch.tensor([[float(st.iteration)]]),
            }
            if st.log_norms is not None:
                tensors["dct_log_norms"] = st.log_norms[None]
            checkpoint(Fit(tensors, []))

        if state is not None and state.log_norms is not None:
            state.log_norms = state.log_norms.flatten()
        res = fit_dct(
            self.delta,
            self.radius,
            config=self.cfg,
            show_progress=self.ctx.show_progress,
            state=state,
            on_iteration=save,
        )
        objective = self.objectives({"vectors": res.vectors})
        cos = torch.nn.functional.cosine_similarity(res.V.double(), res.start_V.double(), dim=-1)
        info = [
            {
                "factor": int(res.order[i]),
                "alpha": float(res.alpha[i]),
                "causal_importance": float(res.causal[i]),
                "score": float(res.score[i]),
                "objective": objective[i],
                "cosine_start_end": float(cos[i]),
            }
            for i in range(len(res))
        ]
        self.meta.update(
            {
                "history": res.history,
                "mean_abs_cos_V": res.mean_abs_cos,
                "fit_seconds": res.seconds,
                "sigma": self.cfg.sigma,
                "iterations": self.cfg.iterations,
            }
        )
        tensors = {"vectors": res.vectors, "u_directions": res.U, "start_vectors": self.radius * res.start_V}
        return Fit(tensors, info)

    def random_baseline(self, fit: Fit) -> dict[str, torch.Tensor]:
        """``m`` random vectors at R, mutually orthogonal; with more factors than d_model (soft
        orthogonalization), in blocks of d_model mutually orthogonal ones, each an independent draw."""
        n, d, seed = len(fit), self.ctx.lm.d_model, self.ctx.settings.seed
        blocks = [
            random_vectors(min(d, n - s), d, self.radius, seed, stream=RANDOM_STREAM + j)
            for j, s in enumerate(range(0, n, d))
        ]
        return {"random_vectors": torch.cat(blocks) if blocks else torch.zeros(0, d)}

    def objectives(self, tensors: dict[str, torch.Tensor]) -> list[float]:
        v = perturbations(tensors)
        return self.delta(v.to(self.delta.device)).norm(dim=-1).cpu().tolist()
