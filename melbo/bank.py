"""Vector banks: steering vectors in a safetensors file with JSON metadata.

A bank file holds ``vectors`` (``[n, d_model]`` float32, the learned vectors in the order they
were found) and, for MELBO runs, ``random_vectors`` (the random baseline at the same R). Its
safetensors metadata has one key, ``"melbo"``, a JSON object: model id, model type, hidden
size, number of layers, source/target layer, R, p, q, positions, prompts, steps, lr, seed,
per-vector results and the melbo version. Files are written atomically (a temporary file, then
a rename), so a bank on disk is always whole. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import melbo
from melbo.errors import MelboError

FORMAT = "melbo.bank/1"


@dataclass
class Bank:
    """Steering vectors and their metadata.

    Attributes:
        vectors: ``[n, d_model]`` float32.
        meta: JSON-able dict (see the module docstring); ``meta["format"] == FORMAT``.
        extra: other named tensors (``random_vectors [n, d_model]``, ``start_vectors``, ...).
    """

    vectors: torch.Tensor
    meta: dict
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def random_vectors(self) -> torch.Tensor | None:
        return self.extra.get("random_vectors")

    def __len__(self) -> int:
        return self.vectors.shape[0]


def model_meta(loaded) -> dict:
    """The bank metadata that identifies a model (checked by :func:`check_bank`)."""
    from melbo.models import text_config

    cfg = text_config(loaded.model)
    return {
        "model": loaded.name,
        "model_type": getattr(cfg, "model_type", type(loaded.model).__name__),
        "hidden_size": loaded.d_model,
        "num_layers": loaded.num_layers,
    }


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Write ``path`` whole or not at all: ``write(tmp)`` fills a temporary file beside it, which
    then replaces ``path`` by rename; on any error the temporary file is removed. Returns the path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_bank(path: str | os.PathLike, bank: Bank) -> Path:
    """Write ``bank`` to ``path`` atomically. Returns the path.

    Raises:
        MelboError: vectors are not 2-D, or an extra tensor's width differs.
    """
    path = Path(path)
    vectors = bank.vectors.detach().float().cpu().contiguous()
    if vectors.dim() != 2:
        raise MelboError(f"a bank holds vectors of shape [n, d_model], got {tuple(vectors.shape)}")
    tensors = {"vectors": vectors}
    for name, t in bank.extra.items():
        t = t.detach().float().cpu().contiguous()
        if t.dim() != 2 or t.shape[1] != vectors.shape[1]:
            raise MelboError(f"bank tensor {name!r} has shape {tuple(t.shape)}, expected [k, {vectors.shape[1]}]")
        tensors[name] = t
    meta = {"format": FORMAT, "melbo_version": melbo.__version__, **bank.meta}
    meta["num_vectors"] = int(vectors.shape[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"melbo": json.dumps(meta)}))
    bank.meta = meta
    return path


def load_bank(path: str | os.PathLike) -> Bank:
    """Read a bank written by :func:`save_bank`.

    Raises:
        MelboError: no such file, not a safetensors file, or no melbo metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise MelboError(f"bank {str(path)!r} does not exist; give the bank.safetensors of a melbo run")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("melbo")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise MelboError(f"{str(path)!r} is not a readable safetensors file: {e}") from e
    if raw is None or "vectors" not in tensors:
        raise MelboError(f"{str(path)!r} is a safetensors file but not a melbo bank (no 'melbo' metadata or 'vectors')")
    meta = json.loads(raw)
    vectors = tensors.pop("vectors").float()
    return Bank(vectors=vectors, meta=meta, extra={k: v.float() for k, v in tensors.items()})


def check_bank(bank: Bank, loaded) -> None:
    """Refuse a bank made for another model.

    Raises:
        MelboError: hidden size, number of layers or model type differ from ``loaded``'s, or the
            bank's vectors are not ``d_model`` wide.
    """
    want = model_meta(loaded)
    for key in ("hidden_size", "num_layers", "model_type"):
        if key in bank.meta and bank.meta[key] != want[key]:
            raise MelboError(
                f"bank was made for model {bank.meta.get('model')!r} with {key}={bank.meta[key]!r}, "
                f"but model {loaded.name!r} has {key}={want[key]!r}; use the model the bank was trained on"
            )
    if bank.vectors.shape[1] != want["hidden_size"]:
        raise MelboError(
            f"bank vectors are {bank.vectors.shape[1]} wide, model {loaded.name!r} has d_model={want['hidden_size']}"
        )


def select_vectors(bank: Bank, spec: str | None) -> list[int]:
    """Parse a ``--vectors`` choice like ``0,3`` or ``0-7`` (None: all).

    Raises:
        MelboError: a malformed choice or an index outside the bank.
    """
    n = len(bank)
    if spec is None or spec.strip() in ("", "all"):
        return list(range(n))
    out = []
    try:
        for part in spec.split(","):
            if "-" in part.strip()[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise MelboError(f"bad vector choice {spec!r}; allowed: all, or indices like 0,3 or ranges like 0-7") from None
    for i in out:
        if not 0 <= i < n:
            raise MelboError(f"vector index {i} is outside the bank, which has {n} vectors (0..{n - 1})")
    return out
