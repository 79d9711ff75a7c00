"""Unsupervised steering adapters (METHOD.md section 2).

A rank-r perturbation of the MLP output (down-projection) weight of block ``src``:

    W' = W + R · Ω_B Ω_Aᵀ,   Ω_A ∈ R^{d_hidden×r} (unit-norm rows),  Ω_B ∈ R^{d_model×r} (unit-norm columns)

so that the module's output on an MLP hidden activation ``x`` gains ``R · Ω_B Ω_Aᵀ x``. melbo
applies it as a forward hook on that module (:class:`AdapterHook`), which works the same for
``nn.Linear`` and for GPT-2's transposed ``Conv1D``, and for ``V`` adapters at once (one per
group of batch rows). Training uses the MELBO objective of section 1 on the truncated pass:
:class:`AdapterSlice` runs block ``src`` (with the adapter) from its captured inputs, then the
core :class:`melbo.objective.Slice` runs blocks ``src+1..tgt``. Each step projects the gradient
onto the tangent space of the constraint (each row of Ω_A, each column of Ω_B on its unit
sphere), takes an AdamW (AMSGrad) step and renormalizes rows/columns, as the reference notebook
does. Adapters are independent (no orthogonality between them), so several are trained in one
batch; Adam is elementwise, so that is the same as training them one after another.

Export: each adapter is a standard PEFT LoRA folder (``adapter_config.json``,
``adapter_model.safetensors``) with ``r = lora_alpha`` (PEFT's scale ``lora_alpha / r = 1``),
``lora_A.weight = Ω_Aᵀ`` ``[r, d_hidden]`` and ``lora_B.weight = R · Ω_B`` ``[d_model, r]``, plus
``melbo_adapter.json``. ``PeftModel.from_pretrained(base, folder)`` gives the same logits as
melbo's own hook. Note that the reference notebook passed its "R = 0.35" as ``lora_alpha`` with
``r = 512``, i.e. an effective melbo ``R = 0.35 / 512 ≈ 6.8e-4``.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

import melbo
from melbo.bank import atomic_write
from melbo.errors import MelboError
from melbo.models import LoadedModel
from melbo.objective import Slice, repeat_batch, melbo_objective
from melbo.prompts import PromptBatch
from melbo.steer import HookHandle, block_output
from melbo.train import TrainConfig

# Dotted paths (inside a decoder block) of the MLP output projection, most common first:
# Llama, Mistral, Qwen2/3, Gemma/Gemma2, OLMo, Phi-3: mlp.down_proj; GPT-2 (Conv1D) and Qwen-1:
# mlp.c_proj; GPT-NeoX and Falcon: mlp.dense_4h_to_h; GPT-J: mlp.fc_out; Phi: mlp.fc2; OPT: fc2.
MLP_OUT_PATHS = (
    "mlp.down_proj",
    "mlp.c_proj",
    "mlp.dense_4h_to_h",
    "mlp.fc_out",
    "mlp.fc2",
    "fc2",
    "feed_forward.w2",
    "mlp.w2",
    "ffn.down_proj",
)

ADAPTERS = "adapters.safetensors"
ADAPTERS_FORMAT = "melbo.adapters/1"
ADAPTER_META = "melbo_adapter.json"
PEFT_DIR = "peft"


# ---------------------------------------------------------------- finding the MLP output

@dataclass
class MlpOut:
    """The MLP output module of one block.

    Attributes:
        module: the ``nn.Linear`` (or subclass) or ``transformers`` ``Conv1D``.
        path: its dotted path inside the block (e.g. ``"mlp.down_proj"``).
        full_name: its dotted path inside the model (what PEFT's ``target_modules`` names).
        d_hidden: input width (the MLP hidden size).
        d_model: output width (the residual stream).
        conv1d: True for GPT-2-style ``Conv1D`` (weight stored ``[d_hidden, d_model]``).
    """

    module: nn.Module
    path: str
    full_name: str
    d_hidden: int
    d_model: int
    conv1d: bool


def _get(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """``(in_features, out_features, is_conv1d)`` of a linear layer, or None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        w = module.weight
        return int(w.shape[0]), int(w.shape[1]), True
    return None


def find_mlp_out(lm: LoadedModel, layer: int, path: str | None = None) -> MlpOut:
    """The MLP output projection of block ``layer``.

    Args:
        lm: the model.
        layer: block index (already resolved, ``0..L-1``).
        path: dotted path inside the block that overrides the search (``--mlp-module``).

    Raises:
        MelboError: the path names no linear layer with output width ``d_model``, or none of
            :data:`MLP_OUT_PATHS` exists in the block (then pass ``path``).
    """
    block = lm.blocks[layer]
    d = lm.d_model
    tried = (path,) if path else MLP_OUT_PATHS
    for p in tried:
        mod = _get(block, p)
        dims = linear_dims(mod) if isinstance(mod, nn.Module) else None
        if dims is None:
            continue
        if dims[1] != d:
            if path:
                raise MelboError(f"--mlp-module {path!r} outputs {dims[1]} features, not d_model={d}; "
                                 f"give the MLP's output (down) projection")
            continue
        names = {id(m): n for n, m in lm.model.named_modules()}
        return MlpOut(mod, p, names[id(mod)], dims[0], dims[1], dims[2])
    linears = [n for n, m in block.named_modules() if linear_dims(m) is not None and linear_dims(m)[1] == d]
    if path:
        raise MelboError(f"--mlp-module {path!r} is not a linear layer of block {layer} "
                         f"({type(block).__name__}); linear layers there with output d_model: {', '.join(linears) or 'none'}")
    raise MelboError(f"cannot find the MLP output projection of {type(block).__name__} (tried {', '.join(MLP_OUT_PATHS)}); "
                     f"pass its dotted path inside the block with --mlp-module (candidates: {', '.join(linears) or 'none'})")


# ---------------------------------------------------------------- applying adapters

class AdapterHook(HookHandle):
    """Adds ``radius · Ω_B Ω_Aᵀ x`` to the output of an MLP output module (a forward hook).

    Args:
        module: the MLP output module (its input ``x`` is ``[..., d_hidden]``).
        omega_a: ``[d_hidden, r]`` (one adapter) or ``[V, d_hidden, r]`` (adapter ``v`` acts on
            the ``v``-th of ``V`` equal groups of batch rows, vector-major like
            :meth:`melbo.objective.Slice.run_blocks`).
        omega_b: ``[d_model, r]`` or ``[V, d_model, r]``.
        radius: R, a float or a ``[V]`` tensor (one per adapter); 0 leaves the model unchanged.

    Computed in the module output's dtype. Also a context manager; :meth:`remove` detaches it.

    Raises:
        MelboError: shapes that do not fit each other.
    """

    def __init__(self, module: nn.Module, omega_a: torch.Tensor, omega_b: torch.Tensor,
                 radius: float | torch.Tensor = 1.0):
        if omega_a.dim() != omega_b.dim() or omega_a.dim() not in (2, 3) or omega_a.shape[-1] != omega_b.shape[-1] \
                or (omega_a.dim() == 3 and omega_a.shape[0] != omega_b.shape[0]):
            raise MelboError(f"adapter factors of shapes {tuple(omega_a.shape)} and {tuple(omega_b.shape)} do not fit: "
                             f"use Ω_A [d_hidden, r] with Ω_B [d_model, r], or [V, d_hidden, r] with [V, d_model, r]")
        self.omega_a, self.omega_b, self.radius = omega_a, omega_b, radius
        super().__init__(module)

    def _forward_hook(self, module, args, output):
        x = args[0]
        a = self.omega_a.to(device=output.device, dtype=output.dtype)
        b = self.omega_b.to(device=output.device, dtype=output.dtype)
        r = self.radius
        if a.dim() == 2:
            delta = (x @ a) @ b.T
            return output + (r.to(output) if torch.is_tensor(r) else r) * delta
        V = a.shape[0]
        if x.shape[0] % V:
            raise MelboError(f"{V} adapters cannot split a batch of {x.shape[0]} rows evenly")
        xg = x.reshape(V, -1, x.shape[-1])  # [V, rows*T, d_hidden]
        delta = torch.bmm(torch.bmm(xg, a), b.transpose(1, 2))  # [V, rows*T, d_model]
        if torch.is_tensor(r):
            delta = delta * r.to(delta)[:, None, None]
        else:
            delta = delta * r
        return output + delta.reshape(output.shape)

@contextmanager
def apply_adapter(module: nn.Module, omega_a: torch.Tensor, omega_b: torch.Tensor,
                  radius: float | torch.Tensor = 1.0) -> Iterator[None]:
    """Context manager: inside it, ``module``'s output gains ``radius · Ω_B Ω_Aᵀ x`` (see
    :class:`AdapterHook`). The hook is always removed."""
    hook = AdapterHook(module, omega_a, omega_b, radius)
    try:
        yield
    finally:
        hook.remove()


# ---------------------------------------------------------------- the constraint

def normalize_adapter(omega_a: torch.Tensor, omega_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows of Ω_A (``[..., d_hidden, r]``, each row in R^r) and unit columns of Ω_B
    (``[..., d_model, r]``, each column in R^d_model), METHOD.md section 2."""
    return (nn.functional.normalize(omega_a, dim=-1), nn.functional.normalize(omega_b, dim=-2))


def tangent_adapter(grad_a: torch.Tensor, grad_b: torch.Tensor, omega_a: torch.Tensor,
                    omega_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients projected onto the tangent space of the constraint: each row of ``grad_a``
    loses its component along that (unit) row of Ω_A, each column of ``grad_b`` along that
    column of Ω_B."""
    ga = grad_a - (grad_a * omega_a).sum(-1, keepdim=True) * omega_a
    gb = grad_b - (grad_b * omega_b).sum(-2, keepdim=True) * omega_b
    return ga, gb


def adapter_start(index: int, d_hidden: int, d_model: int, rank: int, seed: int,
                  stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random start of adapter ``index``: Gaussian Ω_A ``[d_hidden, r]`` and Ω_B ``[d_model, r]``
    drawn from ``(seed, stream, index)`` alone, normalized. float32. ``stream`` 0 gives the
    learned adapters' starts, 1 the random baseline."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + stream * 7_919_993 + 424_243 + index)
    a = torch.randn(d_hidden, rank, generator=g, dtype=torch.float64)
    b = torch.randn(d_model, rank, generator=g, dtype=torch.float64)
    a, b = normalize_adapter(a, b)
    return a.float(), b.float()


def relative_adapter_radius(aslice: "AdapterSlice", k: float, n: int, rank: int, seed: int) -> float:
    """R for a relative radius ``"<k>x"`` (METHOD.md section 2 applied with section 1's scale):
    the R at which the first ``n`` random starts (:func:`adapter_start`) add, on average over
    the counted positions, ``k ×`` the mean residual norm at the source to the MLP output."""
    mlp = aslice.mlp
    a0, b0 = zip(*[adapter_start(i, mlp.d_hidden, mlp.d_model, rank, seed) for i in range(n)])
    unit = aslice.perturbation_norm(torch.stack(a0), torch.stack(b0), 1.0).mean().item()
    return k * aslice.mean_norm() / unit


def random_adapters(n: int, d_hidden: int, d_model: int, rank: int, seed: int,
                    stream: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random adapters (the baseline, METHOD.md section 1 applied to adapters):
    ``([n, d_hidden, r], [n, d_model, r])`` float32, each drawn by :func:`adapter_start`."""
    pairs = [adapter_start(k, d_hidden, d_model, rank, seed, stream) for k in range(n)]
    if not pairs:
        return torch.zeros(0, d_hidden, rank), torch.zeros(0, d_model, rank)
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


# ---------------------------------------------------------------- the truncated pass

class AdapterSlice:
    """``h_src`` computed with adapters on block ``src``, then blocks ``src+1..tgt`` (the core
    :class:`melbo.objective.Slice`), on a fixed prompt batch.

    One full forward (the Slice's own) also records the inputs of block ``src`` and of its MLP
    output module; each evaluation runs block ``src`` (with the adapters hooked in) and then
    ``slice.run_blocks``, for ``V`` adapters at once. Blocks ``0..src-1``, those after ``tgt``
    and the LM head never run.

    Attributes:
        slice: the core Slice (``z0 [n, T, d]``, ``mask [n, T]``, ``h_src``).
        mlp: the :class:`MlpOut` of block ``src``.
        mlp_in: ``[n, T, d_hidden]`` the MLP output module's input (unsteered).
    """

    def __init__(self, lm: LoadedModel, batch: PromptBatch, src: int, tgt: int, mlp: MlpOut | None = None):
        self.mlp = mlp or find_mlp_out(lm, src)
        self.src, self.tgt, self.blocks = src, tgt, lm.blocks
        got: dict = {}

        def keep_block_inputs(module, args, kwargs):
            kwargs = dict(kwargs)
            if args:
                got["x"], got["args"] = args[0], tuple(args[1:])
            else:
                got["x"], got["args"] = kwargs.pop("hidden_states"), ()
            got["kwargs"] = kwargs

        def keep_mlp_input(module, args, output):
            got["mlp_in"] = args[0].detach()

        hooks = [lm.blocks[src].register_forward_pre_hook(keep_block_inputs, with_kwargs=True),
                 self.mlp.module.register_forward_hook(keep_mlp_input)]
        try:
            self.slice = Slice(lm.model, lm.blocks, batch, src, tgt)
        finally:
            for h in hooks:
                h.remove()
        self._x, self._args, self._kwargs = got["x"].detach(), got["args"], got["kwargs"]
        self.n = self.slice.n
        self.mlp_in = got["mlp_in"].reshape(*self.slice.mask.shape, -1)

    @property
    def z0(self) -> torch.Tensor:
        return self.slice.z0

    @property
    def mask(self) -> torch.Tensor:
        return self.slice.mask

    @property
    def d_model(self) -> int:
        return self.slice.d_model

    def source(self, omega_a: torch.Tensor, omega_b: torch.Tensor, radius: float | torch.Tensor) -> torch.Tensor:
        """``h_src`` with each adapter applied: ``[V*n, T, d_model]`` (vector-major)."""
        V = omega_a.shape[0]
        x = self._x.repeat(V, *([1] * (self._x.dim() - 1)))
        args = repeat_batch(self._args, self.n, V)
        kwargs = repeat_batch(self._kwargs, self.n, V)
        with apply_adapter(self.mlp.module, omega_a, omega_b, radius):
            out = self.blocks[self.src](x, *args, **kwargs)
        return block_output(out)

    def __call__(self, omega_a: torch.Tensor, omega_b: torch.Tensor, radius: float | torch.Tensor) -> torch.Tensor:
        """Target activations under each adapter.

        Args:
            omega_a: ``[V, d_hidden, r]``; omega_b: ``[V, d_model, r]``; radius: R (float or ``[V]``).

        Returns:
            ``[V, n, T, d_model]``, ``Z(Ω_v)`` for every adapter and prompt (METHOD.md section 2).
        """
        V = omega_a.shape[0]
        h = self.source(omega_a, omega_b, radius)
        return self.slice.run_blocks(h).reshape(V, *self.z0.shape)

    def perturbation_norm(self, omega_a: torch.Tensor, omega_b: torch.Tensor,
                          radius: float | torch.Tensor = 1.0) -> torch.Tensor:
        """``[V]``: mean over the counted positions of ``‖R · Ω_B Ω_Aᵀ x_t‖₂``, the size of what
        each adapter adds to the MLP output (residual-stream units) on the unsteered input."""
        with torch.no_grad():
            x = self.mlp_in.float()
            a = omega_a.to(x.device).float()  # [V, d_hidden, r]
            b = omega_b.to(x.device).float()  # [V, d_model, r]
            delta = torch.einsum("vntr,vdr->vntd", torch.einsum("nth,vhr->vntr", x, a), b)
            r = radius.to(delta)[:, None, None] if torch.is_tensor(radius) else radius
            norms = delta.norm(dim=-1) * r
            return norms[:, self.mask].mean(-1).cpu()

    def mean_norm(self) -> float:
        """Mean ‖h_src‖₂ over the counted positions (see :meth:`melbo.objective.Slice.mean_norm`)."""
        return self.slice.mean_norm()


# ---------------------------------------------------------------- training

@dataclass
class AdapterConfig(TrainConfig):
    """Hyper-parameters of a steering-adapter run (METHOD.md section 2), beside those of
    :class:`melbo.train.TrainConfig` (``num_vectors`` is the number of adapters; ``radius`` is
    R of ``W' = W + R Ω_B Ω_Aᵀ``).

    Attributes:
        rank: r (>= 1).
        batch: adapters trained at once (they are independent, so this changes speed only).
        lr: ``None`` gives ``0.045 / sqrt(d_model)``: the reference's lr 1e-3 at d_model 2048,
            a step of ≈ 4.5% of each unit column of Ω_B per Adam step (METHOD.md section 1's
            rule, lr·√d relative to the sphere, applied to the columns).
    """

    rank: int = 8
    batch: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.rank) != self.rank or self.rank < 1:
            raise MelboError(f"adapter rank must be a whole number >= 1, got {self.rank!r}")
        if int(self.batch) != self.batch or self.batch < 1:
            raise MelboError(f"adapter batch must be a whole number >= 1, got {self.batch!r}")

    def learning_rate(self, d_model: int) -> float:
        return self.lr if self.lr is not None else 0.045 / math.sqrt(d_model)


@dataclass
class AdapterResult:
    """One trained adapter.

    Attributes:
        omega_a: ``[d_hidden, r]`` unit rows; omega_b: ``[d_model, r]`` unit columns (float32).
        start_a, start_b: the random start.
        start_objective, objective: the MELBO objective at the start and at the end.
        cosine_start_end: cosine between ``Ω_B Ω_Aᵀ`` at the start and at the end (flattened);
            near 1 means the adapter did not move.
        start_perturbation_norm, perturbation_norm: mean ‖R Ω_B Ω_Aᵀ x_t‖ at start and end.
        history: objective before each step. seconds: this adapter's share of the batch's time.
    """

    omega_a: torch.Tensor
    omega_b: torch.Tensor
    start_a: torch.Tensor
    start_b: torch.Tensor
    start_objective: float
    objective: float
    cosine_start_end: float
    start_perturbation_norm: float
    perturbation_norm: float
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0


def make_adapter_optimizer(params: list[torch.Tensor], cfg: AdapterConfig, d_model: int) -> torch.optim.Optimizer:
    """AdamW with AMSGrad and the reference's betas (as for vectors), lr of :meth:`AdapterConfig.learning_rate`."""
    return torch.optim.AdamW(params, lr=cfg.learning_rate(d_model), betas=cfg.betas,
                             weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad)


def adapter_objective(aslice: AdapterSlice, omega_a: torch.Tensor, omega_b: torch.Tensor,
                      cfg: TrainConfig) -> torch.Tensor:
    """``[V]`` MELBO objective (METHOD.md section 1) of ``V`` adapters at radius ``cfg.radius``."""
    return melbo_objective(aslice(omega_a, omega_b, cfg.radius), aslice.z0, aslice.mask, cfg.p, cfg.q)


def adapter_step(aslice: AdapterSlice, omega_a: torch.Tensor, omega_b: torch.Tensor,
                 opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.Tensor:
    """One projected ascent step on ``V`` adapters (leaves ``[V, d_hidden, r]`` and
    ``[V, d_model, r]`` that require grad): gradient of the objective, projected onto the
    tangent space of the constraint; AdamW step; rows of Ω_A and columns of Ω_B renormalized.

    Returns the ``[V]`` objective *before* the step (detached).
    """
    opt.zero_grad(set_to_none=True)
    obj = adapter_objective(aslice, omega_a, omega_b, cfg)
    (-obj.sum()).backward()
    with torch.no_grad():
        ga, gb = tangent_adapter(omega_a.grad, omega_b.grad, omega_a, omega_b)
        omega_a.grad, omega_b.grad = ga, gb
    opt.step()
    with torch.no_grad():
        a, b = normalize_adapter(omega_a, omega_b)
        omega_a.copy_(a)
        omega_b.copy_(b)
    return obj.detach()


def _product_cosine(a0, b0, a1, b1) -> torch.Tensor:
    p0 = torch.einsum("vdr,vhr->vdh", b0.double(), a0.double()).flatten(1)
    p1 = torch.einsum("vdr,vhr->vdh", b1.double(), a1.double()).flatten(1)
    return nn.functional.cosine_similarity(p0, p1, dim=1)


def train_adapters(aslice: AdapterSlice, cfg: AdapterConfig, on_batch=None,
                   show_progress: bool = True) -> list[AdapterResult]:
    """Train ``cfg.num_vectors`` adapters from independent seeded random starts, ``cfg.batch`` at
    a time.

    Args:
        aslice: the truncated pass on the training prompts.
        cfg: hyper-parameters (R, r, p, q, steps, lr, seed, ...).
        on_batch: called with the list of all results so far after each batch (e.g. to save).

    Returns:
        one :class:`AdapterResult` per adapter, in order.
    """
    mlp = aslice.mlp
    device = aslice.z0.device
    results: list[AdapterResult] = []
    with tqdm(total=cfg.num_vectors * cfg.steps, desc="MELBO adapters", unit="adapter-step",
              disable=not show_progress, dynamic_ncols=True) as bar:
        for first in range(0, cfg.num_vectors, cfg.batch):
            idx = list(range(first, min(cfg.num_vectors, first + cfg.batch)))
            t0 = time.perf_counter()
            starts = [adapter_start(k, mlp.d_hidden, mlp.d_model, cfg.rank, cfg.seed) for k in idx]
            a0 = torch.stack([s[0] for s in starts])
            b0 = torch.stack([s[1] for s in starts])
            a = a0.to(device).clone().requires_grad_(True)
            b = b0.to(device).clone().requires_grad_(True)
            opt = make_adapter_optimizer([a, b], cfg, mlp.d_model)
            history = []
            for _ in range(cfg.steps):
                history.append(adapter_step(aslice, a, b, opt, cfg).cpu())
                bar.update(len(idx))
                bar.set_postfix(adapters=f"{idx[0]}-{idx[-1]}", objective=f"{history[-1].mean():.4g}", refresh=False)
            with torch.no_grad():
                final = adapter_objective(aslice, a, b, cfg).cpu()
            a1, b1 = a.detach().float().cpu(), b.detach().float().cpu()
            cos = _product_cosine(a0, b0, a1, b1)
            pn0 = aslice.perturbation_norm(a0, b0, cfg.radius)
            pn1 = aslice.perturbation_norm(a1, b1, cfg.radius)
            hist = torch.stack(history) if history else final[None]
            secs = (time.perf_counter() - t0) / len(idx)
            for j in range(len(idx)):
                results.append(AdapterResult(a1[j], b1[j], a0[j], b0[j], float(hist[0, j]), float(final[j]),
                                             float(cos[j]), float(pn0[j]), float(pn1[j]),
                                             hist[:, j].tolist(), secs))
            if on_batch is not None:
                on_batch(results)
    return results


# ---------------------------------------------------------------- PEFT export and loading

@dataclass
class LoadedAdapter:
    """An adapter read from a PEFT LoRA folder, ready for :class:`AdapterHook`.

    ``omega_a = lora_A.weightᵀ`` ``[d_hidden, r]``, ``omega_b = lora_B.weight`` ``[d_model, r]``,
    ``scale`` PEFT's ``lora_alpha / r`` (or ``/ √r`` with rsLoRA): the module's output gains
    ``scale · omega_b omega_aᵀ x``. ``module_name`` is the target module's path in the model.
    """

    omega_a: torch.Tensor
    omega_b: torch.Tensor
    scale: float
    module_name: str
    meta: dict
    path: str


def save_peft_adapter(folder: str | os.PathLike, lm: LoadedModel, mlp: MlpOut, omega_a: torch.Tensor,
                      omega_b: torch.Tensor, radius: float, meta: dict | None = None) -> Path:
    """Write one adapter as a standard PEFT LoRA folder (see the module docstring).

    Args:
        folder: created if needed; its adapter files are replaced.
        mlp: the target module; omega_a ``[d_hidden, r]``; omega_b ``[d_model, r]``; radius R.
        meta: extra JSON metadata for ``melbo_adapter.json``.

    Returns the folder. ``PeftModel.from_pretrained(base_model, folder)`` loads it.
    """
    from peft import LoraConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    r = int(omega_a.shape[-1])
    cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, bias="none", target_modules=[mlp.full_name],
                     fan_in_fan_out=mlp.conv1d, task_type="CAUSAL_LM", base_model_name_or_path=lm.name)
    cfg.save_pretrained(str(folder))
    prefix = f"base_model.model.{mlp.full_name}"
    tensors = {f"{prefix}.lora_A.weight": omega_a.detach().float().cpu().T.contiguous(),
               f"{prefix}.lora_B.weight": (float(radius) * omega_b.detach().float().cpu()).contiguous()}
    atomic_write(folder / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    info = {"format": "melbo.adapter/1", "melbo_version": melbo.__version__, "module": mlp.path,
            "module_name": mlp.full_name, "rank": r, "radius": float(radius),
            "peft_scale": 1.0, "note": "lora_A.weight = Ω_Aᵀ, lora_B.weight = R·Ω_B, lora_alpha = r",
            **(meta or {})}
    atomic_write(folder / ADAPTER_META, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))
    return folder


def load_peft_adapter(folder: str | os.PathLike) -> LoadedAdapter:
    """Read a PEFT LoRA folder with one target module (melbo's, or any such LoRA adapter).

    Raises:
        MelboError: no such folder or files, not a LoRA adapter, DoRA, or several target modules.
    """
    folder = Path(folder)
    cfg_path, w_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise MelboError(f"{str(folder)!r} is not a PEFT adapter folder (needs adapter_config.json and "
                         f"adapter_model.safetensors); give a folder written by melbo train --kind adapter")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        raise MelboError(f"adapter {str(folder)!r} is {cfg.get('peft_type')}{' (DoRA)' if cfg.get('use_dora') else ''}; "
                         f"melbo applies plain LoRA adapters only")
    with safe_open(str(w_path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    a_keys = [k for k in tensors if k.endswith(".lora_A.weight")]
    if len(a_keys) != 1:
        raise MelboError(f"adapter {str(folder)!r} has {len(a_keys)} LoRA modules; melbo applies adapters of one module")
    name = a_keys[0][: -len(".lora_A.weight")]
    b_key = name + ".lora_B.weight"
    if b_key not in tensors:
        raise MelboError(f"adapter {str(folder)!r} has {a_keys[0]} but no {b_key}")
    module_name = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    meta_path = folder / ADAPTER_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return LoadedAdapter(tensors[a_keys[0]].float().T.contiguous(), tensors[b_key].float(), scale,
                         module_name, meta, str(folder))


def adapter_module(lm: LoadedModel, module_name: str) -> nn.Module:
    """The module named ``module_name`` in ``lm.model`` (an adapter's target).

    Raises:
        MelboError: no such module.
    """
    mod = dict(lm.model.named_modules()).get(module_name)
    if mod is None:
        raise MelboError(f"the adapter targets module {module_name!r}, which model {lm.name!r} does not have; "
                         f"apply it to the model it was trained on")
    return mod


# ---------------------------------------------------------------- adapter banks

def save_adapters(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write a run's adapters (``omega_a [N, d_hidden, r]``, ``omega_b [N, d_model, r]``,
    ``random_omega_a``, ``random_omega_b``, ``start_omega_a``, ``start_omega_b``) with the run's
    metadata (the bank's keys, ``kind = "adapter"``) atomically, like :func:`melbo.bank.save_bank`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": ADAPTERS_FORMAT, "melbo_version": melbo.__version__, **meta}
    data = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(data, tmp, metadata={"melbo": json.dumps(meta)}))
    return path


def load_adapters(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read ``adapters.safetensors`` (a file, or a run folder holding one): (tensors, metadata).

    Raises:
        MelboError: no such file or not a melbo adapter bank.
    """
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTERS
    if not path.is_file():
        raise MelboError(f"no adapter bank at {str(path)!r}; give the folder of a melbo train --kind adapter run")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("melbo")
            tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise MelboError(f"{str(path)!r} is not a readable safetensors file: {e}") from e
    if raw is None or "omega_a" not in tensors:
        raise MelboError(f"{str(path)!r} is not a melbo adapter bank (no 'melbo' metadata or 'omega_a')")
    return tensors, json.loads(raw)


# ---------------------------------------------------------------- generation and a whole run

def generate_with_adapters(lm: LoadedModel, prompts: list[str], module: nn.Module, omega_a: torch.Tensor,
                           omega_b: torch.Tensor, radius: float | torch.Tensor, cfg=None) -> list[list[str]]:
    """Completions of every prompt under every adapter, batched over adapters.

    Args:
        module: the adapters' target (MLP output) module.
        omega_a: ``[V, d_hidden, r]``; omega_b: ``[V, d_model, r]``; radius: float or ``[V]``
            (an adapter with radius 0 gives the unsteered completion).
        cfg: :class:`melbo.generate.GenerationConfig`; up to ``cfg.batch_size`` rows (adapters x
            prompts) per ``generate`` call.

    Returns:
        ``completions[v][i]`` as :func:`melbo.generate.generate` returns them.
    """
    from dataclasses import replace

    from melbo.generate import GenerationConfig, generate

    cfg = cfg or GenerationConfig()
    n = len(prompts)
    per = max(1, cfg.batch_size // max(1, n))
    out: list[list[str]] = []
    for s in range(0, omega_a.shape[0], per):
        a, b = omega_a[s:s + per], omega_b[s:s + per]
        r = radius[s:s + per] if torch.is_tensor(radius) else radius
        # generate() runs rows vector-major in one call of len(a) * n rows: adapter v acts on group v.
        sub = replace(cfg, batch_size=len(a) * n)
        with apply_adapter(module, a, b, r):
            out += generate(lm, prompts, torch.zeros(len(a), lm.d_model), 0, 0.0, sub)
    return out


def run_adapter_train(spec, rank: int | None = None, mlp_module: str | None = None, batch: int = 8,
                      lm: LoadedModel | None = None) -> dict:
    """Train steering adapters end to end and write the run folder. Returns the summary.

    The folder holds ``adapters.safetensors`` (all learned adapters, their starts and the random
    baseline, with the bank's metadata and ``kind = "adapter"``), ``peft/adapter_NNN/`` (one
    PEFT LoRA folder per learned adapter), ``completions.jsonl`` (unsteered, learned, random),
    ``summary.json`` and ``summary.md`` (as for vectors, :mod:`melbo.run`).

    Args:
        spec: a :class:`melbo.run.RunSpec` (``num_vectors`` adapters). ``radius`` is R of
            ``W' = W + R Ω_B Ω_Aᵀ``, or ``"<k>x"``: R chosen so that the random starts add, on
            average over the counted positions, ``k ×`` the mean residual norm at the source
            to the MLP output (training then grows it: see ``perturbation_norm`` per adapter).
        rank: r (default ``min(64, d_model)``).
        mlp_module: dotted path of the MLP output inside a block (default: found by name).
        batch: adapters trained at once.

    Raises:
        MelboError: bad input (checked before anything is written); ``spec.resume`` (adapter
            runs cannot be resumed).
    """
    from melbo.bank import model_meta
    from melbo.models import check_layers, default_layers, load_model
    from melbo.prompts import check_prompts, encode_prompts, parse_positions
    from melbo.run import SUMMARY, parse_radius, write_completions

    check_prompts(spec.prompts)
    for p in spec.heldout:
        check_prompts([p])
    positions = parse_positions(spec.positions)
    r_value, r_relative = parse_radius(spec.radius)
    if rank is not None and (int(rank) != rank or rank < 1):
        raise MelboError(f"adapter rank must be a whole number >= 1, got {rank!r}")
    AdapterConfig(radius=1.0, p=spec.p, q=spec.q, num_vectors=spec.num_vectors, steps=spec.steps, lr=spec.lr,
                  rank=rank or 1, batch=batch)
    if spec.resume:
        raise MelboError("--resume is not supported for --kind adapter; start a new run with another --out")
    out = Path(spec.out)
    if (out / ADAPTERS).exists() or (out / "bank.safetensors").exists():
        raise MelboError(f"{str(out)!r} already holds a run; choose another --out")
    if out.exists() and not out.is_dir():
        raise MelboError(f"--out {str(out)!r} is a file, not a folder")

    lm = lm or load_model(spec.model, spec.device, spec.dtype, spec.blocks_path)
    L = lm.num_layers
    d_src, d_tgt = default_layers(L)
    src, tgt = check_layers(d_src if spec.source_layer is None else spec.source_layer,
                            d_tgt if spec.target_layer is None else spec.target_layer, L)
    mlp = find_mlp_out(lm, src, mlp_module)
    rank = int(rank or min(64, lm.d_model))
    batch_ = encode_prompts(lm.tokenizer, spec.prompts, positions, spec.generation.chat)
    aslice = AdapterSlice(lm, batch_, src, tgt, mlp)
    residual_norm = aslice.mean_norm()
    N = spec.num_vectors
    radius = relative_adapter_radius(aslice, r_value, N, rank, spec.seed) if r_relative else r_value
    cfg = AdapterConfig(radius=radius, p=spec.p, q=spec.q, num_vectors=N, steps=spec.steps, lr=spec.lr,
                        seed=spec.seed, rank=rank, batch=batch)
    meta = {
        **model_meta(lm), "method": "melbo", "kind": "adapter", "rank": rank, "module": mlp.path,
        "module_name": mlp.full_name, "d_hidden": mlp.d_hidden,
        "source_layer": src, "target_layer": tgt, "radius": radius, "radius_spec": str(spec.radius),
        "residual_norm": residual_norm, "p": spec.p, "q": spec.q, "positions": str(positions),
        "prompts": list(spec.prompts), "chat": spec.generation.chat, "steps": spec.steps,
        "lr": cfg.learning_rate(lm.d_model), "lr_spec": spec.lr, "betas": list(cfg.betas),
        "weight_decay": cfg.weight_decay, "seed": spec.seed, "vectors": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    ra, rb = random_adapters(N, mlp.d_hidden, mlp.d_model, rank, spec.seed)

    def tensors_of(results):
        return {"omega_a": torch.stack([r.omega_a for r in results]), "omega_b": torch.stack([r.omega_b for r in results]),
                "start_omega_a": torch.stack([r.start_a for r in results]),
                "start_omega_b": torch.stack([r.start_b for r in results]),
                "random_omega_a": ra, "random_omega_b": rb}

    def save(results):
        meta["vectors"] = []
        for k, r in enumerate(results):
            folder = out / PEFT_DIR / f"adapter_{k:03d}"
            info = {"index": k, "objective": r.objective, "start_objective": r.start_objective,
                    "cosine_start_end": r.cosine_start_end, "seconds": r.seconds,
                    "perturbation_norm": r.perturbation_norm, "start_perturbation_norm": r.start_perturbation_norm,
                    "peft_folder": str(Path(PEFT_DIR) / folder.name)}
            meta["vectors"].append(info)
            if not (folder / "adapter_model.safetensors").exists():
                save_peft_adapter(folder, lm, mlp, r.omega_a, r.omega_b, radius,
                                  {**model_meta(lm), "source_layer": src, "target_layer": tgt, **info})
        save_adapters(out / ADAPTERS, tensors_of(results), meta)

    t0 = time.perf_counter()
    results = train_adapters(aslice, cfg, on_batch=save, show_progress=spec.show_progress)
    train_seconds = time.perf_counter() - t0
    with torch.no_grad():
        rand_obj = torch.cat([adapter_objective(aslice, ra[s:s + batch].to(aslice.z0.device),
                                                rb[s:s + batch].to(aslice.z0.device), cfg).cpu()
                              for s in range(0, N, batch)])
    meta["random_objectives"] = rand_obj.tolist()
    meta["random_perturbation_norms"] = aslice.perturbation_norm(ra, rb, radius).tolist()
    meta["train_seconds_this_session"] = train_seconds
    save_adapters(out / ADAPTERS, tensors_of(results), meta)

    # completions: unsteered (radius 0), learned, random
    prompts = meta["prompts"] + list(spec.heldout)
    split = ["train"] * len(meta["prompts"]) + ["heldout"] * len(spec.heldout)
    la = torch.stack([r.omega_a for r in results])
    lb = torch.stack([r.omega_b for r in results])
    all_a = torch.cat([la[:1], la, ra])
    all_b = torch.cat([lb[:1], lb, rb])
    radii = torch.full((len(all_a),), float(radius))
    radii[0] = 0.0
    comps = generate_with_adapters(lm, prompts, mlp.module, all_a, all_b, radii, spec.generation)
    base, learned, random_ = comps[0], comps[1:1 + N], comps[1 + N:]
    stats = write_completions(out, prompts, split, base, learned, random_, [v["objective"] for v in meta["vectors"]],
                              meta["random_objectives"])
    summary = {
        "out": str(out), "model": meta["model"], "kind": "adapter", "radius": radius, "rank": rank,
        "residual_norm": residual_norm, "source_layer": src, "target_layer": tgt,
        **stats,
        "mean_cosine_start_end": float(sum(v["cosine_start_end"] for v in meta["vectors"]) / max(1, N)),
        "mean_perturbation_norm": float(sum(v["perturbation_norm"] for v in meta["vectors"]) / max(1, N)),
        "mean_random_perturbation_norm": float(sum(meta["random_perturbation_norms"]) / max(1, N)),
        "seconds_per_step": train_seconds / max(1, N * spec.steps), "seconds_per_vector": train_seconds / max(1, N),
        "unsteered": base[:len(meta["prompts"])], "completions": {"learned": learned, "random": random_}, "prompts": prompts,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from melbo.report import write_summary_md

    write_summary_md(out / SUMMARY, meta, summary)
    text = (out / SUMMARY).read_text().split("\n", 1)
    note = (f"# melbo adapter run: {meta['model']}\n\nSteering adapters (METHOD.md section 2): rank {rank} on "
            f"`{mlp.path}` of block {src}; R = {radius:.4g}. Mean ‖R·Ω_B Ω_Aᵀ x‖ added to the MLP output: "
            f"{summary['mean_perturbation_norm']:.4g} learned, {summary['mean_random_perturbation_norm']:.4g} "
            f"random (mean residual norm at the source {residual_norm:.4g}). \"cos(start, end)\" compares Ω_B Ω_Aᵀ; "
            f"PEFT folders: `{PEFT_DIR}/adapter_NNN/` (row k = adapter k).\n")
    (out / SUMMARY).write_text(note + text[1])
    return summary


def parse_adapter_choice(path: str, vectors: str | None = "all", use_random: bool = False,
                         scale: float = 1.0) -> dict:
    """What ``melbo generate --adapter PATH`` applies.

    Args:
        path: a PEFT LoRA folder (melbo's or any single-module LoRA adapter), or the folder of a
            ``melbo train --kind adapter`` run (then ``vectors`` picks adapters, ``use_random``
            the random baseline).
        scale: multiplies each adapter's R.

    Returns:
        ``{"module_name", "omega_a" [V, h, r], "omega_b" [V, d, r], "radius" [V], "labels",
        "model", "meta"}``.

    Raises:
        MelboError: not an adapter folder, bad choice.
    """
    from melbo.bank import Bank, select_vectors

    p = Path(path)
    if (p / ADAPTERS).is_file() or p.suffix == ".safetensors":
        tensors, meta = load_adapters(p)
        key = "random_omega" if use_random else "omega"
        a, b = tensors[f"{key}_a"], tensors[f"{key}_b"]
        idx = select_vectors(Bank(torch.zeros(len(a), 1), {}), vectors)
        kind = "random adapter" if use_random else "adapter"
        return {"module_name": meta["module_name"], "omega_a": a[idx], "omega_b": b[idx],
                "radius": torch.full((len(idx),), float(meta["radius"]) * scale),
                "labels": [f"{kind} {i} (R {meta['radius']:.4g} x {scale:g})" for i in idx],
                "model": meta.get("model"), "meta": meta}
    if use_random:
        raise MelboError("--random needs the folder of an adapter run (with adapters.safetensors), not one PEFT folder")
    ad = load_peft_adapter(p)
    return {"module_name": ad.module_name, "omega_a": ad.omega_a[None], "omega_b": ad.omega_b[None],
            "radius": torch.tensor([ad.scale * scale]), "labels": [f"adapter {p.name} (x {scale:g})"],
            "model": ad.meta.get("model"), "meta": ad.meta}
