"""The MELBO objective and the truncated ``h_src -> h_tgt`` pass it is computed on.

METHOD.md section 1: with ``Z_i,t(θ)`` the target-layer activations of prompt ``i`` at position
``t`` with ``θ`` added after block ``src``,

    objective(θ) = Σ_i ( Σ_{t∈I_i} ‖Z_i,t(θ) − Z_i,t(0)‖₂^p )^(1/q)

``Z(0)`` and ``h_src`` do not depend on ``θ``: :class:`Slice` computes them once with one full
forward pass (stopped at block ``tgt``), remembering the inputs each block ``src+1..tgt`` got
(attention masks, rotary embeddings, ...). Each evaluation then runs only those blocks, for a
batch of vectors at once (a leading vector dimension), never the LM head.
"""

from __future__ import annotations

import torch
from torch import nn

from melbo.prompts import PromptBatch
from melbo.steer import block_output


class _StopForward(Exception):
    pass


def repeat_batch(obj, batch: int, times: int):
    """Repeat every tensor of ``obj`` (nested in tuples/lists/dicts) whose first dimension is the
    prompt batch, ``times`` times along that dimension (vector-major order)."""
    if times == 1:
        return obj
    if isinstance(obj, torch.Tensor):
        if obj.dim() >= 2 and obj.shape[0] == batch:
            return obj.repeat(times, *([1] * (obj.dim() - 1)))
        return obj
    if isinstance(obj, tuple):
        return tuple(repeat_batch(x, batch, times) for x in obj)
    if isinstance(obj, list):
        return [repeat_batch(x, batch, times) for x in obj]
    if isinstance(obj, dict):
        return {k: repeat_batch(v, batch, times) for k, v in obj.items()}
    return obj


class Slice:
    """The map ``h_src -> h_tgt`` of a model on a fixed prompt batch (blocks ``src+1..tgt``).

    Args:
        model: the causal LM (parameters frozen).
        blocks: its decoder blocks.
        batch: the prompts (:func:`melbo.prompts.encode_prompts`), on any device.
        src, tgt: block indices, ``0 <= src < tgt < L``.
        writes_only: measure only what blocks ``src+1..tgt`` write (METHOD.md section 5, "The
            residual path"): calls return ``Z(θ) − θ``, so ``Z(θ) − Z(0)`` no longer contains θ
            itself. ``z0`` is unchanged (θ = 0). Default False: plain ``Z(θ)``.

    Attributes:
        h_src: ``[n, T, d_model]`` residual stream after block ``src`` (unsteered).
        z0: ``[n, T, d_model]`` residual stream after block ``tgt`` (unsteered), ``Z(0)``.
        mask: ``[n, T]`` bool, the positions that count (never padding).
    """

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, batch: PromptBatch, src: int, tgt: int,
                 writes_only: bool = False):
        if not 0 <= src < tgt < len(blocks):
            raise ValueError(f"need 0 <= src < tgt < {len(blocks)}, got src={src}, tgt={tgt}")
        self.blocks, self.src, self.tgt = blocks, src, tgt
        self.writes_only = bool(writes_only)
        device = next(model.parameters()).device
        batch = batch.to(device)
        self.mask = batch.target_mask
        self.n = len(batch)
        self._inputs: dict[int, tuple[tuple, dict]] = {}
        captured: dict[str, torch.Tensor] = {}
        hooks = []

        def keep_inputs(layer):
            def hook(module, args, kwargs):
                self._inputs[layer] = (tuple(args[1:]), dict(kwargs))
            return hook

        def keep_output(name, stop):
            def hook(module, args, output):
                captured[name] = block_output(output).detach()
                if stop:
                    raise _StopForward
            return hook

        for layer in range(src + 1, tgt + 1):
            hooks.append(blocks[layer].register_forward_pre_hook(keep_inputs(layer), with_kwargs=True))
        hooks.append(blocks[src].register_forward_hook(keep_output("src", False)))
        hooks.append(blocks[tgt].register_forward_hook(keep_output("tgt", True)))
        try:
            with torch.no_grad():
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in hooks:
                h.remove()
        self.h_src = captured["src"]
        self.z0 = captured["tgt"]

    @property
    def d_model(self) -> int:
        return self.h_src.shape[-1]

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        """Target activations with each vector added after block ``src``.

        Args:
            theta: ``[V, d_model]`` steering vectors (any float dtype; cast to the model's).

        Returns:
            ``[V, n, T, d_model]``: ``Z(θ_v)`` for every vector ``v`` and prompt (``Z(θ_v) − θ_v``
            with ``writes_only``).
        """
        V = theta.shape[0]
        th = theta.to(self.h_src.dtype)[:, None, None, :]
        h = self.h_src[None] + th
        z = self.run_blocks(h.reshape(V * self.n, *self.h_src.shape[1:])).reshape(V, *self.z0.shape)
        return z - th if self.writes_only else z

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        """Run blocks ``src+1..tgt`` on ``h`` of shape ``[V*n, T, d_model]`` (vector-major)."""
        times = h.shape[0] // self.n
        for layer in range(self.src + 1, self.tgt + 1):
            args, kwargs = self._inputs[layer]
            out = self.blocks[layer](h, *repeat_batch(args, self.n, times), **repeat_batch(kwargs, self.n, times))
            h = block_output(out)
        return h

    def mean_norm(self) -> float:
        """Mean ‖h_src‖₂ over the positions that count: the residual scale at the source."""
        return self.h_src.float().norm(dim=-1)[self.mask].mean().item()


def melbo_objective(z: torch.Tensor, z0: torch.Tensor, mask: torch.Tensor, p: float, q: float) -> torch.Tensor:
    """METHOD.md section 1: ``Σ_i ( Σ_{t∈I_i} ‖Z_i,t − Z0_i,t‖₂^p )^(1/q)`` for each vector.

    Args:
        z: ``[V, n, T, d_model]`` steered target activations.
        z0: ``[n, T, d_model]`` unsteered ones.
        mask: ``[n, T]`` bool, the positions ``I_i`` (padding is never in it).
        p, q: the powers (> 0).

    Returns:
        ``[V]`` float32, one objective per vector (same units as the activations, to the p/q).
    """
    dist = (z.float() - z0.float()[None]).norm(dim=-1)  # [V, n, T]
    per_pos = torch.where(mask[None], dist.pow(p), torch.zeros((), device=dist.device))
    return per_pos.sum(-1).pow(1.0 / q).sum(-1)
