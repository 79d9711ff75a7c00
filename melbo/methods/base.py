"""What a method is to the orchestrator (:func:`melbo.train`): a small protocol.

A method is built for one run from a :class:`Context` (the model, the encoded training prompts,
the resolved layers and its checked settings). It reports the values it resolved (``meta``:
R, the residual norm, the learning rate, ...), fits its perturbations (:meth:`Method.fit`,
calling ``checkpoint`` whenever a resumable state exists), draws the random baseline at the same
R (:meth:`Method.random_baseline`) and scores any perturbations with its own objective
(:meth:`Method.objectives`). Validation of prompts and paths, files, resume, completions and
the summary belong to the orchestrator, not to methods.

Perturbations are named tensors, by kind:

- ``"vector"``: ``vectors [N, d_model]`` (+ ``start_vectors``); baseline ``random_vectors``;
- ``"adapter"``: ``omega_a [N, d_hidden, r]``, ``omega_b [N, d_model, r]`` (+ starts);
  baseline ``random_omega_a``, ``random_omega_b``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from melbo.core.errors import MelboError
from melbo.core.models import LoadedModel
from melbo.core.prompts import PromptBatch, parse_positions
from melbo.core.validate import check_int, check_seed
from melbo.defaults import DEFAULTS


@dataclass
class CommonSettings:
    """Settings every method has (defaults: :data:`melbo.defaults.DEFAULTS`).

    Attributes:
        source_layer, target_layer: blocks (None: :func:`melbo.core.models.default_layers`).
        positions: ``all``, ``last:K`` or indices like ``0,3,-1`` (METHOD.md "Notation").
        num_vectors: how many perturbations (DCT: how many top factors are evaluated).
        seed: random starts and the random baseline.
        chat: wrap prompts in the tokenizer's chat template.
    """

    source_layer: int | None
    target_layer: int | None
    positions: str
    num_vectors: int
    seed: int
    chat: bool

    def check(self) -> None:
        """Raises MelboError for a bad value (subclasses check their own fields too)."""
        parse_positions(self.positions)
        self.num_vectors = check_int("number of vectors", self.num_vectors, 1, 100_000)
        self.seed = check_seed(self.seed)
        for name in ("source_layer", "target_layer"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, check_int(name.replace("_", " "), v))
        self.chat = bool(self.chat)

    def layers_hint(self) -> tuple[int | None, int | None]:
        """Default source and target layers this method's inputs suggest (None: the model's rule)."""
        return None, None

    def check_model(self, d_model: int) -> None:
        """Checks that need the model's width, run before any work (e.g. before an R sweep).

        Raises:
            MelboError: the settings cannot work on a model of width ``d_model``.
        """

    def to_meta(self) -> dict:
        """The settings as JSON-able metadata (tensors and vectors left out)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (str, int, float, bool, type(None))):
                out[f.name] = v
            elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, float, str)) for x in v):
                out[f.name] = list(v)
        return out


def make_settings(method: str, cls: type, overrides: dict[str, Any]) -> Any:
    """``cls`` filled from :data:`melbo.defaults.DEFAULTS` ``[method]`` and ``overrides``, checked.

    Raises:
        MelboError: an unknown setting (listing the allowed ones), or a bad value.
    """
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise MelboError(f"unknown setting {unknown[0]!r} for method {method!r}; allowed: {', '.join(sorted(allowed))}")
    values = {**DEFAULTS[method], **overrides}
    settings = cls(**{k: values[k] for k in allowed})
    settings.check()
    return settings


@dataclass
class Context:
    """One run's inputs to a method.

    Attributes:
        lm: the model. batch: the training prompts, encoded with the settings' positions.
        src, tgt: resolved source and target blocks. settings: the method's checked settings.
        show_progress: tqdm bars.
    """

    lm: LoadedModel
    batch: PromptBatch
    src: int
    tgt: int
    settings: Any
    show_progress: bool = True


@dataclass
class Fit:
    """Perturbations fitted so far: named tensors (module docstring) and one JSON-able info
    dict per perturbation (objective, start objective, cosine between start and end, ...).
    ``state`` holds a resumable method's partial state (tensors) when the fit is not finished."""

    tensors: dict[str, torch.Tensor]
    info: list[dict]
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.info)


Checkpoint = Callable[[Fit], None]


class Method(Protocol):
    """The protocol every method implements (module docstring)."""

    name: ClassVar[str]
    kind: ClassVar[str]
    settings_class: ClassVar[type]
    resumable: ClassVar[bool]
    meta: dict
    radius: float

    def __init__(self, ctx: Context) -> None: ...

    def fit(self, resume: Fit | None, checkpoint: Checkpoint | None) -> Fit:
        """Fit the perturbations, continuing ``resume`` (a checkpoint of the same settings)."""
        ...

    def random_baseline(self, fit: Fit) -> dict[str, torch.Tensor]:
        """Random perturbations at the same R as ``fit``'s, named ``random_*``."""
        ...

    def objectives(self, tensors: dict[str, torch.Tensor]) -> list[float]:
        """The method's objective of each perturbation in ``tensors`` (learned or ``random_*`` names)."""
        ...


def perturbations(tensors: dict[str, torch.Tensor], name: str = "vectors") -> torch.Tensor:
    """``tensors[name]``, or the random baseline's ``tensors["random_" + name]``.

    Raises:
        MelboError: neither is there.
    """
    for key in (name, f"random_{name}"):
        if key in tensors:
            return tensors[key]
    raise MelboError(f"no {name!r} (or 'random_{name}') tensor among {sorted(tensors)}")


def vector_info(objective: float, start_objective: float, cosine: float, seconds: float, **extra: Any) -> dict:
    """The info dict of one learned vector or adapter."""
    return {
        "objective": float(objective),
        "start_objective": float(start_objective),
        "cosine_start_end": float(cosine),
        "seconds": float(seconds),
        **extra,
    }
