"""A whole MELBO run: train vectors, the random baseline beside them, completions, files.

A run folder holds ``bank.safetensors`` (learned vectors, random baseline, metadata; saved after
every vector), ``completions.jsonl`` (one line per vector x prompt: unsteered, learned, random)
and ``summary.md``. ``resume=True`` continues a stopped run without redoing finished vectors.
All input is checked before anything is written.
"""

from __future__ import annotations

import difflib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from melbo.bank import Bank, atomic_write, check_bank, load_bank, model_meta, save_bank
from melbo.errors import MelboError
from melbo.generate import GenerationConfig, generate
from melbo.models import LoadedModel, check_layers, default_layers, load_model
from melbo.objective import Slice, melbo_objective
from melbo.prompts import check_prompts, encode_prompts, parse_positions
from melbo.train import TrainConfig, check_positive, random_vectors, train_vectors

BANK, COMPLETIONS, SUMMARY = "bank.safetensors", "completions.jsonl", "summary.md"


def parse_radius(text: str | float) -> tuple[float, bool]:
    """``"4"`` -> (4.0, absolute); ``"0.5x"`` -> (0.5, relative to the mean ‖h_src‖).

    Raises:
        MelboError: not a number > 0, with or without a trailing ``x``.
    """
    s = str(text).strip().lower()
    relative = s.endswith("x")
    try:
        value = float(s[:-1] if relative else s)
    except ValueError:
        raise MelboError(
            f"bad radius {text!r}; allowed: a number > 0 (residual-stream units) or a multiple of the "
            f"mean residual norm at the source layer like 0.5x"
        ) from None
    check_positive("radius R", value)
    return value, relative


@dataclass
class RunSpec:
    """Everything a ``melbo train`` run needs (CLI flags map one to one).

    ``source_layer``/``target_layer`` None take :func:`melbo.models.default_layers`;
    ``radius`` is a number or ``"<k>x"`` (k times the mean residual norm at the source layer).
    """

    model: str
    prompts: list[str]
    out: str
    radius: str = "0.2x"
    source_layer: int | None = None
    target_layer: int | None = None
    p: float = 2.0
    q: float = 1.0
    positions: str = "all"
    num_vectors: int = 16
    steps: int = 300
    lr: float | None = None
    seed: int = 0
    heldout: list[str] = field(default_factory=list)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    resume: bool = False
    device: str = "auto"
    dtype: str = "auto"
    blocks_path: str | None = None
    show_progress: bool = True
    method: str = "melbo"
    writes_only: bool = False
    calibration_lambda: float = 0.5
    dct_options: dict = field(default_factory=dict)


def _check_out(out: Path, resume: bool) -> None:
    if resume:
        if not (out / BANK).is_file():
            raise MelboError(f"--resume: no {BANK} in {str(out)!r} to continue; drop --resume to start a new run")
    elif (out / BANK).exists():
        raise MelboError(f"{str(out)!r} already holds a run; pass --resume to continue it, or choose another --out")
    elif out.exists() and not out.is_dir():
        raise MelboError(f"--out {str(out)!r} is a file, not a folder")


def _check_resume(bank: Bank, meta: dict) -> None:
    keys = ("source_layer", "target_layer", "radius", "p", "q", "positions", "prompts", "steps", "lr", "seed", "chat")
    for k in keys:
        if bank.meta.get(k) != meta.get(k):
            raise MelboError(
                f"--resume: the run in the bank has {k}={bank.meta.get(k)!r}, this command asks for "
                f"{meta.get(k)!r}; resume with the same settings (only --num-vectors may grow)"
            )


def similarity(a: str, b: str) -> float:
    """Character similarity in [0, 1] of two completions (difflib ratio; 1 = identical)."""
    return difflib.SequenceMatcher(None, a, b).ratio()


