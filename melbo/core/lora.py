"""Low-rank perturbations of a block's MLP output projection (the surgery behind steering adapters).

METHOD.md section 2: ``W' = W + R · Ω_B Ω_Aᵀ`` on the MLP output (down) projection of block
``src``, so that the module's output on an MLP hidden activation ``x`` gains ``R · Ω_B Ω_Aᵀ x``.
It is applied as a forward hook (:class:`AdapterHook`), which works the same for ``nn.Linear``
and for GPT-2's transposed ``Conv1D``, and for ``V`` adapters at once (one per group of rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from melbo.core.errors import MelboError
from melbo.core.hooks import HookHandle
from melbo.core.models import LoadedModel

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


def _get(obj: Any, path: str) -> Any:
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
        w: Any = module.weight
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
                raise MelboError(
                    f"--mlp-module {path!r} outputs {dims[1]} features, not d_model={d}; "
                    f"give the MLP's output (down) projection"
                )
            continue
        names = {id(m): n for n, m in lm.model.named_modules()}
        return MlpOut(mod, p, names[id(mod)], dims[0], dims[1], dims[2])
    linears = [n for n, m in block.named_modules() if (dm := linear_dims(m)) is not None and dm[1] == d]
    if path:
        raise MelboError(
            f"--mlp-module {path!r} is not a linear layer of block {layer} "
            f"({type(block).__name__}); linear layers there with output d_model: {', '.join(linears) or 'none'}"
        )
    raise MelboError(
        f"cannot find the MLP output projection of {type(block).__name__} (tried {', '.join(MLP_OUT_PATHS)}); "
        f"pass its dotted path inside the block with --mlp-module (candidates: {', '.join(linears) or 'none'})"
    )


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

    def __init__(
        self, module: nn.Module, omega_a: torch.Tensor, omega_b: torch.Tensor, radius: float | torch.Tensor = 1.0
    ):
        if (
            omega_a.dim() != omega_b.dim()
            or omega_a.dim() not in (2, 3)
            or omega_a.shape[-1] != omega_b.shape[-1]
            or (omega_a.dim() == 3 and omega_a.shape[0] != omega_b.shape[0])
        ):
            raise MelboError(
                f"adapter factors of shapes {tuple(omega_a.shape)} and {tuple(omega_b.shape)} do not fit: "
                f"use Ω_A [d_hidden, r] with Ω_B [d_model, r], or [V, d_hidden, r] with [V, d_model, r]"
            )
        self.omega_a, self.omega_b, self.radius = omega_a, omega_b, radius
        super().__init__(module)

    def _forward_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
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
def apply_adapter(
    module: nn.Module, omega_a: torch.Tensor, omega_b: torch.Tensor, radius: float | torch.Tensor = 1.0
) -> Iterator[None]:
    """Context manager: inside it, ``module``'s output gains ``radius · Ω_B Ω_Aᵀ x`` (see
    :class:`AdapterHook`). The hook is always removed."""
    hook = AdapterHook(module, omega_a, omega_b, radius)
    try:
        yield
    finally:
        hook.remove()


def module_by_name(lm: LoadedModel, module_name: str) -> nn.Module:
    """The module named ``module_name`` in ``lm.model`` (an adapter's target).

    Raises:
        MelboError: no such module.
    """
    mod = dict(lm.model.named_modules()).get(module_name)
    if mod is None:
        raise MelboError(
            f"the adapter targets module {module_name!r}, which model {lm.name!r} does not have; "
            f"apply it to the model it was trained on"
        )
    return mod
