"""One setting of the planted-behavior benchmark, its defaults per task, and sweep grids over it.

The defaults come from :data:`melbo.defaults.PLANTED` (per task and method) and
:data:`melbo.defaults.DEFAULTS`; a setting is checked by the method's own settings class, so the
benchmark accepts exactly what :func:`melbo.train` accepts.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from melbo.core.errors import MelboError
from melbo.core.grid import parse_grid_text, read_grid_file
from melbo.core.prompts import parse_positions
from melbo.core.radius import parse_radius
from melbo.core.validate import check_positive
from melbo.defaults import DCT_SCALE_SCAN, PLANTED
from melbo.methods.base import make_settings
from melbo.methods.registry import STANDALONE_METHODS, get_method, trains_adapters

BENCH_METHODS = STANDALONE_METHODS


@dataclass
class BenchSetting:
    """One setting of the benchmark (``melbo bench backdoor`` flags map one to one).

    Attributes:
        method: ``melbo`` (METHOD.md section 1), ``dct`` (section 5: the top ``num_vectors``
            factors by α²) or ``adapter`` (section 2).
        num_vectors: N learned perturbations and N random ones at the same R.
        radius: R (a number, ``"<k>x"`` of the median residual norm at the source, ``calibrate``).
        source_layer, target_layer: blocks (None: the model's default rule).
        p, q, steps: MELBO's and the adapters' objective powers and steps. positions: counted tokens.
        seed: random starts and baseline. writes_only: measure ``Z(θ) − θ``.
        scales: multiples of every perturbation at which completions are generated; a
            perturbation finds a behavior when any scale elicits it.
        lam: λ of ``calibrate``. factors: DCT's m (None: min(512, d_model)).
        orthogonalize: DCT's ``qr`` or ``soft``. rank: the adapters' r.
        batch_vectors: MELBO vectors trained at once (None: as many as fit; 1: one by one).
    """

    method: str = "dct"
    num_vectors: int = 64
    radius: str = "0.5x"
    source_layer: int | None = None
    target_layer: int | None = None
    p: float = 2.0
    q: float = 1.0
    positions: str = "all"
    steps: int = 300
    seed: int = 0
    writes_only: bool = False
    scales: tuple[float, ...] = (1.0,)
    lam: float = 0.5
    factors: int | None = None
    orthogonalize: str = "qr"
    rank: int | None = None
    batch_vectors: int | None = None

    def train_settings(self) -> dict[str, Any]:
        """The :func:`melbo.train` settings of this setting's method."""
        common = {
            "num_vectors": self.num_vectors,
            "radius": self.radius,
            "source_layer": self.source_layer,
            "target_layer": self.target_layer,
            "positions": self.positions,
            "seed": self.seed,
        }
        if self.method == "melbo":
            return {
                **common,
                "p": self.p,
                "q": self.q,
                "steps": self.steps,
                "writes_only": self.writes_only,
                "lam": self.lam,
                "batch_vectors": self.batch_vectors,
            }
        if self.method == "dct":
            return {
                **common,
                "factors": self.factors,
                "orthogonalize": self.orthogonalize,
                "lam": self.lam,
                "writes_only": self.writes_only,
            }
        return {**common, "p": self.p, "q": self.q, "steps": self.steps, "rank": self.rank}

    def check(self) -> BenchSetting:
        """Validate every field with the method's own checks; returns self.

        Raises:
            MelboError: naming the bad value and what is allowed.
        """
        if self.method not in BENCH_METHODS:
            raise MelboError(f"unknown method {self.method!r}; allowed: {', '.join(BENCH_METHODS)}")
        if trains_adapters(self.method) and self.writes_only:
            raise MelboError("writes-only is for vectors (melbo, dct), not for adapters")
        make_settings(self.method, get_method(self.method).settings_class, self.train_settings())
        if not self.scales:
            raise MelboError("no scales given; allowed: one or more numbers > 0 like 1,5,8,12")
        self.scales = tuple(check_positive("scale", s) for s in self.scales)
        if self.method == "dct" and self.factors is not None and self.factors < self.num_vectors:
            raise MelboError(f"DCT factors m = {self.factors} < number of vectors {self.num_vectors}; allowed: m >= N")
        return self

    def label(self) -> str:
        """A short name of the setting, for tables."""
        parts = [
            self.method,
            f"R={self.radius}",
            f"L{self.source_layer}->{self.target_layer}",
            f"p={self.p:g}",
            f"q={self.q:g}",
            f"pos={self.positions}",
        ]
        if self.method in ("melbo", "adapter", "rank1"):
            parts.append(f"steps={self.steps}")
        if trains_adapters(self.method):
            parts.append(f"rank={self.rank or 'auto'}")
        if self.method == "dct" and self.orthogonalize != "qr":
            parts.append(f"ortho={self.orthogonalize}")
        if self.writes_only:
            parts.append("writes-only")
        if self.method == "melbo" and self.batch_vectors is not None:
            parts.append(f"batch={self.batch_vectors}")
        if tuple(self.scales) != (1.0,):
            parts.append("scales=" + ",".join(f"{s:g}" for s in self.scales))
        return " ".join(parts)


def parse_scales(text: str | None) -> tuple[float, ...]:
    """``"1,5,8,12"`` -> (1.0, 5.0, 8.0, 12.0); ``"scan"`` -> :data:`melbo.defaults.DCT_SCALE_SCAN`.

    Raises:
        MelboError: a piece is not a number > 0.
    """
    if text is None or not str(text).strip():
        return (1.0,)
    if str(text).strip().lower() == "scan":
        return DCT_SCALE_SCAN
    out = []
    for piece in str(text).split(","):
        try:
            out.append(float(piece))
        except ValueError:
            raise MelboError(f"bad scale {piece!r} in {text!r}; allowed: numbers > 0 like 1,5,8,12") from None
        check_positive("scale", out[-1])
    return tuple(out)


def setting_from_options(method: str, task: str = "arithmetic", **options: Any) -> BenchSetting:
    """A checked :class:`BenchSetting`: ``options`` the user gave (None values are dropped) over
    the task's defaults (:data:`melbo.defaults.PLANTED`); ``scales`` may be a string.

    Raises:
        MelboError: a bad value (named, with what is allowed).
    """
    if method not in BENCH_METHODS:
        raise MelboError(f"unknown method {method!r}; allowed: {', '.join(BENCH_METHODS)}")
    if task not in PLANTED:
        raise MelboError(f"unknown planted task {task!r}; allowed: {', '.join(PLANTED)}")
    values: dict[str, Any] = {**PLANTED[task][method], "method": method}
    values.update({k: v for k, v in options.items() if v is not None})
    if isinstance(values.get("scales"), str):
        values["scales"] = parse_scales(values["scales"])
    fields = {f.name for f in dataclasses.fields(BenchSetting)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise MelboError(f"unknown benchmark setting {unknown[0]!r}; allowed: {', '.join(sorted(fields))}")
    return BenchSetting(**values).check()


SWEEP_KEYS: dict[str, Any] = {
    "method": str,
    "num-vectors": int,
    "radius": str,
    "source-layer": int,
    "target-layer": int,
    "p": float,
    "q": float,
    "positions": str,
    "steps": int,
    "seed": int,
    "writes-only": "bool",
    "lambda": float,
    "factors": int,
    "orthogonalize": str,
    "rank": int,
    "batch-vectors": int,
}
_FIELD = {
    "num-vectors": "num_vectors",
    "source-layer": "source_layer",
    "target-layer": "target_layer",
    "writes-only": "writes_only",
    "lambda": "lam",
    "batch-vectors": "batch_vectors",
}


def _sweep_value(key: str, value: str) -> Any:
    kind = SWEEP_KEYS[key]
    if kind == "bool":
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise MelboError(f"bad value {value!r} for sweep key {key!r}; allowed: true/false (or 1/0)")
    try:
        v = kind(value)
    except ValueError:
        raise MelboError(f"bad value {value!r} for sweep key {key!r}; allowed: {kind.__name__} values") from None
    if key == "radius":
        parse_radius(value)
    if key == "method" and v not in BENCH_METHODS:
        raise MelboError(f"bad value {value!r} for sweep key 'method'; allowed: {', '.join(BENCH_METHODS)}")
    if key == "positions":
        parse_positions(value)
    if key == "orthogonalize" and v not in ("qr", "soft"):
        raise MelboError(f"bad value {value!r} for sweep key 'orthogonalize'; allowed: qr, soft")
    return v


def parse_sweep(text: str | dict[str, list]) -> list[dict]:
    """A sweep grid like ``radius=0.5x,1x,source-layer=1,2,p=2,4`` (or the ``{key: [values]}`` of
    :func:`melbo.core.grid.read_grid_file`) -> the list of its settings (the cartesian product,
    first key slowest), each a dict of :class:`BenchSetting` overrides.

    Values are split on commas; a piece with ``=`` starts the next key; a value in double quotes
    keeps its commas (``positions="0,3",last:2``). Keys: :data:`SWEEP_KEYS`.

    Raises:
        MelboError: empty grid, unknown or repeated key, a key with no values, a bad value.
    """
    grid = text if isinstance(text, dict) else parse_grid_text(str(text or ""), list(SWEEP_KEYS))
    values = {key: [_sweep_value(key, str(v)) for v in vs] for key, vs in grid.items()}
    keys = list(values)
    return [
        {_FIELD.get(k, k): v for k, v in zip(keys, combo)} for combo in itertools.product(*(values[k] for k in keys))
    ]


def read_sweep_file(path: str) -> list[dict]:
    """The settings of a sweep grid file (JSON or TOML: each key of :data:`SWEEP_KEYS` -> its list of
    values, e.g. ``{"radius": ["0.5x", "1x"], "positions": ["0,3", "all"]}``), as :func:`parse_sweep`.

    Raises:
        MelboError: see :func:`melbo.core.grid.read_grid_file` and :func:`parse_sweep`.
    """
    return parse_sweep(read_grid_file(path, list(SWEEP_KEYS)))
