"""The radius sweep's fast path for MELBO vectors: the vectors of several radii trained as one
stacked block, and all their completions generated in one batched call.

At each R of the grid, the sweep (:mod:`melbo.methods.radius_sweep`) trains ``per_radius`` vectors
as :meth:`melbo.methods.melbo.MelboMethod.fit` does: one block from the seeded starts
(:func:`melbo.methods.melbo_train.block_starts`), projected AdamW (AMSGrad) steps, each step
followed by the block's orthonormalization at norm R. Here the blocks of ``K`` radii are stacked
into one block of ``K · per_radius`` rows:

- each step evaluates every row in one truncated pass (:class:`melbo.core.slice.Slice`, chunked
  by the memory budget as the method chunks its own blocks);
- each radius's rows are their own AdamW parameter group (the learning rate ``0.1·R/√d_model``
  depends on R) and are put back on their own sphere and orthonormalized among themselves only.

The objective is a sum over vectors and a vector's activations depend on its own row only, so
every radius gets the gradients, steps and vectors of its own run, up to the float rounding of
larger matrix products. The random baseline of each R is :func:`melbo.core.sphere.random_vectors`
at that R, as the method draws it. The learned and random vectors of all ``K`` radii then write
their completions in one :func:`melbo.core.generate.generate` call, a vector per batch row.

It applies when it gives the per-radius method's vectors: method ``melbo``, no effect penalty
(it couples the vectors of a block), and a plan that trains the ``per_radius`` vectors of one R
as one block (:func:`stacks`); otherwise the sweep trains radius by radius.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from melbo.core.generate import GenerationConfig, generate
from melbo.core.radius import parse_radius
from melbo.core.slice import Slice
from melbo.core.sphere import random_vectors, tangent
from melbo.methods.base import Context, vector_info
from melbo.methods.melbo import budget_bytes, plan_batches, row_bytes
from melbo.methods.melbo_train import (
    BETAS,
    block_starts,
    chunked_objective,
    learning_rate,
    orthonormal_block,
)


def _plan(ctx: Context, sl: Slice, num_vectors: int, batch_vectors: int | None) -> tuple[int, int, int]:
    """:func:`melbo.methods.melbo.plan_batches` of ``num_vectors`` on this run's slice and budget."""
    dtype_bytes = torch.finfo(sl.h_src.dtype).bits // 8
    per_row = row_bytes(ctx.lm, ctx.tgt - ctx.src, sl.h_src.shape[1], dtype_bytes)
    budget = budget_bytes(ctx.settings.memory_gb, sl.h_src.device)
    return plan_batches(num_vectors, sl.n, per_row, budget, batch_vectors)


def stacks(method: str, ctx: Context, sl: Slice) -> bool:
    """Whether the sweep of ``method`` with the settings of ``ctx`` (``num_vectors`` = vectors per
    R) can take the stacked fast path and give the per-radius vectors: MELBO, no effect penalty,
    and the method itself would train the vectors of one R as one block (not one after another
    with ``batch_vectors=1``, nor in several blocks for want of memory)."""
    s = ctx.settings
    if method != "melbo" or getattr(s, "effect_penalty", 0.0) > 0:
        return False
    return _plan(ctx, sl, s.num_vectors, s.batch_vectors)[0] >= s.num_vectors


