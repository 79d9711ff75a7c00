"""Hooks on decoder blocks: add ``scale · θ`` to the residual stream after a block.

METHOD.md section 1: a steering vector ``θ ∈ R^d_model`` is added to ``h_src`` (the output of
block ``src``) at every token position, equivalently a bias on the MLP output of block ``src``.
Hook points are named by block index, like TransformerLens's ``blocks.{src}.hook_resid_post``.

Where the vector is added during generation (``positions``):

- ``"all"``: every position, the prompt and every generated token (METHOD.md's setting);
- ``"prompt"``: only the prompt's positions;
- ``"generated"``: only the positions of generated tokens (the first new token is then
  predicted unsteered, from the prompt's last position).

The prompt is what the first forward call through the hook sees; later calls of one token
each (incremental decoding with the KV cache, as ``generate`` does) are generated positions; a
later call of several tokens (a full recompute without cache) is split at the prompt length.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from melbo.core.errors import MelboError

STEER_POSITIONS = ("all", "prompt", "generated")


def block_output(output: Any) -> torch.Tensor:
    """The hidden states ``[batch, seq, d_model]`` of a block's output (a tensor or a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def replace_block_output(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden states replaced by ``hidden`` (same container type)."""
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    return hidden


def add_to_hidden(
    hidden: torch.Tensor, vector: torch.Tensor, scale: float = 1.0, position_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``hidden + scale · vector`` out of place, in ``hidden``'s device and dtype.

    Args:
        hidden: ``[batch, seq, d_model]``.
        vector: ``[d_model]`` (the same for every row) or ``[batch, d_model]`` (one per row).
        position_mask: ``[seq]`` bool, where to add (None: everywhere).

    Raises:
        MelboError: the vector's shape fits neither form.
    """
    v = vector.to(device=hidden.device, dtype=hidden.dtype)
    if v.dim() == 1 and v.shape[0] == hidden.shape[-1]:
        add = scale * v[None, None, :]
    elif v.dim() == 2 and v.shape == (hidden.shape[0], hidden.shape[-1]):
        add = scale * v[:, None, :]
    else:
        raise MelboError(
            f"steering vector of shape {tuple(vector.shape)} does not fit hidden states of shape "
            f"{tuple(hidden.shape)}: use [d_model] or [batch, d_model]"
        )
    if position_mask is not None:
        add = add * position_mask.to(device=hidden.device, dtype=hidden.dtype)[None, :, None]
    return hidden + add


class HookHandle:
    """A forward hook on ``module`` running ``self._forward_hook``; :meth:`remove` detaches it.

    Also a context manager: ``with handle:`` removes the hook on exit, also when the body raises.
    """

    def __init__(self, module: nn.Module):
        self._hook: Any = module.register_forward_hook(self._forward_hook)

    def _forward_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def remove(self) -> None:
        """Detach the hook (safe to call twice)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class PositionTracker:
    """Tells prompt positions from generated ones across the forward calls of one generation."""

    def __init__(self, positions: str = "all"):
        if positions not in STEER_POSITIONS:
            raise MelboError(f"unknown steering positions {positions!r}; allowed: {', '.join(STEER_POSITIONS)}")
        self.positions = positions
        self.prompt_len: int | None = None
        self.offset = 0

    def mask(self, seq: int) -> torch.Tensor | None:
        """``[seq]`` bool of where to steer in the next call of ``seq`` tokens (None: everywhere)."""
        if self.prompt_len is None:
            self.prompt_len, start = seq, 0
        elif seq > 1:  # a full recompute (no KV cache): positions restart at 0
            start = 0
        else:
            start = self.offset
        self.offset = start + seq
        if self.positions == "all":
            return None
        pos = torch.arange(start, start + seq)
        return pos < self.prompt_len if self.positions == "prompt" else pos >= self.prompt_len


class SteeringHandle(HookHandle):
    """``scale · vector`` added to the output of ``block`` by a forward hook (see the module
    docstring for ``positions``). ``vector`` is ``[d_model]`` or ``[batch, d_model]``."""

    def __init__(self, block: nn.Module, vector: torch.Tensor, scale: float = 1.0, positions: str = "all"):
        self.vector = vector
        self.scale = scale
        self.tracker = PositionTracker(positions)
        super().__init__(block)

    def _forward_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        hidden = block_output(output)
        mask = self.tracker.mask(hidden.shape[1])
        return replace_block_output(output, add_to_hidden(hidden, self.vector, self.scale, mask))


def add_steering(
    blocks: nn.ModuleList, layer: int, vector: torch.Tensor, scale: float = 1.0, positions: str = "all"
) -> SteeringHandle:
    """Attach ``scale · vector`` to the output of ``blocks[layer]`` and return its handle.

    Args:
        blocks: the decoder blocks (:func:`melbo.core.models.find_blocks`).
        layer: block index (negative counts from the end).
        vector: ``[d_model]`` or ``[batch, d_model]`` (one vector per batch row).
        scale: multiplier of the vector.
        positions: ``all``, ``prompt`` or ``generated`` (module docstring).
    """
    return SteeringHandle(blocks[layer], vector, scale, positions)


@contextmanager
def steer(
    blocks: nn.ModuleList, layer: int, vector: torch.Tensor | None, scale: float = 1.0, positions: str = "all"
) -> Iterator[None]:
    """Context manager: inside it, the model runs with ``scale · vector`` added after block
    ``layer``. ``vector=None`` runs unsteered. The hook is always removed, also on error."""
    if vector is None:
        yield
        return
    handle = add_steering(blocks, layer, vector, scale, positions)
    try:
        yield
    finally:
        handle.remove()
