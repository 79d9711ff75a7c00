"""One perturbation as a value: a :class:`SteeringVector` (METHOD.md section 1) or a
:class:`SteeringAdapter` (section 2), with ``.apply(lm)`` and vector arithmetic (section 4).

Example:
    >>> import torch, melbo
    >>> v = melbo.SteeringVector(torch.ones(64), layer=1)
    >>> w = 2 * v - 0.5 * v                      # arithmetic keeps the hook point
    >>> float(w.norm)                            # 1.5 · 8
    12.0
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig, generate, generate_rows
from melbo.core.hooks import HookHandle, SteeringHandle
from melbo.core.io import load_tensors, save_tensors
from melbo.core.lora import AdapterHook, module_by_name
from melbo.core.models import LoadedModel, resolve_layer
from melbo.core.validate import check_number

VECTOR_FORMAT = "melbo.vector/1"


def _scalar(x: Any, what: str) -> float:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    return check_number(what, x)


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """A steering vector ``θ`` added to the residual stream after block ``layer`` (the output of
    ``blocks[layer]``, TransformerLens's ``blocks.{layer}.hook_resid_post``), at every position.

    Attributes:
        vector: ``[d_model]`` float tensor (residual-stream units).
        layer: the source block, 0-based (negative counts from the end of the model).
        model: the model it was made for (a name or path), or None.
        label: a name for tables (``"vector 3"``).
        meta: where it came from (target layer, objective, method, ...), JSON-able.

    Arithmetic: ``a + b``, ``a - b`` (same layer and model, else :class:`MelboError`), ``k * a``,
    ``a / k``, ``-a``. Example: ``bank[3] - 0.5 * bank[7]``.
    """

    vector: torch.Tensor
    layer: int
    model: str | None = None
    label: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = self.vector
        if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.is_floating_point():
            raise MelboError(
                f"a steering vector is a 1-D float tensor [d_model], got "
                f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
            )
        if not torch.isfinite(v).all():
            raise MelboError("a steering vector must be finite; this one holds NaN or inf")

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    @property
    def norm(self) -> float:
        """‖θ‖₂ (residual-stream units)."""
        return float(self.vector.double().norm())

    def _check(self, lm: LoadedModel) -> int:
        if self.d_model != lm.d_model:
            raise MelboError(
                f"{self.label or 'the steering vector'} is {self.d_model} wide, but model {lm.name!r} "
                f"has d_model = {lm.d_model}; use it with the model it was made for"
            )
        return resolve_layer(self.layer, lm.num_layers, "layer")

    def apply(self, lm: LoadedModel, scale: float = 1.0, positions: str = "all") -> SteeringHandle:
        """Add ``scale · θ`` after block ``layer`` of ``lm`` until the returned handle is removed;
        use it as a context manager (the hook is removed on exit, also on error).

        Args:
            positions: ``all``, ``prompt`` or ``generated`` (see :mod:`melbo.core.hooks`).

        Raises:
            MelboError: the vector does not fit the model, or a bad scale/positions.

        Example:
            >>> with bank[3].apply(lm, scale=1.5):      # doctest: +SKIP
            ...     out = lm.model.generate(**inputs)
        """
        layer = self._check(lm)
        return SteeringHandle(lm.blocks[layer], self.vector, _scalar(scale, "scale"), positions)

    def generate(self, lm: LoadedModel, prompts: list[str] | str, scale: float = 1.0, **generation: Any) -> list[str]:
        """Steered completions of ``prompts`` (one per prompt); ``generation`` are
        :class:`melbo.core.generate.GenerationConfig` fields (``max_new_tokens=64``, ...)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        layer = self._check(lm)
        return generate(lm, prompts, self.vector[None], layer, _scalar(scale, "scale"), GenerationConfig(**generation))[
            0
        ]

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> SteeringVector:
        """A copy on ``device`` in ``dtype``."""
        return replace(self, vector=self.vector.to(device=device, dtype=dtype))

    def rescaled(self, norm: float) -> SteeringVector:
        """The same direction at 2-norm ``norm`` (METHOD.md section 3)."""
        n = self.norm
        if n == 0:
            raise MelboError("cannot rescale a zero vector")
        k = check_number("norm", norm, 0.0, low_open=True) / n
        return replace(self, vector=self.vector * k, label=f"{self.label} rescaled to {norm:g}".strip())

    def _combine(self, other: object, sign: float, op: str) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented  # type: ignore[return-value]
        if self.layer != other.layer:
            raise MelboError(
                f"cannot {op} steering vectors of different layers ({self.layer} and {other.layer}): "
                f"they are added at different points of the residual stream"
            )
        if self.model and other.model and self.model != other.model:
            raise MelboError(f"cannot {op} steering vectors of different models ({self.model!r} and {other.model!r})")
        if self.d_model != other.d_model:
            raise MelboError(f"cannot {op} steering vectors of widths {self.d_model} and {other.d_model}")
        vec = self.vector + sign * other.vector.to(self.vector)
        label = f"({self.label or 'v'} {'+' if sign > 0 else '-'} {other.label or 'v'})"
        return SteeringVector(vec, self.layer, self.model or other.model, label, {"derived": True})

    def __add__(self, other: object) -> SteeringVector:
        return self._combine(other, 1.0, "add")

    def __sub__(self, other: object) -> SteeringVector:
        return self._combine(other, -1.0, "subtract")

    def __mul__(self, k: object) -> SteeringVector:
        if isinstance(k, SteeringVector):
            return NotImplemented  # type: ignore[return-value]
        f = _scalar(k, "scale factor")
        return replace(self, vector=self.vector * f, label=f"{f:g}·{self.label or 'v'}")

    __rmul__ = __mul__

    def __truediv__(self, k: object) -> SteeringVector:
        f = _scalar(k, "divisor")
        if f == 0:
            raise MelboError("cannot divide a steering vector by 0")
        return self * (1.0 / f)

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def __repr__(self) -> str:
        return (
            f"SteeringVector({self.label or 'unnamed'}, layer={self.layer}, d_model={self.d_model}, "
            f"norm={self.norm:.4g}{f', model={self.model!r}' if self.model else ''})"
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (tensor ``vector`` ``[d_model]``) recording the hook site
        (``layer``, ``hook = "blocks.{layer}.hook_resid_post"``, the model)."""
        meta = {
            "layer": self.layer,
            "hook": f"blocks.{self.layer}.hook_resid_post",
            "model": self.model,
            "label": self.label,
            "meta": self.meta,
        }
        return save_tensors(path, {"vector": self.vector}, meta, VECTOR_FORMAT)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SteeringVector:
        """Read a file written by :meth:`save`.

        Raises:
            MelboError: not such a file, or a malformed one (tensor ``vector`` not of shape
                ``[d_model]``: it is never flattened).
        """
        tensors, meta = load_tensors(path, VECTOR_FORMAT, "steering vector", ("vector",))
        shape = list(tensors["vector"].shape)
        if len(shape) != 1 or not shape[0]:
            raise MelboError(
                f"steering vector {str(path)!r}: tensor 'vector' has shape {shape}; a steering vector has shape "
                f"[d_model] (several vectors are a bank, [n, d_model])"
            )
        layer = meta.get("layer")
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise MelboError(f"steering vector {str(path)!r} has layer {layer!r}; expected an integer")
        return cls(
            tensors["vector"],
            layer,
            meta.get("model"),
            str(meta.get("label") or ""),
            dict(meta["meta"]) if isinstance(meta.get("meta"), dict) else {},
        )


@dataclass(frozen=True, eq=False)
class SteeringAdapter:
    """A steering adapter ``W' = W + R · Ω_B Ω_Aᵀ`` on the MLP output module ``module_name``
    of block ``layer`` (METHOD.md section 2).

    Attributes:
        omega_a: ``[d_hidden, r]``; omega_b: ``[d_model, r]``; radius: R.
        module_name: dotted path of the target module in the model. Scaling (``k * a``) scales R.
    """

    omega_a: torch.Tensor
    omega_b: torch.Tensor
    radius: float
    module_name: str
    layer: int
    model: str | None = None
    label: str = ""
    meta: dict = field(default_factory=dict)

    def apply(self, lm: LoadedModel, scale: float = 1.0) -> HookHandle:
        """Hook the adapter (at ``scale · R``) into ``lm`` until the handle is removed (a
        context manager).

        Raises:
            MelboError: the model has no such module, or the shapes do not fit it.
        """
        module = module_by_name(lm, self.module_name)
        return AdapterHook(module, self.omega_a, self.omega_b, self.radius * _scalar(scale, "scale"))

    def generate(self, lm: LoadedModel, prompts: list[str] | str, scale: float = 1.0, **generation: Any) -> list[str]:
        """Completions of ``prompts`` with the adapter applied (one per prompt)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return generate_rows(lm, prompts, 1, lambda rows: self.apply(lm, scale), GenerationConfig(**generation))[0]

    def __mul__(self, k: object) -> SteeringAdapter:
        return replace(self, radius=self.radius * _scalar(k, "scale factor"))

    __rmul__ = __mul__

    def __neg__(self) -> SteeringAdapter:
        return self * -1.0

    def __add__(self, other: object) -> SteeringAdapter:
        raise MelboError(
            "steering adapters cannot be added (a sum of rank-r adapters is not one of rank r); "
            "scale them, or apply them one at a time"
        )

    __sub__ = __add__

    def __repr__(self) -> str:
        return (
            f"SteeringAdapter({self.label or 'unnamed'}, layer={self.layer}, module={self.module_name!r}, "
            f"rank={self.omega_a.shape[-1]}, R={self.radius:.4g})"
        )
