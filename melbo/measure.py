"""Measures of a bank of steering vectors (METHOD.md sections 3 and 4): KL divergence of the
next-token distribution, vector norms, moving averages, rescaling and means.

KL direction. For vector ``k`` and a reference vector (e.g. the MELBO base vector θ₀ of a
MELBO-ortho bank), with ``P_k`` the next-token distribution at the last prompt position when
steered by ``θ_k`` and ``P_ref`` when steered by the reference:

    KL(P_k ‖ P_ref) = Σ_x P_k(x) · (log P_k(x) − log P_ref(x))      (direction "k||ref", default)
    KL(P_ref ‖ P_k) = Σ_x P_ref(x) · (log P_ref(x) − log P_k(x))    (direction "ref||k")

The default is what the MELBO-ortho reference script computed (``F.kl_div(log P_0, P_k)`` is
``KL(P_k ‖ P_0)``), although its plot title said ``KL(P_0 ‖ P_k)``. Natural logs (nats). The
same is computed against the unsteered model (``P_unsteered`` in place of ``P_ref``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from melbo.core.errors import MelboError
from melbo.core.hooks import steer
from melbo.core.models import LoadedModel
from melbo.core.prompts import encode_prompts
from melbo.core.sphere import to_sphere
from melbo.core.validate import check_int, check_positive

Perturb = Callable[[list[int]], AbstractContextManager]
"""``perturb(rows)``: a context manager under which batch row ``j`` carries perturbation ``rows[j]``."""

DIRECTIONS = ("k||ref", "ref||k")


def kl_label(direction: str = "k||ref", ref: str = "ref") -> str:
    """Axis label of a KL curve, e.g. ``"KL(P_k ‖ P_ref)"``.

    Raises:
        MelboError: an unknown direction.
    """
    check_direction(direction)
    return f"KL(P_k ‖ P_{ref})" if direction == "k||ref" else f"KL(P_{ref} ‖ P_k)"


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise MelboError(
            f"unknown KL direction {direction!r}; allowed: {', '.join(DIRECTIONS)} "
            f"(k||ref is KL(P_k ‖ P_ref), the MELBO-ortho reference's choice)"
        )
    return direction


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(P ‖ Q) = Σ_x P(x) (log P(x) − log Q(x))`` over the last dimension, in nats.

    Args:
        logp, logq: log-probabilities (broadcastable, ``[..., vocab]``).

    Returns:
        ``[...]`` float32, clamped at 0 (float error can make it slightly negative). Terms with
        ``P(x) = 0`` count as 0.
    """
    logp, logq = torch.broadcast_tensors(logp.double(), logq.double())
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros((), dtype=p.dtype, device=p.device))
    return terms.sum(-1).clamp_min(0).float()


def vector_norms(vectors: torch.Tensor) -> torch.Tensor:
    """``[V]`` float32: the 2-norm of each row of ``vectors`` (``[V, d_model]``)."""
    return vectors.double().norm(dim=-1).float()


def rescale_vectors(vectors: torch.Tensor, norm: float) -> torch.Tensor:
    """Each row of ``vectors`` (``[V, d_model]``) rescaled to 2-norm ``norm`` (METHOD.md
    section 3: rescaled MELBO-ortho vectors lose their effect).

    Raises:
        MelboError: ``norm`` is not > 0, or a row is zero.
    """
    check_positive("rescale norm", norm)
    return to_sphere(vectors.float(), float(norm))


