"""How the radius R of a run is given.

- a number: R in residual-stream units;
- ``"<k>x"``: k times the residual scale at the source layer, the **median** ‖h_src‖₂ over the
  counted token positions of the training prompts (the median, not the mean: on real models
  the BOS position carries a "massive activation", e.g. 26,160 against about 2,200 elsewhere on
  gemma-3-270m, which would make a mean-based R ten times too large);
- ``"calibrate"``: the R at which the slice's nonlinearity ratio is λ (METHOD.md section 5,
  :mod:`melbo.methods.calibrate`);
- ``"auto"``: the R at the cusp of completion diversity, found by a sweep
  (:mod:`melbo.methods.radius_sweep`, METHOD.md section 4 and the post's comments).
"""

from __future__ import annotations

from dataclasses import dataclass

from melbo.core.errors import MelboError
from melbo.core.validate import check_positive

KINDS = ("absolute", "relative", "calibrate", "auto")
_ALLOWED = (
    "a number > 0 (residual-stream units), a multiple of the median residual norm at the source "
    "layer like 0.5x, calibrate (METHOD.md section 5) or auto (diversity sweep)"
)


@dataclass(frozen=True)
class RadiusSpec:
    """A parsed radius: ``kind`` in :data:`KINDS` and ``value`` (R, or k for ``"<k>x"``)."""

    kind: str
    value: float | None = None

    def __str__(self) -> str:
        if self.kind == "absolute":
            return f"{self.value:g}"
        if self.kind == "relative":
            return f"{self.value:g}x"
        return self.kind

    def resolve(self, residual_norm: float) -> float:
        """R for an absolute or relative spec, given the source's residual scale.

        Raises:
            MelboError: ``calibrate`` and ``auto`` need their own procedure.
        """
        if self.kind == "absolute":
            return float(self.value)  # type: ignore[arg-type]
        if self.kind == "relative":
            return float(self.value) * float(residual_norm)  # type: ignore[arg-type]
        raise MelboError(f"radius {self} is found by its own procedure, not from the residual norm")


def parse_radius(text: object) -> RadiusSpec:
    """``"4"`` -> absolute 4; ``"0.5x"`` -> relative 0.5; ``"calibrate"``; ``"auto"``.

    Raises:
        MelboError: anything else (names the value and what is allowed).
    """
    if isinstance(text, RadiusSpec):
        return text
    s = str(text).strip().lower()
    if s in ("auto", "calibrate"):
        return RadiusSpec(s)
    relative = s.endswith("x")
    try:
        value = float(s[:-1] if relative else s)
    except ValueError:
        raise MelboError(f"bad radius {text!r}; allowed: {_ALLOWED}") from None
    try:
        check_positive("radius R", value)
    except MelboError:
        raise MelboError(f"bad radius {text!r}: R must be finite and > 0; allowed: {_ALLOWED}") from None
    return RadiusSpec("relative" if relative else "absolute", value)
