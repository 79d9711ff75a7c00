"""The defaults of every method, in one table: the public API (:func:`melbo.train`), the CLI
(``--help`` prints this table), the planted benchmark and the demo all read them from here.

Each entry gives the value and why it is what it is (a measurement, or the reference's value).
``None`` for a layer means the rule of :func:`melbo.core.models.default_layers`; ``None`` for
``lr`` means the R-scaled rule of the method (METHOD.md section 1).
"""

from __future__ import annotations

from typing import Any

# (value, reason) per method and setting.
_TABLE: dict[str, dict[str, tuple[Any, str]]] = {
    "melbo": {
        "source_layer": (None, "default_layers(L)"),
        "target_layer": (None, "default_layers(L)"),
        "positions": ("all", "METHOD.md section 1: every token position counts"),
        "num_vectors": (16, "a first look; the post trains 32-100"),
        "seed": (0, "reproducible runs"),
        "chat": (False, "prompts as given"),
        "radius": (
            "auto",
            "chosen by the diversity sweep (melbo.methods.radius_sweep): on gemma-3-270m the "
            "Goldilocks R is 0.005x-0.02x of the median residual norm, on tinystories-656k 0.2x-0.3x, "
            "so no fixed multiple serves both (issue 10 note)",
        ),
        "p": (2.0, "METHOD.md section 1"),
        "q": (1.0, "METHOD.md section 1"),
        "steps": (
            200,
            "at lr 0.1·R/√d: converged by 100 on stories260k; 85% of the 300-step objective on "
            "gemma-3-270m, at two thirds of the time (issue 10 note)",
        ),
        "lr": (
            None,
            "0.1·R/√d_model: a step of 0.1 rad on the sphere (the reference's 1e-3 at R = 4, d = 2048 "
            "is 0.011, too slow at 200-300 steps: measured in the issue 10 note)",
        ),
        "writes_only": (False, "the residual path kept, as in the post"),
        "lam": (0.5, "λ of radius='calibrate' (METHOD.md section 5)"),
        "batch_vectors": (None, "as many vectors at once as fit memory_gb (1: one after another, METHOD.md)"),
        "orthogonalize": ("symmetric", "the orthonormal block nearest to the trained one (no vector first)"),
        "effect_penalty": (0.0, "no soft orthogonality of the effects"),
        "memory_gb": (None, "4 GB on a CPU, 60% of the free memory on CUDA"),
    },
    "dct": {
        "source_layer": (None, "default_layers(L)"),
        "target_layer": (None, "default_layers(L)"),
        "positions": ("last:3", "the DCT reference (METHOD.md section 5)"),
        "num_vectors": (16, "top factors by α² that get completions; the bank holds all factors"),
        "seed": (0, "reproducible runs"),
        "chat": (False, "prompts as given"),
        "radius": ("calibrate", "nonlinearity ratio λ (METHOD.md section 5)"),
        "factors": (None, "m = min(512, d_model), the reference's 512"),
        "iterations": (10, "τ of the reference"),
        "sigma": ("exp", "exponential DCT, the recommended one"),
        "init": ("jacobian", "v = normalize(Jᵀu), the reference's"),
        "orthogonalize": ("qr", "QR with diag(R) > 0"),
        "beta": (1.0, "no damping"),
        "lam": (0.5, "λ for depth tgt − src ≈ 10 (METHOD.md section 5)"),
        "writes_only": (False, "the residual path kept"),
    },
    "adapter": {
        "source_layer": (None, "default_layers(L)"),
        "target_layer": (None, "default_layers(L)"),
        "positions": ("all", "as for vectors"),
        "num_vectors": (8, "adapters"),
        "seed": (0, "reproducible runs"),
        "chat": (False, "prompts as given"),
        "radius": (
            "0.01x",
            "random starts add 0.01 x the residual norm to the MLP output; training grows "
            "that 20-25x (stories260k, r = 64)",
        ),
        "rank": (None, "min(64, d_model)"),
        "p": (2.0, "METHOD.md section 1"),
        "q": (1.0, "METHOD.md section 1"),
        "steps": (300, "as for vectors"),
        "lr": (None, "0.045/√d_model: the reference's 1e-3 at d_model 2048"),
        "batch": (8, "adapters trained at once (independent: speed only)"),
        "mlp_module": (None, "found by name (mlp.down_proj, mlp.c_proj, ...)"),
    },
    "rank1": {
        "source_layer": (None, "default_layers(L)"),
        "target_layer": (None, "default_layers(L)"),
        "positions": ("all", "as for vectors"),
        "num_vectors": (64, "a population: factors trained at once"),
        "seed": (0, "reproducible runs"),
        "chat": (False, "prompts as given"),
        "radius": ("0.01x", "as for adapters"),
        "rank": (1, "rank-1 factors (CPE)"),
        "p": (2.0, "METHOD.md section 1"),
        "q": (1.0, "METHOD.md section 1"),
        "steps": (30, "CPE's 30 iterations"),
        "lr": (None, "0.2/√d_model: 30 steps on unit a, b (stories260k: objective x400 at 0.025)"),
        "batch": (64, "factors per forward chunk (memory only)"),
        "mlp_module": (None, "found by name (mlp.down_proj, mlp.c_proj, ...)"),
        "ortho": (10.0, "λ in units of the mean objective; stories260k, 64 factors: RMS overlap 0.79 at 0, 0.17 at 10"),
    },
    "ortho": {
        "source_layer": (None, "the base vector's layer"),
        "target_layer": (None, "the base vector's target layer"),
        "positions": ("all", "the reference averages over all positions"),
        "num_vectors": (100, "new orthogonal vectors (at most)"),
        "seed": (0, "the random baseline's seed"),
        "chat": (False, "prompts as given"),
        "base": (None, "θ₀, a SteeringVector (required)"),
        "steps": (1000, "the reference"),
        "lr": (0.01, "the reference's Adam lr"),
        "min_norm": (0.1, "the reference dropped norms <= 0.1"),
    },
}

