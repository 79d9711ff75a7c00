"""Steering vectors in the files other tools read: llama.cpp control vectors (GGUF) and plain
safetensors vectors with their hook site.

Example:
    >>> bank = melbo.Bank.load("runs/gemma")                          # doctest: +SKIP
    >>> melbo.export_gguf(bank, [3], "vector3.gguf", scale=1.0)       # doctest: +SKIP
    $ llama-cli -m gemma-3-270m.gguf --control-vector vector3.gguf -p "..."
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from melbo.bank import Bank
from melbo.core.control_vector import ControlVector, read_control_vector, write_control_vector
from melbo.core.errors import MelboError
from melbo.core.validate import check_number, parse_indices
from melbo.vector import SteeringVector

# transformers' model_type -> llama.cpp's architecture name, where they differ (model_hint only).
_LLAMA_CPP_ARCH = {"gemma3_text": "gemma3", "gpt_neox": "gptneox", "qwen2_moe": "qwen2moe"}


def _source_layer(layer: int, num_layers: int | None) -> int:
    if layer < 0:
        if num_layers is None:
            raise MelboError(f"source layer {layer} counts from the end, but the number of blocks is not recorded")
        layer += num_layers
    return layer


def control_vector(
    vectors: list[SteeringVector], scale: float = 1.0, num_layers: int | None = None, model_hint: str = ""
) -> ControlVector:
    """The llama.cpp control vector that adds ``scale · Σ θ`` after each vector's block (vectors
    at the same block are summed, as their hooks would be).

    Args:
        vectors: steering vectors, ``[d_model]`` each, all of one width.
        scale: multiplier baked into the file (llama.cpp's ``--control-vector-scaled`` scales again).
        num_layers: the model's block count, to resolve negative layers.
        model_hint: the architecture name written as ``controlvector.model_hint``.

    Raises:
        MelboError: no vector, a vector at block 0 (llama.cpp cannot steer there), a layer past
            the model's last block, a non-finite scale, widths that differ, a zero direction.
    """
    if not vectors:
        raise MelboError("no steering vector to export; give at least one index")
    scale = check_number("scale", scale)
    out: dict[int, torch.Tensor] = {}
    for v in vectors:
        k = _source_layer(v.layer, num_layers)
        if k == 0:
            raise MelboError(
                f"{v.label or 'the vector'} is added after block 0, which llama.cpp control vectors cannot "
                f"steer (direction.0 is rejected); train with --source-layer 1 or later"
            )
        if num_layers is not None and not 0 < k < num_layers:
            raise MelboError(f"{v.label or 'the vector'} is at block {k}, but the model has blocks 0..{num_layers - 1}")
        out[k] = out.get(k, torch.zeros_like(v.vector)) + scale * v.vector.float()
    for k, t in out.items():
        if not bool(t.abs().sum() > 0):
            raise MelboError(
                f"the control vector for block {k} is zero (scale {scale:g}, or zero vectors, or vectors that cancel); "
                f"it would steer nothing; give a nonzero scale and nonzero vectors"
            )
    return ControlVector(out, model_hint)


def export_gguf(
    bank: Bank, indices: list[int] | str | None, path: str | os.PathLike, scale: float = 1.0, random: bool = False
) -> Path:
    """Write vectors ``indices`` of ``bank`` (summed, times ``scale``) as a llama.cpp
    control-vector GGUF (:mod:`melbo.core.control_vector`), atomically.

    Args:
        indices: row indices, a spec like ``"0,3"`` or ``"0-7"``, or None for all (summed).
        random: export the bank's random baseline rows instead.

    Raises:
        MelboError: an adapter bank, an unknown index, a source layer of 0, no random baseline,
            or a failed write.
    """
    if bank.kind != "vector":
        raise MelboError("llama.cpp control vectors hold steering vectors; this bank holds adapters (export PEFT)")
    src = bank.random if random else bank
    if src is None:
        raise MelboError("the bank holds no random baseline")
    picked = [src[i] for i in parse_indices(indices, len(src))]
    num_layers = bank.meta.get("num_layers")
    hint = str(bank.meta.get("model_type") or "")
    cv = control_vector(
        [v for v in picked if isinstance(v, SteeringVector)],
        scale,
        int(num_layers) if isinstance(num_layers, int) else None,
        _LLAMA_CPP_ARCH.get(hint, hint),
    )
    return write_control_vector(path, cv)


def vectors_from_gguf(path: str | os.PathLike, model: str | None = None) -> list[SteeringVector]:
    """The directions of a llama.cpp control-vector file as :class:`SteeringVector` s, one per block
    (``layer`` = the block whose output gets it), in block order.

    Raises:
        MelboError: see :func:`melbo.core.control_vector.read_control_vector`.
    """
    cv = read_control_vector(path)
    name = Path(path).name
    return [
        SteeringVector(t, k, model, f"{name} direction.{k}", {"model_hint": cv.model_hint})
        for k, t in sorted(cv.directions.items())
    ]
