"""The truncated pass ``h_src -> h_tgt`` that every method trains on, and the MELBO objective.

METHOD.md section 1: ``Z(0)`` and ``h_src`` do not depend on θ, so :class:`Slice` computes them
once with one forward pass stopped at block ``tgt``, remembering the exact inputs each block
``src+1..tgt`` received (attention masks, rotary embeddings, ALiBi biases, ...). Each evaluation
then runs only those blocks, for a batch of ``V`` vectors at once (a leading vector dimension,
vector-major rows), never the LM head.

Which captured inputs carry the prompt batch (and must be tiled ``V`` times) is not guessed
from shapes: a second capture on the batch doubled shows it (a tensor whose first dimension
doubles is per-row; Bloom's ALiBi ``[n·heads, 1, T]`` is found that way, a ``position_ids
[1, T]`` is not tiled).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from melbo.core.errors import MelboError
from melbo.core.hooks import block_output
from melbo.core.prompts import PromptBatch


class _StopForward(Exception):
    pass


def _split_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict, bool]:
    """``(hidden, other args, kwargs, hidden_is_keyword)`` of a block call."""
    kwargs = dict(kwargs)
    if args:
        return args[0], tuple(args[1:]), kwargs, False
    if "hidden_states" not in kwargs:
        raise MelboError("a decoder block was called without hidden states; melbo cannot replay its inputs")
    return kwargs.pop("hidden_states"), (), kwargs, True


def _batch_mask(small: Any, big: Any, n: int) -> Any:
    """For inputs captured on ``n`` rows (``small``) and ``2n`` rows (``big``): the same structure
    with ``k`` at tensors whose first dimension is ``k·n`` and doubled (per-row, ``k`` entries per
    prompt: Bloom's ALiBi has one per head), 0 at other tensors, None elsewhere."""
    if isinstance(small, torch.Tensor):
        if not isinstance(big, torch.Tensor):
            raise MelboError("a block's inputs changed type when the batch grew; melbo cannot replay them")
        if small.shape == big.shape:
            return 0
        if (
            small.dim() >= 1
            and big.shape[0] == 2 * small.shape[0]
            and big.shape[1:] == small.shape[1:]
            and small.shape[0] % n == 0
        ):
            return small.shape[0] // n
        raise MelboError(
            f"a block input of shape {tuple(small.shape)} became {tuple(big.shape)} when the batch "
            f"doubled; melbo can replay per-row inputs only when the batch is their first dimension"
        )
    if isinstance(small, (tuple, list)):
        return type(small)(_batch_mask(a, b, n) for a, b in zip(small, big))
    if isinstance(small, dict):
        return {k: _batch_mask(v, big.get(k), n) for k, v in small.items()}
    return None


def tile_batch(obj: Any, mask: Any, times: int) -> Any:
    """Repeat (vector-major) each tensor of ``obj`` that ``mask`` marks as per-row, ``times`` times."""
    if times == 1 or mask is None or mask == 0:
        return obj
    if isinstance(mask, int):
        return obj.repeat(times, *([1] * (obj.dim() - 1)))
    if isinstance(obj, (tuple, list)):
        return type(obj)(tile_batch(x, m, times) for x, m in zip(obj, mask))
    if isinstance(obj, dict):
        return {k: tile_batch(v, mask[k], times) for k, v in obj.items()}
    return obj


def select_rows(obj: Any, mask: Any, rows: torch.Tensor) -> Any:
    """Each tensor of ``obj`` that ``mask`` marks as per-row (``k`` entries per prompt), restricted to
    the prompt rows ``rows``."""
    if mask is None or mask == 0:
        return obj
    if isinstance(mask, int):
        grouped = obj.reshape(obj.shape[0] // mask, mask, *obj.shape[1:])
        return grouped[rows.to(obj.device)].reshape(len(rows) * mask, *obj.shape[1:])
    if isinstance(obj, (tuple, list)):
        return type(obj)(select_rows(x, m, rows) for x, m in zip(obj, mask))
    if isinstance(obj, dict):
        return {k: select_rows(v, mask[k], rows) for k, v in obj.items()}
    return obj


class BlockCall:
    """The recorded inputs of one block call, replayable on ``V`` copies of the batch."""

    def __init__(self, args: tuple, kwargs: dict, hidden_keyword: bool, hidden: torch.Tensor | None = None):
        self.args, self.kwargs, self.hidden_keyword = args, kwargs, hidden_keyword
        self.hidden = hidden  # the block's input hidden states [n, T, d] (kept for the first block only)
        self.mask: Any = None

    def subset(self, rows: torch.Tensor) -> BlockCall:
        """The same call for the prompt rows ``rows`` only."""
        call = BlockCall(
            select_rows(self.args, self.mask[0], rows),
            select_rows(self.kwargs, self.mask[1], rows),
            self.hidden_keyword,
            None if self.hidden is None else self.hidden[rows.to(self.hidden.device)],
        )
        call.mask = self.mask
        return call

    def run(self, block: nn.Module, h: torch.Tensor, times: int) -> torch.Tensor:
        """``block`` on hidden states ``h`` ``[times·n, T, d]`` with the recorded other inputs."""
        args = tile_batch(self.args, self.mask[0], times)
        kwargs = tile_batch(self.kwargs, self.mask[1], times)
        out = block(*args, hidden_states=h, **kwargs) if self.hidden_keyword else block(h, *args, **kwargs)
        return block_output(out)


def capture_block_calls(
    model: nn.Module, blocks: nn.ModuleList, batch: PromptBatch, layers: range, outputs: dict[int, bool]
) -> tuple[dict[int, BlockCall], dict[int, torch.Tensor]]:
    """One forward pass, stopped after the last block of interest: the inputs of blocks ``layers``
    and the outputs of the blocks in ``outputs`` (layer -> stop after it), plus the probe on the
    doubled batch that tells per-row inputs apart (module docstring).

    Returns:
        ``(calls, hidden)``: ``calls[l]`` a :class:`BlockCall`; ``hidden[l]`` ``[n, T, d]`` the
        output of block ``l`` (detached).
    """
    device = next(model.parameters()).device

    def forward(b: PromptBatch, record_outputs: bool, stop_before: int | None) -> tuple[dict, dict]:
        calls: dict[int, BlockCall] = {}
        hidden: dict[int, torch.Tensor] = {}
        hooks = []

        def pre(layer):
            def hook(module, args, kwargs):
                h, rest, kw, keyword = _split_inputs(args, kwargs)
                calls[layer] = BlockCall(rest, kw, keyword, h.detach() if layer == layers[0] else None)
                if layer == stop_before:
                    raise _StopForward

            return hook

        def post(layer, stop):
            def hook(module, args, output):
                hidden[layer] = block_output(output).detach()
                if stop:
                    raise _StopForward

            return hook

        for layer in layers:
            hooks.append(blocks[layer].register_forward_pre_hook(pre(layer), with_kwargs=True))
        if record_outputs:
            for layer, stop in outputs.items():
                hooks.append(blocks[layer].register_forward_hook(post(layer, stop)))
        try:
            with torch.no_grad():
                model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in hooks:
                h.remove()
        return calls, hidden

    calls, hidden = forward(batch, True, None)
    doubled = PromptBatch(
        batch.input_ids.repeat(2, 1),
        batch.attention_mask.repeat(2, 1),
        batch.target_mask.repeat(2, 1),
        batch.prompts * 2,
        batch.texts * 2,
    )
    big, _ = forward(doubled, False, layers[-1])
    for layer, call in calls.items():
        other = big[layer]
        call.mask = (_batch_mask(call.args, other.args, len(batch)), _batch_mask(call.kwargs, other.kwargs, len(batch)))
    return calls, hidden


class Slice:
    """The map ``h_src -> h_tgt`` of a model on a fixed prompt batch (blocks ``src+1..tgt``).

    Args:
        model: the causal LM (parameters frozen).
        blocks: its decoder blocks.
        batch: the prompts (:func:`melbo.core.prompts.encode_prompts`), on any device.
        src, tgt: block indices, ``0 <= src < tgt < L``.
        writes_only: measure only what blocks ``src+1..tgt`` write (METHOD.md section 5, "The
            residual path"): calls return ``Z(θ) − θ``. ``z0`` is unchanged (θ = 0).
        capture_source: also record block ``src``'s own inputs (steering adapters rerun it).

    Attributes:
        h_src: ``[n, T, d_model]`` residual stream after block ``src`` (unsteered).
        z0: ``[n, T, d_model]`` residual stream after block ``tgt`` (unsteered), ``Z(0)``.
        mask: ``[n, T]`` bool, the positions that count (never padding).
        calls: the recorded :class:`BlockCall` of each replayed block.

    Raises:
        ValueError: not ``0 <= src < tgt < L``.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: nn.ModuleList,
        batch: PromptBatch,
        src: int,
        tgt: int,
        writes_only: bool = False,
        capture_source: bool = False,
    ):
        if not 0 <= src < tgt < len(blocks):
            raise ValueError(f"need 0 <= src < tgt < {len(blocks)}, got src={src}, tgt={tgt}")
        self.blocks, self.src, self.tgt = blocks, src, tgt
        self.writes_only = bool(writes_only)
        device = next(model.parameters()).device
        self.mask = batch.target_mask.to(device)
        self.attention_mask = batch.attention_mask.to(device)
        self.n = len(batch)
        first = src if capture_source else src + 1
        self.calls, hidden = capture_block_calls(model, blocks, batch, range(first, tgt + 1), {src: False, tgt: True})
        self.h_src, self.z0 = hidden[src], hidden[tgt]

    @property
    def d_model(self) -> int:
        return self.h_src.shape[-1]

    def subset(self, rows: list[int] | torch.Tensor) -> Slice:
        """The same slice on the prompts ``rows`` only (for evaluating the objective in chunks of
        prompts: METHOD.md section 1's objective is a sum over prompts)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        out = copy.copy(self)
        dev = self.h_src.device
        out.h_src, out.z0 = self.h_src[idx.to(dev)], self.z0[idx.to(dev)]
        out.mask, out.attention_mask = self.mask[idx.to(dev)], self.attention_mask[idx.to(dev)]
        out.n = len(idx)
        out.calls = {layer: call.subset(idx) for layer, call in self.calls.items()}
        return out

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        """Target activations with each vector added after block ``src``.

        Args:
            theta: ``[V, d_model]`` steering vectors (any float dtype; cast to the model's).

        Returns:
            ``[V, n, T, d_model]``: ``Z(θ_v)`` for every vector and prompt (``Z(θ_v) − θ_v`` with
            ``writes_only``).
        """
        V = theta.shape[0]
        th = theta.to(device=self.h_src.device, dtype=self.h_src.dtype)[:, None, None, :]
        h = self.h_src[None] + th
        z = self.run_blocks(h.reshape(V * self.n, *self.h_src.shape[1:])).reshape(V, *self.z0.shape)
        return z - th if self.writes_only else z

    def run_blocks(self, h: torch.Tensor, first: int | None = None) -> torch.Tensor:
        """Run blocks ``first..tgt`` (default ``src+1..tgt``) on ``h`` ``[V·n, T, d_model]``."""
        times = h.shape[0] // self.n
        for layer in range(self.src + 1 if first is None else first, self.tgt + 1):
            h = self.calls[layer].run(self.blocks[layer], h, times)
        return h

    def position_norms(self) -> torch.Tensor:
        """``[k]`` float32: ‖h_src‖₂ at each counted position (all prompts)."""
        return self.h_src.float().norm(dim=-1)[self.mask]

    def mean_norm(self) -> float:  # transitional
        return self.residual_norm("mean")

    def residual_norm(self, statistic: str = "median") -> float:
        """The residual scale at the source over the counted positions: their ``median`` ‖h_src‖₂
        (default; robust to BOS and other massive-activation positions) or ``mean``."""
        return residual_statistic(self.position_norms(), statistic)


NORM_STATISTICS = ("median", "mean")


def residual_statistic(norms: torch.Tensor, statistic: str = "median") -> float:
    """``median`` or ``mean`` of per-position residual norms ``[k]``.

    Raises:
        MelboError: an unknown statistic, or no position counts.
    """
    if norms.numel() == 0:
        raise MelboError("no token position counts: the residual norm is undefined")
    if statistic == "median":
        return float(norms.median())
    if statistic == "mean":
        return float(norms.mean())
    raise MelboError(f"unknown residual-norm statistic {statistic!r}; allowed: {', '.join(NORM_STATISTICS)}")


def melbo_objective(z: torch.Tensor, z0: torch.Tensor, mask: torch.Tensor, p: float, q: float) -> torch.Tensor:
    """METHOD.md section 1: ``Σ_i ( Σ_{t∈I_i} ‖Z_i,t − Z0_i,t‖₂^p )^(1/q)`` for each vector.

    Args:
        z: ``[V, n, T, d_model]`` steered target activations.
        z0: ``[n, T, d_model]`` unsteered ones.
        mask: ``[n, T]`` bool, the positions ``I_i`` (padding is never in it).
        p, q: the powers (> 0).

    Returns:
        ``[V]`` float32, one objective per vector (activation units to the power p/q).
    """
    dist = (z.float() - z0.float()[None]).norm(dim=-1)  # [V, n, T]
    per_pos = torch.where(mask[None], dist.pow(p), torch.zeros((), device=dist.device))
    return per_pos.sum(-1).pow(1.0 / q).sum(-1)