def run_train(spec: RunSpec, lm: LoadedModel | None = None) -> dict:
    """Run MELBO end to end and write the run folder. Returns the summary as a dict.

    ``spec.method == "dct"`` runs deep causal transcoding instead (:func:`melbo.dct.run_dct`, same
    folder and bank format); ``spec.radius == "auto"`` calibrates R (METHOD.md section 5);
    ``spec.writes_only`` measures only what the blocks write (``Z(θ) − θ``).

    Raises:
        MelboError: any bad input (checked before anything is written).
    """
    from melbo.dct import auto_radius, is_auto, run_dct

    if spec.method == "dct":
        return run_dct(spec, lm)
    if spec.method != "melbo":
        raise MelboError(f"unknown method {spec.method!r}; allowed: melbo, dct")
    check_prompts(spec.prompts)
    for p in spec.heldout:
        check_prompts([p])
    positions = parse_positions(spec.positions)
    auto = is_auto(spec.radius)
    r_value, r_relative = (1.0, False) if auto else parse_radius(spec.radius)
    check_positive("calibration ratio λ", spec.calibration_lambda)
    TrainConfig(radius=1.0, p=spec.p, q=spec.q, num_vectors=spec.num_vectors, steps=spec.steps, lr=spec.lr)
    out = Path(spec.out)
    _check_out(out, spec.resume)

    lm = lm or load_model(spec.model, spec.device, spec.dtype, spec.blocks_path)
    L = lm.num_layers
    d_src, d_tgt = default_layers(L)
    src, tgt = check_layers(d_src if spec.source_layer is None else spec.source_layer,
                            d_tgt if spec.target_layer is None else spec.target_layer, L)
    batch = encode_prompts(lm.tokenizer, spec.prompts, positions, spec.generation.chat)
    slice_ = Slice(lm.model, lm.blocks, batch, src, tgt, writes_only=spec.writes_only)
    residual_norm = slice_.mean_norm()
    radius = r_value * residual_norm if r_relative else r_value
    calibration = auto_radius(lm, batch, src, tgt, spec.writes_only, spec.calibration_lambda, spec.seed) if auto else None
    radius = calibration.radius if calibration else radius
    cfg = TrainConfig(radius=radius, p=spec.p, q=spec.q, num_vectors=spec.num_vectors, steps=spec.steps,
                      lr=spec.lr, seed=spec.seed)
    meta = {
        **model_meta(lm), "method": "melbo", "kind": "vector",
        "source_layer": src, "target_layer": tgt, "radius": radius, "radius_spec": str(spec.radius),
        "residual_norm": residual_norm, "p": spec.p, "q": spec.q, "positions": str(positions),
        "prompts": list(spec.prompts), "chat": spec.generation.chat, "steps": spec.steps,
        "lr": cfg.learning_rate(lm.d_model), "lr_spec": spec.lr, "betas": list(cfg.betas),
        "weight_decay": cfg.weight_decay, "seed": spec.seed, "vectors": [],
        "writes_only": spec.writes_only, "calibration": calibration.to_dict() if calibration else None,
    }
    done = None
    if spec.resume:
        old = load_bank(out / BANK)
        check_bank(old, lm)
        _check_resume(old, meta)
        done = old.vectors
        meta["vectors"] = old.meta.get("vectors", [])[: len(done)]
        starts = old.extra.get("start_vectors", torch.zeros(0, lm.d_model))[: len(done)]
    else:
        starts = torch.zeros(0, lm.d_model)

    out.mkdir(parents=True, exist_ok=True)
    rand = random_vectors(spec.num_vectors, lm.d_model, radius, spec.seed)
    state = {"vectors": done if done is not None else torch.zeros(0, lm.d_model), "starts": starts}

    def save(k, res):
        state["vectors"] = torch.cat([state["vectors"], res.vector[None]])
        state["starts"] = torch.cat([state["starts"], res.start[None]])
        meta["vectors"].append({"index": k, "objective": res.objective, "start_objective": res.start_objective,
                                "cosine_start_end": res.cosine_start_end, "seconds": res.seconds})
        save_bank(out / BANK, Bank(state["vectors"], meta,
                                   {"random_vectors": rand[: len(state["vectors"])], "start_vectors": state["starts"]}))

    t0 = time.perf_counter()
    new = train_vectors(slice_, cfg, done, on_vector=save, show_progress=spec.show_progress)
    train_seconds = time.perf_counter() - t0
    vectors = state["vectors"]
    with torch.no_grad():
        rand_obj = melbo_objective(slice_(rand.to(slice_.h_src.device)), slice_.z0, slice_.mask, spec.p, spec.q)
    meta["random_objectives"] = rand_obj.cpu().tolist()
    meta["train_seconds_this_session"] = train_seconds
    meta["steps_this_session"] = len(new) * spec.steps
    save_bank(out / BANK, Bank(vectors, meta, {"random_vectors": rand, "start_vectors": state["starts"]}))

    summary = evaluate_run(lm, out, vectors, rand, meta, spec.heldout, spec.generation)
    summary["seconds_per_step"] = train_seconds / max(1, len(new) * spec.steps) if new else None
    summary["seconds_per_vector"] = train_seconds / len(new) if new else None
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from melbo.report import write_summary_md

    write_summary_md(out / SUMMARY, meta, summary)
    return summary


