"""Anomaly detection with a bank of steering vectors (the MELBO post's proposal: "train a large set
of unsupervised model perturbations, then during deployment, if the model's activations look
similar to one of the previously learned perturbations, auditors can go back and evaluate the
behaviors encoded by that perturbation").

The score uses METHOD.md section 1's quantities. A steering vector θ_i added after the source
layer moves the target layer's activation at a prompt's last token by

    δ_i = mean over reference prompts c of  Z_c(θ_i) − Z_c(0)          [d_model]

(``where="target"``; with ``where="source"`` the direction is θ_i itself, at the source layer).
An input x whose own activation a(x) (target layer, last token, unsteered) has moved away from
the clean reference mean μ *along* some δ_i looks like that perturbation is active. With
u_i = δ_i / ‖δ_i‖ and p_i(x) = ⟨a(x), u_i⟩ the score is the largest standardized shift along a
bank direction,

    s(x) = max_i (p_i(x) − mean_c p_i(c)) / std_c p_i(c),

a z-score in units of the clean prompts' own spread along u_i (so directions in which clean
inputs already vary a lot do not dominate; the sign counts: −θ_i is another perturbation). The
baseline is the plain distance ‖a(x) − μ‖ from the clean mean (same layer and position). The
reference prompts' own scores are computed leave-one-out (μ and std without that prompt), so the
flagging threshold, a quantile of them, is an out-of-sample false-positive rate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from melbo.core.errors import MelboError
from melbo.core.models import LoadedModel
from melbo.core.prompts import encode_prompts
from melbo.core.slice import Slice

WHERE = ("target", "source")
POSITIONS = ("last", "mean")


def auroc(positive: torch.Tensor | list[float], negative: torch.Tensor | list[float]) -> float:
    """Area under the ROC curve of scores, positives (e.g. triggered prompts) against negatives
    (clean prompts): P(s⁺ > s⁻) + ½ P(s⁺ = s⁻), the Mann–Whitney U statistic over n⁺·n⁻ pairs.
    1 = every positive above every negative, 0.5 = chance.

    Raises:
        MelboError: an empty group, or a non-finite score.
    """
    pos = torch.as_tensor(positive, dtype=torch.float64).flatten()
    neg = torch.as_tensor(negative, dtype=torch.float64).flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        raise MelboError(f"AUROC needs both groups non-empty (got {pos.numel()} positive, {neg.numel()} negative)")
    if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise MelboError("AUROC of non-finite scores (nan or inf) is undefined")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def activations(lm: LoadedModel, prompts: list[str], src: int, tgt: int, positions: str = "last") -> tuple:
    """Unsteered activations at the source and target layers, one row per prompt:
    ``(a_src [n, d_model], a_tgt [n, d_model], slice)`` in float32, at each prompt's last token
    (``positions="last"``) or averaged over its tokens after the first (``"mean"``; the first
    position, BOS, has massive norms in many models). ``slice`` is the :class:`Slice` of blocks
    ``src+1..tgt`` on these prompts, for steered passes.

    Raises:
        MelboError: bad positions, empty prompts.
    """
    if positions not in POSITIONS:
        raise MelboError(f"positions {positions!r} is not allowed; allowed: {', '.join(POSITIONS)}")
    batch = encode_prompts(lm.tokenizer, prompts).to(lm.device)
    with torch.no_grad():
        s = Slice(lm.model, lm.blocks, batch, src, tgt)
    return _pool(s.h_src, s.mask, positions), _pool(s.z0, s.mask, positions), s


def _pool(h: torch.Tensor, mask: torch.Tensor, positions: str) -> torch.Tensor:
    """``[n, T, d] -> [n, d]``: the last counted position, or the mean over counted positions
    after the first (the first alone where a prompt has one token)."""
    mask = mask.to(h.device)
    if positions == "last":
        last = mask.long().cumsum(1).argmax(1)
        return h[torch.arange(h.shape[0], device=h.device), last].float()
    keep = mask.clone()
    keep[:, 0] = keep[:, 0] & (mask.sum(1) == 1)
    w = keep.float().unsqueeze(-1)
    return ((h.float() * w).sum(1) / w.sum(1)).float()


@dataclass
class Detector:
    """A fitted detector: bank directions and the clean reference statistics (module docstring).

    Attributes:
        directions: ``[N, d_model]`` unit directions u_i (float32).
        where: ``"target"`` (u_i ∝ δ_i at the target layer) or ``"source"`` (u_i ∝ θ_i).
        positions: ``"last"`` or ``"mean"``.
        reference: ``[n_ref, d_model]`` the clean reference activations a(c).
        src, tgt: the bank's source and target layers.
    """

    directions: torch.Tensor
    where: str
    positions: str
    reference: torch.Tensor
    src: int
    tgt: int

    @classmethod
    def fit(
        cls,
        lm: LoadedModel,
        vectors: torch.Tensor,
        src: int,
        tgt: int,
        reference: list[str],
        where: str = "target",
        positions: str = "last",
        chunk: int = 16,
    ) -> Detector:
        """Fit on a bank's steering vectors ``[N, d_model]`` (norm R each) and clean reference
        prompts (at least 3): δ_i is measured with the truncated pass (blocks ``src+1..tgt``) on
        the reference prompts, ``chunk`` vectors at a time.

        Raises:
            MelboError: bad ``where`` / ``positions``, fewer than 3 reference prompts, layers out
                of range, a vector of the wrong width, a zero vector or zero effect.
        """
        if where not in WHERE:
            raise MelboError(f"where {where!r} is not allowed; allowed: {', '.join(WHERE)}")
        if len(reference) < 3:
            raise MelboError(
                f"need at least 3 clean reference prompts to measure the clean spread, got {len(reference)}"
            )
        if not 0 <= src < tgt < lm.num_layers:
            raise MelboError(f"need 0 <= source layer < target layer < {lm.num_layers}, got {src} and {tgt}")
        vectors = torch.as_tensor(vectors).float()
        if vectors.ndim != 2 or vectors.shape[1] != lm.d_model or len(vectors) == 0:
            raise MelboError(f"vectors of shape {tuple(vectors.shape)}; expected [N >= 1, {lm.d_model}] for this model")
        a_src, a_tgt, s = activations(lm, reference, src, tgt, positions)
        if where == "source":
            raw = vectors
            ref = a_src
        else:
            rows = []
            with torch.no_grad():
                for k in range(0, len(vectors), chunk):
                    z = s(vectors[k : k + chunk].to(lm.device))  # [V, n, T, d]
                    pooled = torch.stack([_pool(zv, s.mask, positions) for zv in z])  # [V, n, d]
                    rows.append((pooled - a_tgt[None]).mean(1).cpu())
            raw = torch.cat(rows)
            ref = a_tgt
        norms = raw.norm(dim=1, keepdim=True)
        if not torch.all(norms > 0):
            bad = int((norms.squeeze(1) <= 0).nonzero()[0])
            raise MelboError(f"vector {bad} has zero norm or no effect at the target layer; it gives no direction")
        return cls(raw / norms, where, positions, ref.cpu(), src, tgt)

    def _stats(self, ref: torch.Tensor):
        p = ref @ self.directions.T  # [n, N]
        return ref.mean(0), p.mean(0), p.std(0).clamp_min(1e-12)

    def activations(self, lm: LoadedModel, prompts: list[str]) -> torch.Tensor:
        """``[n, d_model]`` a(x) of the prompts at this detector's layer and positions."""
        a_src, a_tgt, _ = activations(lm, prompts, self.src, self.tgt, self.positions)
        return (a_src if self.where == "source" else a_tgt).cpu()

    def score(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores of activations ``a`` ``[n, d_model]``: ``(s [n], best [n] the index i of the
        largest standardized shift, baseline [n] = ‖a − μ‖)`` (module docstring)."""
        mu, pm, ps = self._stats(self.reference)
        z = (a.float() @ self.directions.T - pm) / ps
        best = z.argmax(1)
        return z.max(1).values, best, (a.float() - mu).norm(dim=1)

    def reference_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Leave-one-out ``(s [n_ref], baseline [n_ref])`` of the reference prompts: each scored
        (:meth:`score`) by the detector fitted without it."""
        ref, s, b = self.reference, [], []
        for j in range(len(ref)):
            without = dataclasses.replace(self, reference=torch.cat([ref[:j], ref[j + 1 :]]))
            sj, _, bj = without.score(ref[j : j + 1])
            s.append(sj)
            b.append(bj)
        return torch.cat(s), torch.cat(b)


def threshold(reference_scores: torch.Tensor, fpr: float = 0.05) -> float:
    """The flagging threshold: the (1 − ``fpr``) quantile of the clean reference prompts'
    leave-one-out scores, so about a share ``fpr`` of clean inputs is flagged.

    Raises:
        MelboError: ``fpr`` not in (0, 1).
    """
    check_fpr(fpr)
    return float(torch.quantile(reference_scores.double(), 1 - fpr))


def check_fpr(fpr: float, what: str = "false-positive rate") -> float:
    """``fpr`` when it is a number in (0, 1).

    Raises:
        MelboError: naming ``what`` (e.g. ``--fpr``) and the value.
    """
    if not 0 < fpr < 1:
        raise MelboError(f"{what} {fpr!r} is not allowed; allowed: a number in (0, 1)")
    return fpr


def detect(
    bank,
    prompts: list[str],
    reference: list[str],
    where: str = "target",
    positions: str = "last",
    fpr: float = 0.05,
) -> dict:
    """Score and flag ``prompts`` with a vector bank (its model: ``bank.model()``), against clean
    ``reference`` prompts (module docstring for the score).

    Returns:
        ``{"threshold", "fpr", "where", "positions", "rows": [{"prompt", "score", "vector",
        "flagged", "baseline"}], "reference": [{"prompt", "score", "baseline"}]}``; ``vector``
        is the bank index whose direction the input's shift follows most; ``flagged`` is
        ``score > threshold``; reference scores are leave-one-out.

    Raises:
        MelboError: an adapter bank (adapters change weights, not the residual stream: no
            single direction per perturbation), and :meth:`Detector.fit`'s errors.
    """
    if bank.kind != "vector":
        raise MelboError(
            f"melbo detect takes a bank of steering vectors (melbo, dct, ortho); this bank holds {bank.kind}s"
        )
    lm = bank.model()
    det = Detector.fit(lm, bank.vectors, bank.layer, int(bank.meta["target_layer"]), reference, where, positions)
    s, best, base = det.score(det.activations(lm, prompts))
    rs, rb = det.reference_scores()
    cut = threshold(rs, fpr)
    rows = [
        {"prompt": p, "score": float(a), "vector": int(i), "flagged": bool(a > cut), "baseline": float(b)}
        for p, a, i, b in zip(prompts, s, best, base)
    ]
    ref = [{"prompt": p, "score": float(a), "baseline": float(b)} for p, a, b in zip(reference, rs, rb)]
    return {"threshold": cut, "fpr": fpr, "where": where, "positions": positions, "rows": rows, "reference": ref}