def train_stacked(
    slice_: Slice,
    radii: list[float],
    count: int,
    settings: Any,
    vectors_per_chunk: int | None = None,
    prompts_per_chunk: int | None = None,
    progress: tqdm | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, list[dict]]]:
    """Train ``count`` vectors at each R of ``radii`` as one stacked block (module docstring).

    Args:
        slice_: the truncated pass of the run's prompts and layers.
        radii: R of each group (activation units).
        count: vectors per R, trained from ``block_starts(range(count))`` at that R.
        settings: the checked :class:`melbo.methods.melbo.MelboSettings` (p, q, steps, lr, seed,
            orthogonalize).
        vectors_per_chunk, prompts_per_chunk: rows of one evaluation (memory), default all.

    Returns:
        per R: ``(vectors [count, d], starts [count, d], infos)``, as
        :func:`melbo.methods.melbo_train.train_block` returns them for that R alone.
    """
    t0 = time.perf_counter()
    s, d = settings, slice_.d_model
    device = slice_.h_src.device
    starts = [block_starts(list(range(count)), d, r, s.seed, None) for r in radii]
    leaves = [x.to(device).clone().requires_grad_(True) for x in starts]
    groups = [{"params": [x], "lr": learning_rate(s.lr, r, d)} for x, r in zip(leaves, radii)]
    opt = torch.optim.AdamW(groups, betas=BETAS, weight_decay=0.0, amsgrad=True)
    rows = len(radii) * count
    chunk = vectors_per_chunk or rows
    first = None
    for _ in range(s.steps):
        opt.zero_grad(set_to_none=True)
        obj = torch.zeros(rows, device=device)
        for i in range(0, rows, chunk):  # a fresh stack per chunk: each backward frees its own graph
            theta = torch.cat(leaves)[i : i + chunk]
            obj[i : i + chunk] = chunked_objective(slice_, theta, s.p, s.q, chunk, prompts_per_chunk or slice_.n, True)
        with torch.no_grad():
            for x in leaves:
                assert x.grad is not None  # backward() just filled it
                x.grad = tangent(x.grad, x)
        opt.step()
        with torch.no_grad():
            for x, r in zip(leaves, radii):
                x.copy_(orthonormal_block(x, r, s.orthogonalize))
        first = obj.cpu() if first is None else first
        if progress is not None:
            progress.update(rows)
            progress.set_postfix(objective=f"{obj.mean():.4g}", refresh=False)
    with torch.no_grad():
        theta = torch.cat(leaves).detach()
        final = chunked_objective(slice_, theta, s.p, s.q, chunk, prompts_per_chunk or slice_.n, False).cpu()
    first = final if first is None else first
    secs = (time.perf_counter() - t0) / rows
    out = []
    for k, start in enumerate(starts):
        vecs = leaves[k].detach().float().cpu()
        cos = torch.nn.functional.cosine_similarity(vecs.double(), start.double(), dim=-1)
        j = [k * count + v for v in range(count)]
        infos = [vector_info(float(final[i]), float(first[i]), float(cos[v]), secs, block=0) for v, i in enumerate(j)]
        out.append((vecs, start, infos))
    return out


STACK = 6
"""Radii per stack. Training costs about the same per vector-step from 6 vectors on (gemma-3-270m,
2 CPU threads: 42, 30, 23 and 22 ms per vector-step in blocks of 3, 6, 16 and 30 vectors), and a
sweep that stops early wastes the rest of its last stack; on gemma-3-270m the sweep stops after
its sixth radius (0.08x), so one stack of 6 serves it."""


def stacked_trials(
    ctx: Context,
    sl: Slice,
    prompts: list[str],
    grid: list[float],
    gen: GenerationConfig,
    stack: int = STACK,
    unsteered: bool = False,
) -> Iterator[tuple[float, float, dict[str, list[list[str]]], float]]:
    """The sweep's radii in ascending order, trained ``stack`` radii at a time (fewer when they do
    not fit the memory budget) and generated in one call per stack; lazily, so a sweep that stops
    early trains no further stack.

    Args:
        ctx: the run's model, encoded prompts, layers and settings with ``num_vectors`` = vectors
            per R and ``steps`` the sweep's steps.
        sl: the truncated pass of those prompts and layers (with the settings' ``writes_only``).
        prompts: the prompts to complete (the training prompts).
        grid: multiples of the median residual norm at the source, ascending.
        gen: greedy generation settings of the sweep.
        stack: radii per stack (:data:`STACK`).
        unsteered: also generate the unsteered completions, as a zero-vector row of the first
            stack's call (``groups["unsteered"][0]`` of the first radius).

    Yields:
        ``(relative, R, groups, seconds)`` per R: ``groups["learned" | "random"][v][i]`` is
        vector ``v``'s completion of prompt ``i``; ``seconds`` the stack's time shared among its radii.
    """
    s, lm = ctx.settings, ctx.lm
    count, d = s.num_vectors, sl.d_model
    norm = sl.residual_norm()
    rows, vchunk, pchunk = _plan(ctx, sl, max(1, stack) * count, None)
    per_stack = max(1, rows // count)
    for a in range(0, len(grid), per_stack):
        t0 = time.perf_counter()
        rels = grid[a : a + per_stack]
        radii = [parse_radius(f"{rel:.6g}x").resolve(norm) for rel in rels]
        with tqdm(
            total=len(rels) * count * s.steps,
            desc=f"sweep R {rels[0]:.3g}x-{rels[-1]:.3g}x",
            unit="vector-step",
            dynamic_ncols=True,
            disable=not ctx.show_progress,
        ) as bar:
            fits = train_stacked(sl, radii, count, s, vchunk, pchunk, bar)
        base = unsteered and a == 0
        vecs = torch.cat(
            [torch.cat([v, random_vectors(count, d, r, s.seed)]) for r, (v, _, _) in zip(radii, fits)]
            + [torch.zeros(int(base), d)]
        )
        comps = generate(lm, prompts, vecs, ctx.src, cfg=gen)
        secs = (time.perf_counter() - t0) / len(rels)
        for k, (rel, r) in enumerate(zip(rels, radii)):
            mine = comps[2 * count * k : 2 * count * (k + 1)]
            groups = {"learned": mine[:count], "random": mine[count:]}
            if base and k == 0:
                groups["unsteered"] = [comps[-1]]
            yield rel, r, groups, secs
