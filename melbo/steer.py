"""Applying steering vectors: add ``scale * θ`` to the residual stream after a block.

METHOD.md section 1: a steering vector ``θ ∈ R^d_model`` is added to ``h_src`` at every token
position (equivalently, a bias on the MLP output of block ``src``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def block_output(output):
    """The hidden states ``[batch, seq, d_model]`` of a block's output (a tensor or a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def replace_block_output(output, hidden: torch.Tensor):
    """``output`` with its hidden states replaced by ``hidden`` (same container type)."""
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    return hidden


def add_to_hidden(hidden: torch.Tensor, vector: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``hidden + scale * vector`` out of place, in ``hidden``'s device and dtype.

    Args:
        hidden: ``[batch, seq, d_model]``.
        vector: ``[d_model]`` (the same for every row) or ``[batch, d_model]`` (one per row).

    Raises:
        ValueError: the vector's shape fits neither form.
    """
    v = vector.to(device=hidden.device, dtype=hidden.dtype)
    if v.dim() == 1 and v.shape[0] == hidden.shape[-1]:
        return hidden + scale * v
    if v.dim() == 2 and v.shape == (hidden.shape[0], hidden.shape[-1]):
        return hidden + scale * v[:, None, :]
    raise ValueError(
        f"steering vector of shape {tuple(vector.shape)} does not fit hidden states of shape "
        f"{tuple(hidden.shape)}: use [d_model] or [batch, d_model]"
    )


class HookHandle:
    """A forward hook on ``module`` running ``self._forward_hook``. Call :meth:`remove` to detach.

    Also a context manager: ``with handle:`` removes the hook on exit, also when the body raises.
    """

    def __init__(self, module: nn.Module):
        self._hook = module.register_forward_hook(self._forward_hook)

    def _forward_hook(self, module, args, output):  # pragma: no cover - subclasses override
        raise NotImplementedError

    def remove(self) -> None:
        """Detach the hook (safe to call twice)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class SteeringHandle(HookHandle):
    """A steering vector attached to a block by a forward hook (see :class:`HookHandle`)."""

    def __init__(self, block: nn.Module, vector: torch.Tensor, scale: float = 1.0):
        self.vector = vector
        self.scale = scale
        super().__init__(block)

    def _forward_hook(self, module, args, output):
        hidden = add_to_hidden(block_output(output), self.vector, self.scale)
        return replace_block_output(output, hidden)


def add_steering(blocks: nn.ModuleList, layer: int, vector: torch.Tensor, scale: float = 1.0) -> SteeringHandle:
    """Attach ``scale * vector`` to the output of ``blocks[layer]`` and return its handle.

    Args:
        blocks: the decoder blocks (:func:`melbo.models.find_blocks`).
        layer: block index (negative counts from the end).
        vector: ``[d_model]`` or ``[batch, d_model]`` (one vector per batch row).
        scale: multiplier of the vector.
    """
    return SteeringHandle(blocks[layer], vector, scale)


@contextmanager
def steer(blocks: nn.ModuleList, layer: int, vector: torch.Tensor | None, scale: float = 1.0) -> Iterator[None]:
    """Context manager: inside it, the model runs with ``scale * vector`` added after block
    ``layer`` at every position. ``vector=None`` runs unsteered. The hook is always removed."""
    if vector is None:
        yield
        return
    handle = add_steering(blocks, layer, vector, scale)
    try:
        yield
    finally:
        handle.remove()
