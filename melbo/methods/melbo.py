"""Unsupervised steering vectors (MELBO) as a melbo method (METHOD.md section 1).

Vectors of norm R, added after the source block, trained to maximize
``Σ_i (Σ_{t∈I_i} ‖Z_i,t(θ) − Z_i,t(0)‖^p)^(1/q)``, mutually orthogonal; with the random baseline
at the same R. ``batch_vectors`` vectors train at once (:mod:`melbo.methods.melbo_train`): 1 is the
sequential method of METHOD.md (one after another), more train a block jointly; by default as
many as fit the memory budget ``memory_gb``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from melbo.core.errors import MelboError
from melbo.core.models import LoadedModel, text_config
from melbo.core.radius import parse_radius
from melbo.core.slice import Slice
from melbo.core.sphere import random_vectors
from melbo.core.validate import check_choice, check_int, check_number, check_positive
from melbo.methods.base import Checkpoint, CommonSettings, Context, Fit, perturbations
from melbo.methods.calibrate import resolve_radius
from melbo.methods.melbo_train import BETAS, ORTHOGONALIZE, chunked_objective, learning_rate, train_block, train_vector


@dataclass
class MelboSettings(CommonSettings):
    """Settings of MELBO steering vectors (METHOD.md section 1).

    Attributes:
        radius: R: a number, ``"<k>x"`` (k × the median residual norm at the source),
            ``"calibrate"`` (METHOD.md section 5) or ``"auto"`` (resolved by the orchestrator's sweep).
        p, q: the objective's powers (> 0). steps: optimizer steps per vector.
        lr: AdamW learning rate; None gives ``0.1·R/√d_model`` (:data:`melbo.methods.melbo_train.LR_SCALE`).
        writes_only: measure ``Z(θ) − θ`` (METHOD.md section 5, "The residual path").
        lam: λ of ``radius="calibrate"``.
        batch_vectors: vectors trained at once (1: sequential; None: as many as fit ``memory_gb``).
        orthogonalize: within a block, ``symmetric``, ``qr`` or ``none`` (:mod:`melbo.methods.melbo_train`).
        effect_penalty: weight of the soft orthogonality of the effects δ (0: off).
        memory_gb: activation memory budget of one step (None: 4 on a CPU, 60% of the free memory
            on CUDA); larger blocks are evaluated in chunks of vectors and prompts.
    """

    radius: str
    p: float
    q: float
    steps: int
    lr: float | None
    writes_only: bool
    lam: float
    batch_vectors: int | None
    orthogonalize: str
    effect_penalty: float
    memory_gb: float | None

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
        if self.batch_vectors is not None:
            self.batch_vectors = check_int("batch of vectors", self.batch_vectors, 1, 100_000)
        check_choice("orthogonalization", self.orthogonalize, ORTHOGONALIZE)
        self.effect_penalty = check_number("effect penalty", self.effect_penalty, 0.0)
        if self.memory_gb is not None:
            self.memory_gb = check_positive("memory budget (GB)", self.memory_gb)

    def check_model(self, d_model: int) -> None:
        if self.num_vectors > d_model:
            raise MelboError(
                f"{self.num_vectors} mutually orthogonal vectors do not fit d_model = {d_model}; "
                f"allowed: at most {d_model}"
            )


def row_bytes(lm: LoadedModel, blocks: int, tokens: int, dtype_bytes: int) -> int:
    """Estimated activation memory of one (vector, prompt) row through ``blocks`` blocks with
    gradients: per block and token about ``14·d + 3·d_ff`` floats, plus attention scores
    ``2·heads·T``; doubled for safety. An estimate, not a measurement."""
    cfg = text_config(lm.model)
    d = lm.d_model
    ff = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d)
    heads = int(getattr(cfg, "num_attention_heads", None) or max(1, d // 64))
    return 2 * blocks * tokens * (14 * d + 3 * ff + 2 * heads * tokens) * dtype_bytes


def budget_bytes(memory_gb: float | None, device: torch.device) -> float:
    """The step's memory budget in bytes (see :class:`MelboSettings`)."""
    if memory_gb is not None:
        return memory_gb * 1e9
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.6 * free
    return 4e9


def plan_batches(
    num_vectors: int, n_prompts: int, per_row: int, budget: float, batch_vectors: int | None
) -> tuple[int, int, int]:
    """``(B, vectors per chunk, prompts per chunk)``: the block size (``batch_vectors``, or as many
    as fit the budget, at most ``num_vectors``) and the chunks a step is evaluated in."""
    rows = max(1, int(budget // max(1, per_row)))
    B = batch_vectors or max(1, min(num_vectors, rows // max(1, n_prompts)))
    B = min(B, num_vectors)
    prompts = min(n_prompts, rows)
    vectors = max(1, min(B, rows // max(1, prompts)))
    return B, vectors, prompts


class MelboMethod:
    """MELBO steering vectors (module docstring). Resumable per block of vectors."""

    name: ClassVar[str] = "melbo"
    kind: ClassVar[str] = "vector"
    settings_class: ClassVar[type] = MelboSettings
    resumable: ClassVar[bool] = True

    def __init__(self, ctx: Context):
        self.ctx, s = ctx, ctx.settings
        s.check_model(ctx.lm.d_model)
        self.slice = Slice(ctx.lm.model, ctx.lm.blocks, ctx.batch, ctx.src, ctx.tgt, writes_only=s.writes_only)
        self.residual_norm = self.slice.residual_norm()
        self.radius, calibration = resolve_radius(s.radius, self.residual_norm, ctx, s.writes_only, s.lam, s.seed)
        self.lr = learning_rate(s.lr, self.radius, self.slice.d_model)
        dtype_bytes = torch.finfo(self.slice.h_src.dtype).bits // 8
        per_row = row_bytes(ctx.lm, ctx.tgt - ctx.src, self.slice.h_src.shape[1], dtype_bytes)
        self.batch, self.vector_chunk, self.prompt_chunk = plan_batches(
            s.num_vectors, self.slice.n, per_row, budget_bytes(s.memory_gb, self.slice.h_src.device), s.batch_vectors
        )
        self.meta = {
            "batch_vectors_used": self.batch,
            "chunks": {"vectors": self.vector_chunk, "prompts": self.prompt_chunk},
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
        with tqdm(
            total=(s.num_vectors - len(vectors)) * s.steps,
            desc="MELBO vectors",
            unit="vector-step",
            dynamic_ncols=True,
            disable=not self.ctx.show_progress,
        ) as bar:
            for k in range(len(vectors), s.num_vectors, self.batch):
                idx = list(range(k, min(s.num_vectors, k + self.batch)))
                earlier = vectors if len(vectors) else None
                if len(idx) == 1 and self.prompt_chunk >= self.slice.n:  # the sequential reference
                    vec, start, row = train_vector(
                        self.slice, k, self.radius, s.p, s.q, s.steps, self.lr, s.seed, earlier, bar
                    )
                    vec, start, rows = vec[None], start[None], [row]
                else:
                    vec, start, rows = train_block(
                        self.slice,
                        idx,
                        self.radius,
                        s.p,
                        s.q,
                        s.steps,
                        self.lr,
                        s.seed,
                        earlier,
                        s.orthogonalize,
                        s.effect_penalty,
                        self.vector_chunk,
                        self.prompt_chunk,
                        bar,
                    )
                vectors, starts = torch.cat([vectors, vec]), torch.cat([starts, start])
                info += rows
                if checkpoint is not None:
                    checkpoint(Fit({"vectors": vectors, "start_vectors": starts}, list(info)))
        return Fit({"vectors": vectors, "start_vectors": starts}, info)

    def random_baseline(self, fit: Fit) -> dict[str, torch.Tensor]:
        return {"random_vectors": random_vectors(len(fit), self.slice.d_model, self.radius, self.ctx.settings.seed)}

    def objectives(self, tensors: dict[str, torch.Tensor]) -> list[float]:
        v = perturbations(tensors).to(self.slice.h_src.device)
        s = self.ctx.settings
        with torch.no_grad():
            return chunked_objective(self.slice, v, s.p, s.q, self.vector_chunk, self.prompt_chunk, False).tolist()
