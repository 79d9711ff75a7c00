"""A panel of negative controls at a matched budget: what a learned perturbation's completions are
compared with before anyone calls them a discovered behavior.

Every control writes as many completions per prompt as there are learned perturbations (the
matched budget), deterministically from a seed (control ``c`` draws from ``seed · 1000 + index of
c in CONTROLS``, modulo 2³¹ − 1). Where a control needs a size, it is matched to the learned perturbation's *effect*
``E``, the per-position norm of the change it makes to the residual stream after the source block:
for vector banks ``E`` = the mean norm of the evaluated learned vectors (R for MELBO and DCT); for
adapter banks the mean of the learned adapters' recorded ``‖R Ω_B Ω_Aᵀ x‖`` over the counted
positions (their ``perturbation_norm``). ``ρ`` is the median residual norm at the source layer
recorded in the bank (``residual_norm``).

- ``random-vectors``: the bank's random baseline, random directions of norm R added after the
  source layer at every position (vector banks).
- ``random-adapters``: the bank's random adapters, each rescaled so that its ``‖ΔW‖_F =
  ‖R_j Ω_B Ω_Aᵀ‖_F`` equals that of the learned adapter with the same index (adapter and rank-1
  banks; rank-1 factors with unit columns already match exactly).
- ``activation-noise``: fresh Gaussian noise ``N(0, σ² I)``, ``σ = E / √d_model``, added after the
  source layer at every position of every forward pass (a new draw for every generated token), so
  that ``E‖ε‖² = E²`` per position (:class:`NoiseHandle`).
- ``weight-noise``: Gaussian noise on every 2-D weight matrix ``W`` of the source block, a new draw
  per sample, scaled per matrix to ``‖ΔW‖_F = (E / ρ) · ‖W‖_F``: the same relative size as the
  learned perturbation has against the residual stream. A documented rule, not an equivalence
  (the output change of a matrix with noise of that size is about ``E/ρ`` times its output only
  for isotropic inputs); :func:`weight_noise` restores the weights bit-exactly.
- ``temperature-1.0`` / ``temperature-1.5``: the unsteered model sampled at T = 1.0 / 1.5.

The statistics (:func:`fisher_vs_control`, :func:`control_table`) live in
:mod:`melbo.eval.control_stats` and are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from melbo.bank import Bank
from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig, generate, generate_rows
from melbo.core.hooks import HookHandle, PositionTracker, block_output, replace_block_output
from melbo.core.lora import apply_adapter, module_by_name
from melbo.core.models import LoadedModel, resolve_layer
from melbo.core.sphere import random_vectors
from melbo.core.validate import SEED_MAX, check_number, check_seed
from melbo.eval.control_stats import control_table, fisher_vs_control

__all__ = [
    "ALL",
    "CHEAP",
    "CONTROLS",
    "ControlSpec",
    "NoiseHandle",
    "control_table",
    "describe_controls",
    "effect_size",
    "fisher_vs_control",
    "parse_controls",
    "run_controls",
    "weight_noise",
]

CONTROLS = (
    "random-vectors",
    "random-adapters",
    "activation-noise",
    "weight-noise",
    "temperature-1.0",
    "temperature-1.5",
)
CHEAP = ("random-vectors", "random-adapters", "temperature-1.0", "temperature-1.5")
ALL = CONTROLS
TEMPERATURES = {"temperature-1.0": 1.0, "temperature-1.5": 1.5}
KINDS = {"random-vectors": ("vector",), "random-adapters": ("adapter",)}
"""Bank kinds a control applies to (those not listed apply to every kind)."""
KEYWORDS = {"cheap": CHEAP, "all": ALL}


@dataclass(frozen=True)
class ControlSpec:
    """Which controls to run.

    Attributes:
        names: control names, in :data:`CONTROLS` order.
        explicit: named one by one (a comma list): a name that does not apply to the bank's kind
            is refused instead of skipped, as ``cheap`` and ``all`` skip it.
    """

    names: tuple[str, ...]
    explicit: bool = False

    def for_kind(self, kind: str) -> tuple[str, ...]:
        """The names that apply to a bank of ``kind`` (``vector`` or ``adapter``).

        Raises:
            MelboError: an explicitly named control that does not apply to ``kind``.
        """
        ok = tuple(n for n in self.names if kind in KINDS.get(n, (kind,)))
        bad = [n for n in self.names if n not in ok]
        if self.explicit and bad:
            fits = [n for n in CONTROLS if kind in KINDS.get(n, (kind,))]
            raise MelboError(
                f"control {bad[0]!r} does not apply to {kind} banks; allowed for {kind} banks: {', '.join(fits)}"
            )
        return ok


def parse_controls(value: str | Sequence[str] | ControlSpec) -> ControlSpec:
    """The controls named by a ``--controls`` value: ``cheap``, ``all`` or a comma list of names
    from :data:`CONTROLS` (a list of names from the API).

    Raises:
        MelboError: an empty value or an unknown name (naming it and the allowed ones).
    """
    if isinstance(value, ControlSpec):
        return value
    text = value.strip() if isinstance(value, str) else None
    if text in KEYWORDS:
        return ControlSpec(KEYWORDS[text])
    items = [s.strip() for s in text.split(",")] if text is not None else [str(s).strip() for s in value]
    allowed = f"cheap, all, or a comma list of {', '.join(CONTROLS)}"
    if not items or not all(items):
        raise MelboError(f"bad controls {value!r}: an empty name; allowed: {allowed}")
    for s in items:
        if s not in CONTROLS:
            raise MelboError(f"unknown control {s!r} in {value!r}; allowed: {allowed}")
    return ControlSpec(tuple(n for n in CONTROLS if n in items), explicit=True)


class NoiseHandle(HookHandle):
    """Fresh Gaussian noise ``N(0, σ² I)`` added to the output of ``block`` at every position of
    every forward call (where ``positions`` says, :mod:`melbo.core.hooks`), drawn from
    ``generator`` (on the hidden states' device) in float32 and added in the hidden states' dtype.
    Also a context manager."""

    def __init__(self, block: nn.Module, sigma: float, generator: torch.Generator, positions: str = "all"):
        self.sigma = check_number("activation-noise σ", sigma, 0.0)
        self.generator = generator
        self.tracker = PositionTracker(positions)
        super().__init__(block)

    def _forward_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        hidden = block_output(output)
        mask = self.tracker.mask(hidden.shape[1])
        noise = torch.randn(hidden.shape, generator=self.generator, device=self.generator.device)
        noise = (self.sigma * noise).to(device=hidden.device, dtype=hidden.dtype)
        if mask is not None:
            noise = noise * mask.to(device=hidden.device, dtype=hidden.dtype)[None, :, None]
        return replace_block_output(output, hidden + noise)


def block_matrices(block: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The 2-D weight matrices of ``block`` (``(name, parameter)``; norms' 1-D weights and biases excluded)."""
    return [(n, p) for n, p in block.named_parameters() if p.dim() == 2]


@contextmanager
def weight_noise(block: nn.Module, relative: float, seed: int) -> Iterator[dict[str, float]]:
    """Context manager: inside it every 2-D weight matrix ``W`` of ``block`` is ``W + ΔW``, ``ΔW``
    Gaussian (drawn in float64 on the CPU from ``seed``, matrix after matrix) and scaled to
    ``‖ΔW‖_F = relative · ‖W‖_F`` exactly (before the cast to the weight's dtype). On exit, also
    on error, every matrix is copied back from a saved clone: restored bit-exactly.

    Yields:
        ``{matrix name: ‖ΔW‖_F}``.

    Raises:
        MelboError: ``relative`` < 0 or not finite; a block without 2-D weights.
    """
    relative = check_number("relative weight-noise size", relative, 0.0)
    mats = block_matrices(block)
    if not mats:
        raise MelboError(f"block {type(block).__name__} has no 2-D weight matrix to add noise to")
    saved = [p.detach().clone() for _, p in mats]
    g = torch.Generator().manual_seed(check_seed(seed))
    norms: dict[str, float] = {}
    try:
        with torch.no_grad():
            for name, p in mats:
                noise = torch.randn(tuple(p.shape), generator=g, dtype=torch.float64)
                noise *= relative * float(p.detach().double().norm()) / float(noise.norm())
                norms[name] = float(noise.norm())
                p.add_(noise.to(device=p.device, dtype=p.dtype))
        yield norms
    finally:
        with torch.no_grad():
            for (_, p), s in zip(mats, saved):
                p.copy_(s)


def effect_size(bank: Bank, count: int | None = None) -> float:
    """``E``: the per-position norm of the learned perturbations' change to the residual stream
    after the source block (module docstring), over the first ``count`` perturbations.

    Raises:
        MelboError: an adapter bank that recorded no ``perturbation_norm``.
    """
    k = len(bank) if count is None else min(count, len(bank))
    if bank.kind == "vector":
        return float(bank.vectors[:k].double().norm(dim=-1).mean())
    norms = [x for i in range(k) if isinstance(x := bank.info(i).get("perturbation_norm"), (int, float))]
    if not norms:
        raise MelboError("the adapter bank records no perturbation_norm, needed to size noise controls")
    return float(sum(norms) / len(norms))


def _residual_norm(bank: Bank) -> float:
    rho = bank.meta.get("residual_norm")
    if not isinstance(rho, (int, float)) or not rho > 0:
        raise MelboError("the bank records no residual_norm (the median residual norm), needed by weight-noise")
    return float(rho)


def _adapter_radii(bank: Bank, rand: Bank, k: int) -> torch.Tensor:
    """``[k]`` radii of the random adapters that match each learned adapter's ``‖R Ω_B Ω_Aᵀ‖_F``."""

    def fro(t: dict[str, torch.Tensor]) -> torch.Tensor:  # ‖Ω_B Ω_Aᵀ‖_F = sqrt(tr(Ω_BᵀΩ_B Ω_AᵀΩ_A))
        a, b = t["omega_a"][:k].double(), t["omega_b"][:k].double()
        return ((b.transpose(1, 2) @ b) * (a.transpose(1, 2) @ a)).sum((1, 2)).clamp(min=0).sqrt()

    return (float(bank.meta["radius"]) * fro(bank.tensors) / fro(rand.tensors)).float()


def describe_controls(bank: Bank, names: Sequence[str], count: int | None = None) -> dict[str, str]:
    """One line per control saying what it is and its size (for the reports)."""
    k = len(bank) if count is None else min(count, len(bank))
    out: dict[str, str] = {}
    for name in names:
        if name == "random-vectors":
            out[name] = f"{k} random directions of norm {effect_size(bank, k):.4g} (the bank's random baseline)"
        elif name == "random-adapters":
            out[name] = f"{k} random adapters, each ‖ΔW‖_F matched to the learned adapter's"
        elif name == "activation-noise":
            sigma = effect_size(bank, k) / math.sqrt(bank.d_model)
            out[name] = f"fresh N(0, σ²I) per position and pass, σ = E/√d = {sigma:.4g}"
        elif name == "weight-noise":
            rel = effect_size(bank, k) / _residual_norm(bank)
            out[name] = f"Gaussian ΔW on the source block's matrices, ‖ΔW‖_F = {rel:.4g} × ‖W‖_F (E/ρ)"
        else:
            out[name] = f"unsteered, sampled at T = {TEMPERATURES[name]:g}"
    return out


def run_controls(
    lm: LoadedModel,
    bank: Bank,
    prompts: list[str],
    gen_config: GenerationConfig,
    names: str | Sequence[str] | ControlSpec = "cheap",
    seed: int = 0,
    count: int | None = None,
    scale: float = 1.0,
) -> dict[str, list[list[str]]]:
    """Completions of ``prompts`` under each control (module docstring), as many per prompt as
    the bank's first ``count`` learned perturbations (default all).

    Args:
        lm: the model the bank was made for.
        bank: the learned perturbations (its random baseline, R, layers and ρ are read).
        prompts: ``n`` prompts.
        gen_config: generation settings of the learned completions (the temperature controls
            replace only its temperature and seed).
        names: ``cheap``, ``all``, a comma list or a :class:`ControlSpec` (:func:`parse_controls`).
        seed: the panel's seed.
        count: the budget ``k`` (learned perturbations evaluated).
        scale: multiplies every control's size (vectors, adapters' R, noise σ and ``ΔW``), like
            the scale at which learned perturbations were generated; temperatures ignore it.

    Returns:
        ``{control: completions}`` with ``completions[j][i]`` the ``j``-th of ``k`` samples on
        prompt ``i`` (the layout of :func:`melbo.core.generate.generate`).

    Raises:
        MelboError: unknown or inapplicable names, a model the bank was not made for, a bank
            without the random rows or sizes a control needs, bad prompts or settings.
    """
    chosen = parse_controls(names).for_kind(bank.kind)
    seed, scale = check_seed(seed), check_number("control scale", scale, 0.0)
    bank.check_model(lm)
    k = len(bank) if count is None else min(count, len(bank))
    layer = resolve_layer(bank.layer, lm.num_layers, "layer")
    out: dict[str, list[list[str]]] = {}
    for name in chosen:
        s = (seed * 1000 + CONTROLS.index(name)) % SEED_MAX
        if name == "random-vectors":
            vecs = bank.random_vectors
            if vecs is None or len(vecs) < k:
                vecs = random_vectors(k, bank.d_model, effect_size(bank, k), s)
            out[name] = generate(lm, prompts, vecs[:k], layer, scale, gen_config)
        elif name == "random-adapters":
            out[name] = generate_rows(lm, prompts, k, _random_adapters(lm, bank, k, scale, gen_config), gen_config)
        elif name == "activation-noise":
            sigma = scale * effect_size(bank, k) / math.sqrt(lm.d_model)
            gen = torch.Generator(device=lm.device).manual_seed(s)
            handle = partial(NoiseHandle, lm.blocks[layer], sigma, gen, gen_config.steer_positions)
            out[name] = generate_rows(lm, prompts, k, _per_call(handle), gen_config)
        elif name == "weight-noise":
            rel = scale * effect_size(bank, k) / _residual_norm(bank)
            comps = []
            for j in range(k):
                with weight_noise(lm.blocks[layer], rel, (s * 100_003 + j) % SEED_MAX):
                    comps.append(generate_rows(lm, prompts, 1, lambda rows: nullcontext(), gen_config)[0])
            out[name] = comps
        else:
            cfg = replace(gen_config, temperature=TEMPERATURES[name], seed=s)
            out[name] = generate_rows(lm, prompts, k, lambda rows: nullcontext(), cfg)
    return out


def _per_call(make: Callable[[], AbstractContextManager]) -> Callable[[list[int]], AbstractContextManager]:
    """``apply(rows)`` that ignores the rows: the same perturbation (a fresh ``make()``) for every row."""
    return lambda rows: make()


def _random_adapters(
    lm: LoadedModel, bank: Bank, k: int, scale: float, gen_config: GenerationConfig
) -> Callable[[list[int]], AbstractContextManager]:
    """``apply(rows)`` for :func:`melbo.core.generate.generate_rows`: the bank's first ``k`` random
    adapters, each at the radius that matches its learned adapter's ``‖ΔW‖_F``, times ``scale``."""
    rand = bank.random
    if rand is None or len(rand) < k:
        raise MelboError(f"the adapter bank holds fewer than {k} random adapters for random-adapters")
    if gen_config.steer_positions != "all":
        raise MelboError("adapters change the model at every position; random-adapters needs steering positions all")
    a, b = rand.tensors["omega_a"][:k], rand.tensors["omega_b"][:k]
    r = _adapter_radii(bank, rand, k) * scale
    module = module_by_name(lm, str(bank.meta["module_name"]))
    return lambda rows: apply_adapter(module, a[rows], b[rows], r[rows])