METHODS = tuple(_TABLE)

DEFAULTS: dict[str, dict[str, Any]] = {m: {k: v for k, (v, _) in rows.items()} for m, rows in _TABLE.items()}
"""``DEFAULTS[method][setting]``: the default value."""

REASONS: dict[str, dict[str, str]] = {m: {k: why for k, (_, why) in rows.items()} for m, rows in _TABLE.items()}

# The planted benchmark trains on planted subjects, whose Goldilocks R differs from a pretrained
# model's by subject type; measured in the issue 3 note (64 vectors, seeds 0-2): arithmetic models
# trained from scratch need 0.35x-0.5x, the pretrained story fine-tunes 0.05x-0.2x.
PLANTED: dict[str, dict[str, dict[str, Any]]] = {
    "arithmetic": {
        "melbo": {"radius": "0.35x", "positions": "all", "scales": (1.0, 1.5, 2.0, 2.5, 3.0)},
        "dct": {"radius": "0.5x", "positions": "all", "scales": (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0)},
        "adapter": {"radius": "0.35x", "positions": "all", "scales": (1.0, 1.5, 2.0, 2.5, 3.0)},
        "rank1": {"radius": "0.35x", "positions": "all", "steps": 30, "scales": (1.0, 1.5, 2.0, 2.5, 3.0)},
    },
    "story": {
        "melbo": {"radius": "0.2x", "positions": "all", "scales": (1.0, 1.5, 2.0, 2.5, 3.0)},
        "dct": {"radius": "0.1x", "positions": "all", "scales": (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0)},
        "adapter": {"radius": "0.1x", "positions": "all", "scales": (1.0, 1.5, 2.0, 2.5, 3.0)},
        "rank1": {"radius": "0.1x", "positions": "all", "steps": 30, "scales": (1.0, 1.5, 2.0, 2.5, 3.0)},
    },
}
"""``PLANTED[task][method]``: what the planted benchmark uses instead of :data:`DEFAULTS`."""

DCT_SCALE_SCAN = (1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0)


def describe(method: str) -> str:
    """The defaults of ``method`` as text lines (for ``--help``)."""
    rows = _TABLE[method]
    return "\n".join(f"{k}: {v!r} ({why})" for k, (v, why) in rows.items())