def write_completions(out: Path, prompts: list[str], split: list[str], base: list[str], learned: list[list[str]],
                      random_: list[list[str]], learned_obj: list[float], random_obj: list[float]) -> dict:
    """Write ``completions.jsonl`` (unsteered, then every learned and random perturbation on every
    prompt, with whether the completion changed) and compare learned against random.

    Args:
        prompts, split: the prompts and their split (``"train"`` or ``"heldout"``).
        base: unsteered completion of each prompt; ``learned[v][i]``/``random_[v][i]``: steered ones.
        learned_obj, random_obj: objective of each perturbation.

    Returns:
        ``{"learned": stats, "random": stats}``; stats give ``n``, ``changed_train`` (perturbations
        that change the greedy completion of at least one training prompt), ``mean_objective`` and
        ``mean_similarity_train`` (character similarity to unsteered, 1 = identical).
    """
    rows = [{"kind": "unsteered", "vector": None, "split": split[i], "prompt": p, "completion": base[i]}
            for i, p in enumerate(prompts)]
    for kind, group in (("learned", learned), ("random", random_)):
        for v, comp in enumerate(group):
            for i, p in enumerate(prompts):
                rows.append({"kind": kind, "vector": v, "split": split[i], "prompt": p, "completion": comp[i],
                             "changed": comp[i] != base[i], "similarity": round(similarity(comp[i], base[i]), 4)})
    atomic_write(out / COMPLETIONS, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))
    train = [i for i, s in enumerate(split) if s == "train"]

    def stats(group, objectives):
        changed = [any(c[i] != base[i] for i in train) for c in group]
        sims = [similarity(c[i], base[i]) for c in group for i in train]
        return {"n": len(group), "changed_train": int(sum(changed)),
                "mean_objective": float(sum(objectives) / max(1, len(objectives))),
                "mean_similarity_train": float(sum(sims) / max(1, len(sims)))}

    return {"learned": stats(learned, learned_obj), "random": stats(random_, random_obj)}


def evaluate_run(lm: LoadedModel, out: Path, vectors: torch.Tensor, rand: torch.Tensor, meta: dict,
                 heldout: list[str], gen: GenerationConfig) -> dict:
    """Generate completions (unsteered, learned, random; training and held-out prompts), write
    ``completions.jsonl`` and return the comparison of learned against random vectors."""
    src = meta["source_layer"]
    prompts = meta["prompts"] + list(heldout)
    split = ["train"] * len(meta["prompts"]) + ["heldout"] * len(heldout)
    zero = torch.zeros(1, vectors.shape[1])
    comps = generate(lm, prompts, torch.cat([zero, vectors, rand]), src, 1.0, gen)
    base, learned, random_ = comps[0], comps[1:1 + len(vectors)], comps[1 + len(vectors):]
    stats = write_completions(out, prompts, split, base, learned, random_, [v["objective"] for v in meta["vectors"]],
                              meta["random_objectives"])
    return {
        "out": str(out), "model": meta["model"], "radius": meta["radius"], "residual_norm": meta["residual_norm"],
        "source_layer": src, "target_layer": meta["target_layer"], **stats,
        "mean_cosine_start_end": float(sum(v["cosine_start_end"] for v in meta["vectors"]) / max(1, len(meta["vectors"]))),
        "unsteered": base[:len(meta["prompts"])], "completions": {"learned": learned, "random": random_},
        "prompts": prompts,
    }