def mean_vector(vectors: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """``[d_model]``: the mean of the rows ``indices`` of ``vectors`` (METHOD.md section 3:
    means of a few MELBO-ortho vectors behave differently from each of them).

    Raises:
        MelboError: no index, or one outside ``vectors``.
    """
    if not indices:
        raise MelboError("--mean needs at least one vector index, like 3,5,8")
    for i in indices:
        if not 0 <= i < len(vectors):
            raise MelboError(
                f"vector index {i} is outside the bank, which has {len(vectors)} vectors (0..{len(vectors) - 1})"
            )
    return vectors[list(indices)].float().mean(0)


def effective_window(n: int, window: int = 50) -> int:
    """The moving-average window for ``n`` values: ``window`` (50 by default, the reference's),
    but at most a quarter of the series (at least 1) so that short banks still show a curve.

    Raises:
        MelboError: ``window < 1``.
    """
    if int(window) != window or window < 1:
        raise MelboError(f"moving-average window must be a whole number >= 1, got {window!r}")
    return int(max(1, min(window, n // 4)))


def moving_average(values, window: int) -> np.ndarray:
    """Mean of each run of ``window`` consecutive values (``len - window + 1`` of them, like
    ``np.convolve(..., mode="valid")`` in the reference); NaNs are skipped within a window."""
    x = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(x) < window:
        return x.copy() if window <= 1 else np.zeros(0)
    ok = np.isfinite(x)
    s = np.convolve(np.where(ok, x, 0.0), np.ones(window), mode="valid")
    c = np.convolve(ok.astype(np.float64), np.ones(window), mode="valid")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, s / np.maximum(c, 1), np.nan)


# ---------------------------------------------------------------- steered next-token distributions


def vector_perturb(lm: LoadedModel, vectors: torch.Tensor, layer: int, scale: float = 1.0) -> Perturb:
    """The :data:`Perturb` of steering vectors ``[V, d_model]`` added after block ``layer``.

    Raises:
        MelboError: vectors not ``[V, d_model]``.
    """
    d = lm.d_model
    if vectors.dim() != 2 or vectors.shape[1] != d:
        raise MelboError(f"vectors must be [V, {d}], got {tuple(vectors.shape)}")
    vecs = vectors.detach().float()
    return lambda rows: steer(lm.blocks, layer, vecs[rows].to(lm.device), scale)


def logprob_chunks(
    lm: LoadedModel, prompts: list[str], count: int, perturb: Perturb, chat: bool = False, batch_size: int = 64
) -> Iterator[tuple[int, torch.Tensor]]:
    """Next-token log-probabilities at the last position of each prompt under each of ``count``
    perturbations, in chunks: yields ``(first_index, logp [Vc, n, vocab])`` float32.

    Each chunk is one forward per prompt over ``Vc <= batch_size`` rows, row ``j`` perturbed by
    perturbation ``first_index + j``; only the last position's logits are computed.

    Raises:
        MelboError: bad prompts or batch size.
    """
    batch_size = check_int("batch size", batch_size, 1)
    batch = encode_prompts(lm.tokenizer, prompts, "all", chat)
    lengths = batch.attention_mask.sum(1).tolist()
    dev = lm.device
    for s in range(0, count, batch_size):
        rows = list(range(s, min(count, s + batch_size)))
        out = []
        for i, T in enumerate(lengths):
            ids = batch.input_ids[i : i + 1, :T].to(dev).expand(len(rows), T)
            with torch.no_grad(), perturb(rows):
                logits = lm.model(
                    input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=1
                ).logits[:, -1]
            out.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        yield s, torch.stack(out, dim=1)


def last_token_logprobs(
    lm: LoadedModel,
    prompts: list[str],
    vectors: torch.Tensor,
    layer: int,
    scale: float = 1.0,
    chat: bool = False,
    batch_size: int = 64,
) -> torch.Tensor:
    """``[V, n, vocab]`` float32 log-probabilities under steering vectors (see :func:`logprob_chunks`)."""
    perturb = vector_perturb(lm, vectors, layer, scale)
    return torch.cat([lp for _, lp in logprob_chunks(lm, prompts, len(vectors), perturb, chat, batch_size)])


@dataclass
class KLCurves:
    """KL divergences of every perturbation's next-token distribution (last prompt position).

    Attributes:
        to_reference: ``[V]`` mean over prompts of the KL against the reference perturbation
            (None without one); per_prompt_reference ``[V, n]``.
        to_unsteered: ``[V]`` mean over prompts of the KL against the unsteered model;
            per_prompt_unsteered ``[V, n]``.
        direction: ``"k||ref"`` (KL(P_k ‖ P_ref)) or ``"ref||k"``, see the module docstring.
    """

    to_reference: torch.Tensor | None
    to_unsteered: torch.Tensor
    per_prompt_reference: torch.Tensor | None
    per_prompt_unsteered: torch.Tensor
    direction: str


def kl_of(
    lm: LoadedModel,
    prompts: list[str],
    count: int,
    perturb: Perturb,
    reference: int | None = None,
    chat: bool = False,
    batch_size: int = 64,
    direction: str = "k||ref",
) -> KLCurves:
    """KL divergence (nats) of the next-token distribution at the last prompt position under each
    of ``count`` perturbations, against perturbation ``reference`` and against the unsteered
    model (METHOD.md section 3).

    Raises:
        MelboError: an unknown direction, a reference outside ``0..count-1``.
    """
    check_direction(direction)
    if reference is not None and not 0 <= reference < count:
        raise MelboError(f"reference {reference} is outside the {count} perturbations (0..{count - 1})")
    base = next(logprob_chunks(lm, prompts, 1, lambda rows: nullcontext(), chat))[1][0]
    ref = (
        next(logprob_chunks(lm, prompts, 1, lambda rows: perturb([reference]), chat))[1][0]
        if reference is not None
        else None
    )
    to_u, to_r = [], []
    for _, lp in logprob_chunks(lm, prompts, count, perturb, chat, batch_size):
        pair = (lp, base[None]) if direction == "k||ref" else (base[None], lp)
        to_u.append(kl_divergence(*pair))
        if ref is not None:
            to_r.append(kl_divergence(lp, ref[None]) if direction == "k||ref" else kl_divergence(ref[None], lp))
    pu = torch.cat(to_u) if to_u else torch.zeros(0, len(prompts))
    pr = (torch.cat(to_r) if to_r else torch.zeros(0, len(prompts))) if ref is not None else None
    return KLCurves(pr.mean(1) if pr is not None else None, pu.mean(1), pr, pu, direction)


def kl_curves(
    lm: LoadedModel,
    prompts: list[str],
    vectors: torch.Tensor,
    layer: int,
    reference: torch.Tensor | None = None,
    scale: float = 1.0,
    chat: bool = False,
    batch_size: int = 64,
    direction: str = "k||ref",
) -> KLCurves:
    """:func:`kl_of` for steering vectors ``[V, d_model]`` added after block ``layer`` at
    ``scale``, with an explicit ``reference`` vector ``[d_model]`` (or None)."""
    rows = vectors if reference is None else torch.cat([vectors, reference.detach().float().reshape(1, -1)])
    perturb = vector_perturb(lm, rows, layer, scale)
    out = kl_of(
        lm, prompts, len(rows), perturb, None if reference is None else len(vectors), chat, batch_size, direction
    )
    if reference is None:
        return out
    cut = len(vectors)
    assert out.to_reference is not None and out.per_prompt_reference is not None
    return KLCurves(
        out.to_reference[:cut],
        out.to_unsteered[:cut],
        out.per_prompt_reference[:cut],
        out.per_prompt_unsteered[:cut],
        direction,
    )


def vector_variants(
    vectors: torch.Tensor,
    indices: list[int],
    mean: list[int] | None = None,
    rescale: float | None = None,
    kind: str = "vector",
) -> tuple[torch.Tensor, list[str]]:
    """The rows to apply for ``melbo generate``: the chosen vectors, then (``mean``) the mean of
    the vectors ``mean``, then (``rescale``) a copy of each of those rescaled to norm ``rescale``,
    so that one command shows METHOD.md section 3's claims side by side.

    Args:
        vectors: ``[V, d_model]`` (a bank's vectors or its random baseline).
        indices: rows to apply one by one (may be empty when ``mean`` is given).
        mean: rows whose mean is applied as one more vector.
        rescale: target norm of the rescaled copies (> 0).

    Returns:
        ``(rows [m, d_model], labels)``, each label naming the row and its norm.

    Raises:
        MelboError: bad indices, a non-positive ``rescale``, a zero row to rescale.
    """
    rows = [vectors[i].float() for i in indices]
    labels = [f"{kind} {i} (norm {float(vectors[i].norm()):.4g})" for i in indices]
    if mean:
        m = mean_vector(vectors, mean)
        rows.append(m)
        labels.append(f"mean of {kind}s {','.join(str(i) for i in mean)} (norm {float(m.norm()):.4g})")
    if not rows:
        raise MelboError("no vector chosen: give --vectors and/or --mean")
    out = torch.stack(rows)
    if rescale is not None:
        out = torch.cat([out, rescale_vectors(out, rescale)])
        labels = labels + [f"{lab.rsplit(' (norm', 1)[0]} rescaled to norm {rescale:g}" for lab in labels]
    return out, labels
