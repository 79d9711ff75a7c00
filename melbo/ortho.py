"""MELBO-ortho: many mutually orthogonal vectors with the behaviour of one (METHOD.md section 3).

Given a base vector ``θ₀`` added after block ``src`` and prompts, with ``z₀,i = mean_{t∈I_i}
h_tgt,i,t(θ₀)`` (the target activations of prompt ``i`` averaged over its positions; all
positions by default, as in the reference), find ``θ₁, θ₂, …`` one after another, ``θ_k``
minimizing

    loss(θ) = Σ_i ‖ mean_{t∈I_i} h_tgt,i,t(θ) − z₀,i ‖₂        (one prompt: the reference's loss)

subject to ``θ_k ⟂ θ₀, …, θ_{k-1}``: Adam (lr 0.01, torch's default betas), 1000 steps per
vector, ``θ`` projected onto the orthogonal complement after every step, no norm constraint.
Each ``θ_k`` starts at the projection of ``θ₀`` onto that complement, i.e. at 0 (the reference
starts at ``θ₀`` and projects after its first step). Stops after ``num_vectors`` vectors, when a
vector's norm falls below ``min_norm`` (the reference dropped norms ≤ 0.1; such a vector is not
kept; norms below 1e-6·‖θ₀‖ are float noise and always stop it), on a NaN, or when the
complement is empty (``d_model`` vectors). The forward is the core's truncated :class:`melbo.objective.Slice` (blocks ``src+1..tgt`` only).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from melbo.errors import MelboError
from melbo.objective import Slice
from melbo.train import check_positive, project_out


@dataclass
class OrthoConfig:
    """Hyper-parameters of MELBO-ortho (defaults from the reference).

    Attributes:
        num_vectors: N, new vectors to find (the bank then has up to N + 1 rows, row 0 = θ₀).
        steps: Adam steps per vector.
        lr: Adam learning rate.
        betas: Adam betas (torch's defaults, as the reference used).
        min_norm: stop when a new vector's norm is below this (0 disables the rule).
    """

    num_vectors: int = 100
    steps: int = 1000
    lr: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    min_norm: float = 0.1

    def __post_init__(self) -> None:
        if int(self.num_vectors) != self.num_vectors or self.num_vectors < 1:
            raise MelboError(f"number of vectors must be a whole number >= 1, got {self.num_vectors!r}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise MelboError(f"steps must be a whole number >= 1, got {self.steps!r}")
        check_positive("learning rate", self.lr)
        try:
            ok = math.isfinite(float(self.min_norm)) and float(self.min_norm) >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise MelboError(f"minimum norm must be a finite number >= 0, got {self.min_norm!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OrthoVector:
    """One MELBO-ortho vector: ``vector [d_model]`` float32, its loss before the first step and
    at the end, its norm, the loss before each step, seconds spent."""

    vector: torch.Tensor
    start_loss: float
    loss: float
    norm: float
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class OrthoResult:
    """``vectors [k+1, d_model]`` (row 0 = θ₀, then the kept vectors), their per-vector results,
    why it stopped (``"num_vectors"``, ``"min_norm"``, ``"nan"``, ``"full_basis"``) and the
    rejected last vector's norm (when it stopped on ``min_norm``)."""

    vectors: torch.Tensor
    results: list[OrthoVector]
    stop_reason: str
    rejected_norm: float | None = None


def position_means(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[V, n, d]``: mean over each prompt's counted positions of ``z`` (``[V, n, T, d]``)."""
    m = mask.to(z.dtype)[None, :, :, None]
    return (z * m).sum(2) / m.sum(2).clamp_min(1)


def ortho_target(slice_: Slice, base: torch.Tensor) -> torch.Tensor:
    """``z₀ [n, d_model]`` float32: ``mean_t h_tgt(θ₀)`` for each prompt."""
    with torch.no_grad():
        z = slice_(base.reshape(1, -1).to(slice_.h_src.device))
    return position_means(z.float(), slice_.mask)[0]


def ortho_loss(slice_: Slice, theta: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[V]``: ``Σ_i ‖mean_t h_tgt,i(θ_v) − z₀,i‖₂`` (METHOD.md section 3) for ``theta [V, d]``."""
    return (position_means(slice_(theta).float(), slice_.mask) - target[None]).norm(dim=-1).sum(-1)


def train_ortho_vector(slice_: Slice, target: torch.Tensor, basis: torch.Tensor, cfg: OrthoConfig,
                       progress: tqdm | None = None) -> OrthoVector:
    """Find one vector orthogonal to the rows of ``basis`` (``[k, d]`` orthonormal, float64).

    Starts at 0 (θ₀ projected onto the complement); each step: loss, backward, Adam step, then
    θ projected onto the orthogonal complement of ``basis``.
    """
    t0 = time.perf_counter()
    device = slice_.h_src.device
    basis = basis.to(device)
    theta = torch.zeros(1, slice_.d_model, device=device, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=cfg.lr, betas=cfg.betas)
    history = []
    for _ in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        loss = ortho_loss(slice_, theta, target)
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            theta.copy_(project_out(theta, basis))
        history.append(loss.item())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{history[-1]:.4g}", refresh=False)
        if not math.isfinite(history[-1]):
            break
    with torch.no_grad():
        final = ortho_loss(slice_, theta, target).item()
    vec = theta.detach()[0].float().cpu()
    return OrthoVector(vec, history[0], final, float(vec.double().norm()), history, time.perf_counter() - t0)


def train_ortho(slice_: Slice, base: torch.Tensor, cfg: OrthoConfig,
                on_vector: Callable[[int, OrthoVector], None] | None = None,
                show_progress: bool = True) -> OrthoResult:
    """MELBO-ortho from base vector ``base`` (``[d_model]``) on the slice's prompts and positions.

    Args:
        slice_: the truncated pass (source layer = where θ is added, target layer).
        base: θ₀.
        cfg: hyper-parameters.
        on_vector: called after each kept vector with its number (1, 2, …) and result.

    Returns:
        :class:`OrthoResult`; its vectors are pairwise orthogonal and orthogonal to θ₀ (up to
        float error).

    Raises:
        MelboError: θ₀ is zero or not ``d_model`` wide.
    """
    d = slice_.d_model
    base = base.detach().float().cpu().reshape(-1)
    if base.shape[0] != d:
        raise MelboError(f"base vector is {base.shape[0]} wide, the model has d_model={d}")
    if not base.norm() > 0 or not torch.isfinite(base).all():
        raise MelboError("the base vector is zero or not finite; MELBO-ortho needs a steering vector θ₀")
    target = ortho_target(slice_, base)
    basis = (base.double() / base.double().norm())[None]
    # below ~1e-6 of θ₀'s norm a projected vector is float noise, and its direction is not orthogonal
    floor = max(cfg.min_norm, 1e-6 * float(base.double().norm()))
    vectors, results = [base], []
    reason, rejected = "num_vectors", None
    total = min(cfg.num_vectors, d - 1)
    with tqdm(total=total * cfg.steps, desc="MELBO-ortho", unit="step", disable=not show_progress,
              dynamic_ncols=True) as bar:
        for k in range(1, cfg.num_vectors + 1):
            if len(basis) >= d:
                reason = "full_basis"
                break
            res = train_ortho_vector(slice_, target, basis, cfg, bar)
            if not (math.isfinite(res.loss) and torch.isfinite(res.vector).all()):
                reason = "nan"
                break
            if res.norm < floor:
                reason, rejected = "min_norm", res.norm
                break
            u = project_out(res.vector.double()[None], basis)
            basis = torch.cat([basis, u / u.norm()])
            vectors.append(res.vector)
            results.append(res)
            if on_vector is not None:
                on_vector(k, res)
    return OrthoResult(torch.stack(vectors), results, reason, rejected)


# ---------------------------------------------------------------- a whole run

def read_vector_file(path: str) -> torch.Tensor:
    """A base vector from a file: a melbo bank (``vectors``), another safetensors file (a
    ``vector``/``vectors`` tensor or its only tensor) or a ``.npy`` array; 1-D, or 2-D (then
    ``[k, d]`` rows). Nothing is unpickled.

    Raises:
        MelboError: missing, unreadable, or no suitable tensor.
    """
    import numpy as np
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise MelboError(f"--vector-file {path!r} does not exist")
    try:
        if p.suffix == ".npy":
            t = torch.from_numpy(np.load(str(p), allow_pickle=False)).float()
        else:
            with safe_open(str(p), framework="pt") as f:
                keys = list(f.keys())
                key = next((k for k in ("vectors", "vector") if k in keys), keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise MelboError(f"--vector-file {path!r} holds tensors {keys}; name one 'vector' or 'vectors'")
                t = f.get_tensor(key).float()
    except MelboError:
        raise
    except Exception as e:  # numpy/safetensors raise their own error types
        raise MelboError(f"cannot read --vector-file {path!r} (a .safetensors or .npy file): {e}") from e
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise MelboError(f"--vector-file {path!r} holds a tensor of shape {tuple(t.shape)}; need [d] or [k, d]")
    return t


def run_ortho(lm, out: str, base: torch.Tensor, prompts: list[str], source_layer: int, target_layer: int,
              cfg: OrthoConfig, positions: str = "all", chat: bool = False, base_info: dict | None = None,
              window: int = 50, direction: str = "k||ref", show_progress: bool = True) -> dict:
    """Run MELBO-ortho and write ``out``: ``bank.safetensors`` (row 0 = θ₀; saved after each
    vector), ``measures.csv`` (index, norm, KL to θ₀, KL to unsteered), ``norms.png``, ``kl.png``,
    ``summary.json`` and ``summary.md``. Returns the summary.

    Raises:
        MelboError: bad input, or ``out`` already holds a bank.
    """
    from melbo.bank import Bank, model_meta, save_bank
    from melbo.measure import check_direction, effective_window, kl_curves, kl_label, vector_norms
    from melbo.models import check_layers
    from melbo.plot import plot_measures
    from melbo.prompts import check_prompts, encode_prompts, parse_positions

    check_prompts(prompts)
    pos = parse_positions(positions)
    check_direction(direction)
    effective_window(10, window)
    outp = Path(out)
    if (outp / "bank.safetensors").exists():
        raise MelboError(f"{str(outp)!r} already holds a bank; choose another --out")
    if outp.exists() and not outp.is_dir():
        raise MelboError(f"--out {str(outp)!r} is a file, not a folder")
    src, tgt = check_layers(source_layer, target_layer, lm.num_layers)
    batch = encode_prompts(lm.tokenizer, prompts, pos, chat)
    slice_ = Slice(lm.model, lm.blocks, batch, src, tgt)
    meta = {**model_meta(lm), "method": "melbo-ortho", "kind": "vector", "source_layer": src, "target_layer": tgt,
            "prompts": list(prompts), "positions": str(pos), "chat": chat,
            **{k: v for k, v in cfg.to_dict().items() if k != "num_vectors"}, "requested_vectors": cfg.num_vectors,
            "betas": list(cfg.betas), "base": base_info or {}, "radius": float(base.norm()),
            "residual_norm": slice_.mean_norm(), "vectors": [{"index": 0, "norm": float(base.norm()), "base": True}]}
    outp.mkdir(parents=True, exist_ok=True)
    state = {"vectors": base.float().reshape(1, -1)}

    def save(k, res):
        state["vectors"] = torch.cat([state["vectors"], res.vector[None]])
        meta["vectors"].append({"index": k, "norm": res.norm, "start_loss": res.start_loss, "loss": res.loss,
                                "seconds": res.seconds})
        save_bank(outp / "bank.safetensors", Bank(state["vectors"], meta))

    t0 = time.perf_counter()
    result = train_ortho(slice_, base, cfg, on_vector=save, show_progress=show_progress)
    seconds = time.perf_counter() - t0
    meta["stop_reason"], meta["rejected_norm"] = result.stop_reason, result.rejected_norm
    meta["train_seconds"] = seconds
    save_bank(outp / "bank.safetensors", Bank(result.vectors, meta))

    vecs = result.vectors
    kl = kl_curves(lm, prompts, vecs, src, reference=vecs[0], chat=chat, direction=direction)
    norms = vector_norms(vecs)
    lines = ["index,norm,kl_to_base,kl_to_unsteered"]
    for i in range(len(vecs)):
        lines.append(f"{i},{norms[i]:.6g},{kl.to_reference[i]:.6g},{kl.to_unsteered[i]:.6g}")
    (outp / "measures.csv").write_text("\n".join(lines) + "\n")
    plots = plot_measures(outp, norms.tolist(), kl.to_reference.tolist(), kl.to_unsteered.tolist(), direction, 0,
                          window, title=f"MELBO-ortho from θ₀ ({meta['model']}, {src}→{tgt}): ", base_norm=float(norms[0]))
    new = result.results
    summary = {
        "out": str(outp), "model": meta["model"], "source_layer": src, "target_layer": tgt,
        "num_vectors": len(new), "stop_reason": result.stop_reason, "rejected_norm": result.rejected_norm,
        "base_norm": float(norms[0]), "kl_direction": kl_label(direction, "0"),
        "norms": norms.tolist(), "kl_to_base": kl.to_reference.tolist(), "kl_to_unsteered": kl.to_unsteered.tolist(),
        "start_loss": [r.start_loss for r in new], "loss": [r.loss for r in new],
        "max_abs_cosine": max_abs_cosine(vecs), "seconds": seconds,
        "seconds_per_vector": seconds / max(1, len(new)), "plots": [str(p) for p in plots],
    }
    (outp / "summary.json").write_text(json.dumps(summary, indent=2))
    write_ortho_summary(outp / "summary.md", meta, summary)
    return summary


def max_abs_cosine(vectors: torch.Tensor) -> float:
    """Largest |cosine| between two different rows of ``vectors`` (0 for fewer than two)."""
    if len(vectors) < 2:
        return 0.0
    u = torch.nn.functional.normalize(vectors.double(), dim=1)
    c = (u @ u.T).abs()
    c.fill_diagonal_(0)
    return float(c.max())


def write_ortho_summary(path: Path, meta: dict, s: dict) -> Path:
    """Markdown summary of a MELBO-ortho run."""
    n = len(s["norms"])
    lines = [
        f"# MELBO-ortho: {meta['model']}", "",
        f"Base vector θ₀: {json.dumps(meta.get('base', {}))}, norm {s['base_norm']:.4g}; source layer "
        f"{meta['source_layer']} → target layer {meta['target_layer']}; positions {meta['positions']}; "
        f"{meta['steps']} Adam steps per vector, lr {meta['lr']}; min norm {meta['min_norm']}.", "",
        f"Found {s['num_vectors']} vectors (stop: {s['stop_reason']}"
        + (f", rejected norm {s['rejected_norm']:.3g}" if s["rejected_norm"] is not None else "")
        + f"); largest |cos| between any two rows: {s['max_abs_cosine']:.2e}; {s['seconds_per_vector']:.2f} s per vector.",
        "", f"KL direction: {s['kl_direction']} (P_k = next-token distribution at the last prompt position steered "
        f"by θ_k), in nats, mean over prompts. Plots: norms.png, kl.png; all values: measures.csv.", "",
        "| k | norm | loss start → end | KL to θ₀ | KL to unsteered |", "|---|---|---|---|---|",
    ]
    shown = list(range(min(n, 10))) + [i for i in range(max(10, n - 5), n)]
    for i in shown:
        loss = "" if i == 0 else f"{s['start_loss'][i - 1]:.4g} → {s['loss'][i - 1]:.4g}"
        lines.append(f"| {i} | {s['norms'][i]:.4g} | {loss} | {s['kl_to_base'][i]:.4g} | {s['kl_to_unsteered'][i]:.4g} |")
    path.write_text("\n".join(lines) + "\n")
    return path
