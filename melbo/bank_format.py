"""What a bank file holds and the checks it must pass (see :mod:`melbo.bank`), and the export of an
adapter bank as PEFT LoRA folders."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from melbo.core.errors import MelboError
from melbo.core.peft import save_peft_adapter

FORMAT = "melbo.bank/1"
BANK_FILE = "bank.safetensors"
PEFT_DIR = "peft"
KINDS = ("vector", "adapter")
LEARNED = {"vector": ("vectors",), "adapter": ("omega_a", "omega_b")}
"""The tensors that hold the learned perturbations of each kind."""


def _d_model(kind: str, tensors: dict[str, torch.Tensor]) -> int:
    return int(tensors["vectors"].shape[1] if kind == "vector" else tensors["omega_b"].shape[1])


def check_contents(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Check a bank's tensors and metadata fit together.

    Raises:
        MelboError: an unknown kind, a missing tensor, shapes that do not fit (vectors not
            ``[n, d]``, baseline or starts of another shape, adapter factors that do not pair),
            metadata fields of the wrong type (layers, widths, R) or describing another number of
            perturbations.
    """
    kind = meta.get("kind", "vector")
    if kind not in KINDS:
        raise MelboError(f"bank kind {kind!r} is unknown; allowed: {', '.join(KINDS)}")
    for name in LEARNED[kind]:
        if name not in tensors:
            raise MelboError(f"a {kind} bank needs a tensor {name!r}")
    if kind == "vector":
        v = tensors["vectors"]
        if v.dim() != 2 or not v.shape[1]:
            raise MelboError(f"a bank holds vectors of shape [n, d_model], got {tuple(v.shape)}")
        for k in ("random_vectors", "start_vectors", "u_directions"):
            t = tensors.get(k)
            if t is not None and (t.dim() != 2 or t.shape[1] != v.shape[1]):
                raise MelboError(f"bank tensor {k!r} has shape {tuple(t.shape)}, expected [k, {v.shape[1]}]")
    else:
        a, b = tensors["omega_a"], tensors["omega_b"]
        if a.dim() != 3 or b.dim() != 3 or len(a) != len(b) or a.shape[-1] != b.shape[-1]:
            raise MelboError(
                f"adapter factors of shapes {tuple(a.shape)} and {tuple(b.shape)} do not fit: "
                f"expected [n, d_hidden, r] and [n, d_model, r]"
            )
        for k, ref in (("random_omega_a", a), ("start_omega_a", a), ("random_omega_b", b), ("start_omega_b", b)):
            t = tensors.get(k)
            if t is not None and (t.dim() != 3 or t.shape[1:] != ref.shape[1:]):
                raise MelboError(
                    f"bank tensor {k!r} has shape {tuple(t.shape)}, expected [k, {ref.shape[1]}, {ref.shape[2]}]"
                )
        for key in ("module_name", "radius"):
            if key not in meta:
                raise MelboError(f"an adapter bank's metadata needs {key!r}")
    hd = meta.get("hidden_size")
    if hd is not None and _d_model(kind, tensors) != hd:
        raise MelboError(f"bank vectors are {_d_model(kind, tensors)} wide, but its metadata says hidden_size={hd}")
    for key in ("source_layer", "target_layer", "num_layers", "hidden_size"):
        if meta.get(key) is not None and (isinstance(meta[key], bool) or not isinstance(meta[key], int)):
            raise MelboError(f"bank metadata {key} is {meta[key]!r}; expected an integer")
    for key in ("radius", "residual_norm"):
        x = meta.get(key)
        if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)):
            raise MelboError(f"bank metadata {key} is {x!r}; expected a finite number")
    rows = meta.get("vectors")
    if rows is not None and (not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows)):
        raise MelboError("bank metadata 'vectors' must be a list of objects (one per perturbation)")
    n = int(tensors[LEARNED[kind][0]].shape[0])
    if n and rows and len(rows) != n:
        raise MelboError(f"bank metadata describes {len(rows)} perturbations, the file holds {n}")


def export_peft(
    tensors: dict[str, torch.Tensor], meta: dict, folder: str | os.PathLike, skip_existing: bool = True
) -> list[Path]:
    """One PEFT LoRA folder per adapter of an adapter bank, ``folder/adapter_NNN``.

    Raises:
        MelboError: not an adapter bank.
    """
    if meta.get("kind") != "adapter":
        raise MelboError("only adapter banks export PEFT folders; a vector bank saves its vectors")
    rows = meta.get("vectors") or []
    out = []
    for i in range(len(tensors["omega_a"])):
        sub = Path(folder) / f"adapter_{i:03d}"
        if not (skip_existing and (sub / "adapter_model.safetensors").is_file()):
            info = {
                "model": meta.get("model"),
                "source_layer": meta.get("source_layer"),
                "target_layer": meta.get("target_layer"),
                "index": i,
                **(rows[i] if i < len(rows) else {}),
            }
            save_peft_adapter(
                sub,
                tensors["omega_a"][i],
                tensors["omega_b"][i],
                float(meta["radius"]),
                str(meta["module_name"]),
                bool(meta.get("conv1d", False)),
                str(meta.get("model")),
                info,
            )
        out.append(sub)
    return out
