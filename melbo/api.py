"""The notebook API beside :func:`melbo.train`: MELBO-ortho from a vector, and radius calibration."""

from __future__ import annotations

from typing import Any

from melbo.bank import Bank
from melbo.core.errors import MelboError
from melbo.core.models import LoadedModel, check_layers, default_layers, load_model
from melbo.core.prompts import check_prompts, encode_prompts
from melbo.methods.calibrate import Calibration, calibrate_radius
from melbo.methods.delta import DeltaMap
from melbo.run import train
from melbo.vector import SteeringVector


def ortho(
    vector: SteeringVector, prompts: list[str] | str | None = None, lm: LoadedModel | str | None = None, **settings: Any
) -> Bank:
    """MELBO-ortho (METHOD.md section 3): vectors orthogonal to ``vector`` (θ₀) and to each other,
    each reproducing θ₀'s effect on the target layer. Row 0 of the returned bank is θ₀.

    Args:
        vector: θ₀, e.g. ``bank[3]``; its layer (and target layer) are used unless overridden.
        prompts: default: the prompts θ₀'s bank was trained on (``vector.meta["prompts"]``).
        lm: default: ``vector.model``.
        settings: as for :func:`melbo.train` with ``method="ortho"`` (``num_vectors=100``,
            ``steps=1000``, ``lr=0.01``, ``min_norm=0.1``, ``out=...``).

    Raises:
        MelboError: no prompts or model to use, or any bad setting.

    Example:
        >>> more = melbo.ortho(bank[1], num_vectors=20, steps=300)   # doctest: +SKIP
    """
    prompts = prompts if prompts is not None else vector.meta.get("prompts")
    if not prompts:
        raise MelboError("MELBO-ortho needs prompts: pass prompts=[...] (the vector does not record its own)")
    model = lm if lm is not None else vector.model
    if model is None:
        raise MelboError("MELBO-ortho needs the model: pass lm=... (the vector does not say which it is for)")
    return train(model, prompts, "ortho", base=vector, **settings)


def calibrate(
    lm: LoadedModel | str,
    prompts: list[str] | str,
    source_layer: int | None = None,
    target_layer: int | None = None,
    positions: str = "last:3",
    lam: float = 0.5,
    directions: int = 30,
    bracket: tuple[float, float] = (1e-3, 100.0),
    writes_only: bool = False,
    seed: int = 0,
    chat: bool = False,
) -> Calibration:
    """Calibrate R (METHOD.md section 5): the r at which the nonlinearity ratio
    ``sqrt(Σ‖Δ(r v) − r J v‖² / Σ‖r J v‖²)`` over ``directions`` random unit v equals ``lam``.

    Returns:
        a :class:`melbo.methods.calibrate.Calibration` (``radius`` in residual-stream units, the
        ratio curve).

    Raises:
        MelboError: bad prompts, layers or bracket; ``CalibrationError`` (with ``.curve``) when
            the ratio does not cross λ inside the bracket.
    """
    lm = lm if isinstance(lm, LoadedModel) else load_model(str(lm))
    prompts = check_prompts([prompts] if isinstance(prompts, str) else list(prompts))
    d_src, d_tgt = default_layers(lm.num_layers)
    src, tgt = check_layers(
        d_src if source_layer is None else source_layer, d_tgt if target_layer is None else target_layer, lm.num_layers
    )
    batch = encode_prompts(lm.tokenizer, prompts, positions, chat)
    delta = DeltaMap.from_batch(lm.model, lm.blocks, batch, src, tgt, writes_only)
    return calibrate_radius(delta, lam, directions, bracket, seed)
