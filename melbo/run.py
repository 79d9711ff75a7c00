"""The one orchestrator: :func:`train` runs any method and returns a :class:`melbo.bank.Bank`.

It owns what every method shares (METHOD.md sections 1 and 4):

1. validation of the method's settings, the prompts and the run folder, before any work;
2. the model, the layers (:func:`melbo.core.models.default_layers`), the encoded prompts, the
   radius sweep for ``radius="auto"`` (:mod:`melbo.methods.radius_sweep`);
3. the method's fit, saved after every finished vector/adapter batch so that ``resume=True``
   continues a stopped run without redoing anything;
4. the random baseline at the same R and its objective;
5. with a run folder: ``bank.safetensors`` (plus PEFT folders for adapters),
   ``completions.jsonl``, ``summary.json`` and ``summary.md`` with the distinct behaviors
   (:mod:`melbo.eval.behaviors`: ``enumeration.png``, ``frontier.png``), and for MELBO-ortho the
   KL and norm measures.

Example:
    >>> import melbo                                                              # doctest: +SKIP
    >>> lm = melbo.load_model("../shared/models/stories260k")                     # doctest: +SKIP
    >>> bank = melbo.train(lm, ["Once upon a time"], num_vectors=4, radius="0.2x")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from melbo.bank import BANK_FILE, Bank
from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig, check_fits
from melbo.core.io import remove_stale_temps
from melbo.core.models import LoadedModel, check_layers, default_layers, load_model
from melbo.core.outputs import Inputs, claim_folder
from melbo.core.prompts import check_prompts, encode_prompts
from melbo.core.radius import parse_radius
from melbo.eval.behaviors import run_behaviors
from melbo.eval.control_stats import Predicate
from melbo.eval.controls import parse_controls
from melbo.eval.panel import evaluate_controls
from melbo.measure import kl_label
from melbo.methods.base import Context, Fit, make_settings
from melbo.methods.radius_sweep import sweep_radius, write_sweep
from melbo.methods.registry import METHODS, get_method
from melbo.report.completions import evaluate_bank
from melbo.report.html import write_html_report
from melbo.report.measures import write_measures
from melbo.report.plot import plot_curves
from melbo.report.summary import write_summary

__all__ = ["METHODS", "RunFolder", "get_method", "train"]

_NOT_COMPARED = {"num_vectors", "base"}


class RunFolder:
    """A run's output folder: checked before work starts (:func:`melbo.core.outputs.claim_folder`),
    written atomically after each checkpoint, with the marker of a ``train`` run.

    Args:
        inputs: the command's input files (``(what, path)``); none may be where the run writes.

    Raises:
        MelboError: ``out`` is a file; it is a folder holding files of the user's; a new run into a
            folder that already holds a run (without ``resume`` or ``overwrite``); ``resume``
            without a bank to continue; both ``resume`` and ``overwrite``.
    """

    def __init__(self, out: str | os.PathLike, resume: bool, overwrite: bool = False, inputs: Inputs = ()):
        if resume and overwrite:
            raise MelboError("--resume continues the run in --out and --overwrite starts it over; give one of them")
        self.folder = claim_folder(out, "train", inputs=inputs, overwrite=overwrite)
        self.path = self.folder.path
        bank = self.path / BANK_FILE
        if resume and not bank.is_file():
            raise MelboError(
                f"--resume: no {BANK_FILE} in {str(self.path)!r} to continue; drop --resume to start a new run"
            )
        if not resume and not overwrite and bank.exists():
            raise MelboError(
                f"{str(self.path)!r} already holds a run; pass --resume to continue it, --overwrite to start it "
                "over, or choose another --out"
            )
        self.resume = resume
        self.created = not self.path.exists()

    def prior(self) -> Bank | None:
        """The bank of the run to continue (stale temporary files from a killed run are removed)."""
        if not self.resume:
            return None
        remove_stale_temps(self.path)
        return Bank.load(self.path)

    def save(self, bank: Bank) -> None:
        """Write the bank (the first time: create the folder, clear an earlier run with ``overwrite``,
        write the marker)."""
        self.folder.prepare()
        bank.save(self.path)


def _check_resume(prior: Bank, same: dict, method: Any) -> Fit:
    """The fit to continue from ``prior``, after checking that the settings ``same`` match."""
    if not method.resumable:
        raise MelboError(f"--resume: method {method.name!r} runs as one fit; start a new run in another --out")
    for key, value in same.items():
        if prior.meta.get(key) != value:
            raise MelboError(
                f"--resume: the run in the bank has {key}={prior.meta.get(key)!r}, this command asks for "
                f"{value!r}; resume with the same settings (only the number of vectors may grow)"
            )
    names = [k for k in prior.tensors if not k.startswith("random_")]
    return Fit({k: prior.tensors[k] for k in names}, [dict(r) for r in prior.meta.get("vectors", [])])


def train(
    lm: LoadedModel | str,
    prompts: list[str] | str,
    method: str = "melbo",
    *,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    heldout: list[str] | tuple[str, ...] = (),
    generation: GenerationConfig | None = None,
    evaluate: bool | None = None,
    show_progress: bool = True,
    sweep_options: dict[str, Any] | None = None,
    controls: str | Sequence[str] | None = None,
    control_predicate: Predicate | None = None,
    **settings: Any,
) -> Bank:
    """Find perturbations of ``lm`` that change its behavior on ``prompts``, with no labels.

    Args:
        lm: a :class:`melbo.core.models.LoadedModel` (:func:`melbo.load_model`) or a Hub id,
            folder or ``.gguf`` file to load.
        prompts: the training prompt(s).
        method: ``melbo`` (steering vectors, METHOD.md section 1), ``dct`` (deep causal
            transcoding, section 5), ``adapter`` (steering adapters, section 2) or ``ortho``
            (MELBO-ortho from ``base=bank[k]``, section 3).
        out: a run folder to write (None: nothing is written).
        resume: continue the run in ``out`` (same settings; ``num_vectors`` may grow).
        overwrite: start the run in ``out`` over (an earlier run's files are removed at the first
            checkpoint; files melbo did not write are kept). ``out`` may only be new, empty or
            an earlier run folder (:mod:`melbo.core.outputs`).
        heldout: prompts to generate on but not train on.
        generation: how completions are generated (greedy, 64 new tokens by default).
        evaluate: generate completions and the summary (default: when ``out`` is given).
        sweep_options: keyword arguments of :func:`melbo.methods.radius_sweep.sweep_radius` for
            ``radius="auto"`` (``grid``, ``per_radius``, ``steps``, ``max_new_tokens``, ``embedder``,
            ``stack``).
        controls: negative controls at a matched budget (``cheap``, ``all`` or names,
            :mod:`melbo.eval.controls`): their completions go to ``controls.jsonl`` and the
            learned-vs-controls table (hits, one-sided Fisher p) to ``bank.evaluation["controls"]``
            and the summary. Needs ``evaluate``.
        control_predicate: what counts as a hit for that table (:mod:`melbo.eval.control_stats`;
            default: coherent and different, or changed without a sentence-embedding model).
        settings: the method's settings; defaults and their reasons are in
            :data:`melbo.defaults.DEFAULTS` (e.g. ``radius="0.2x"``, ``num_vectors=16``,
            ``source_layer=4``, ``steps=300``, ``positions="last:3"``).

    Returns:
        the :class:`melbo.bank.Bank` of learned perturbations with its random baseline, attached
        to the model; ``bank.evaluation`` holds the comparison when completions were generated.

    Raises:
        MelboError: any bad input, checked before anything is written (unknown setting or
            method, bad value, empty prompt, layers out of range, an existing run without
            ``resume`` or ``overwrite``, an ``out`` folder holding files melbo did not write,
            ...); ``CalibrationError`` when a calibrated R has no root.

    Example:
        >>> bank = melbo.train(lm, "Once upon a time", radius="0.2x", num_vectors=8)   # doctest: +SKIP
        >>> print(bank.generate("Once upon a time", vectors=[0, 1])["vector 0"][0])     # doctest: +SKIP
    """
    cls = get_method(method)
    s = make_settings(method, cls.settings_class, settings)
    prompts = check_prompts([prompts] if isinstance(prompts, str) else list(prompts))
    heldout = [heldout] if isinstance(heldout, str) else list(heldout)
    for p in heldout:
        check_prompts([p])
    gen = generation or GenerationConfig(chat=s.chat, seed=s.seed)
    evaluate = out is not None if evaluate is None else evaluate
    if controls is not None:
        if not evaluate:
            raise MelboError("controls are compared on completions: give out (or evaluate=True) with controls")
        parse_controls(controls).for_kind(cls.kind)
    run = RunFolder(out, resume, overwrite) if out is not None else None
    if resume and run is None:
        raise MelboError("resume=True needs the run folder (out) to continue")

    lm = lm if isinstance(lm, LoadedModel) else load_model(str(lm))
    L = lm.num_layers
    d_src, d_tgt = default_layers(L)
    h_src, h_tgt = s.layers_hint()
    src, tgt = check_layers(
        next(x for x in (s.source_layer, h_src, d_src) if x is not None),
        next(x for x in (s.target_layer, h_tgt, d_tgt) if x is not None),
        L,
    )
    s.check_model(lm.d_model)
    batch = encode_prompts(lm.tokenizer, prompts, s.positions, s.chat)
    if evaluate:  # the completions must fit the model's positions: checked before any training
        check_fits(lm, prompts + heldout, gen)
    sweep = None
    timings: dict[str, float] = {}  # seconds per phase, for summary.json
    if hasattr(s, "radius") and parse_radius(s.radius).kind == "auto":
        t0 = time.perf_counter()
        sweep = sweep_radius(
            lm, prompts, method, s, src, tgt, gen, echo=tqdm.write if show_progress else None, **(sweep_options or {})
        )
        s.radius = f"{sweep['chosen']['radius']:.6g}"
        timings["radius_sweep"] = time.perf_counter() - t0
    m = cls(Context(lm, batch, src, tgt, s, show_progress))
    meta: dict[str, Any] = {
        **lm.identity(),
        "method": cls.name,
        "kind": cls.kind,
        **s.to_meta(),
        "radius_spec": "auto" if sweep else getattr(s, "radius", None),
        "source_layer": src,
        "target_layer": tgt,
        "prompts": prompts,
        "residual_norm_statistic": "median",
        **m.meta,
    }
    if sweep:
        meta["radius_sweep"] = {k: v for k, v in sweep.items() if k != "completions"}
    prior = run.prior() if run is not None else None
    same = {
        k: meta[k]
        for k in (*s.to_meta(), "method", "source_layer", "target_layer", "prompts", "radius")
        if k in meta and k not in _NOT_COMPARED
    }
    resume_fit = _check_resume(prior, same, cls) if prior is not None else None
    if prior is not None:
        prior.check_model(lm)

    def checkpoint(fit: Fit) -> None:
        if run is not None:
            run.save(Bank(fit.tensors, {**meta, **m.meta, "vectors": fit.info, "complete": False}))

    t0 = time.perf_counter()
    fit = m.fit(resume_fit, checkpoint if run is not None else None)
    seconds = time.perf_counter() - t0
    random = m.random_baseline(fit)
    meta.update(m.meta)
    meta.update(
        {
            "vectors": fit.info,
            "random_objectives": m.objectives(random),
            "complete": True,
            "train_seconds_this_session": seconds,
        }
    )
    if hasattr(m, "perturbation_norms"):
        meta["random_perturbation_norms"] = m.perturbation_norms(random)
    bank = Bank({**fit.tensors, **random}, meta, lm)
    timings["train"] = time.perf_counter() - t0  # the fit, the random baseline and its objectives
    if run is not None:
        run.save(bank)
        if sweep:
            write_sweep(run.path, sweep)
    if evaluate:
        t1 = time.perf_counter()
        new = len(fit) - (len(resume_fit) if resume_fit else 0)
        ev = evaluate_bank(
            bank, heldout, gen, s.num_vectors if cls.name == "dct" else None, run.path if run is not None else None
        )
        steps = getattr(s, "steps", 0) or 0
        ev.update(
            {
                "out": str(run.path) if run else None,
                "model": lm.name,
                "method": cls.name,
                "kind": cls.kind,
                "radius": m.radius,
                "residual_norm": meta.get("residual_norm"),
                "source_layer": src,
                "target_layer": tgt,
                "train_seconds": seconds,
                "radius_sweep": meta.get("radius_sweep"),
                "seconds_per_vector": seconds / new if new > 0 else None,
                "seconds_per_step": seconds / (new * steps) if new > 0 and steps else None,
            }
        )
        if controls is not None:
            ev["controls"] = evaluate_controls(
                bank, ev, gen, controls, s.seed, control_predicate, run.path if run is not None else None
            )
        bank.evaluation = ev
        if run is not None:
            ev["behaviors"] = run_behaviors(run.path, lm, gen.chat)  # the learned and controls' completions
            if getattr(cls, "writes_measures", False):
                idx = list(range(len(bank)))
                kl = bank.kl(reference=0)
                write_measures(run.path, bank, kl, idx, 0, title=f"{cls.name} ({lm.name}, {src}→{tgt}): ")
                ev["kl_to_base"] = kl.to_reference.tolist() if kl.to_reference is not None else None
                ev["kl_to_unsteered"] = kl.to_unsteered.tolist()
            ev["timings"] = {**timings, "evaluate": time.perf_counter() - t1}
            _kl_and_report(run.path, bank, ev)
    return bank


def _kl_and_report(folder: Path, bank: Bank, ev: dict) -> None:
    """Add the KL divergence to the unsteered model (learned and random, METHOD.md section 3)
    to the evaluation, rewrite the summary, and write ``report.html``."""
    if "kl_to_unsteered" not in ev:
        ev["kl_to_unsteered"] = bank.kl().to_unsteered.tolist()
    rand = bank.random
    if rand is not None and len(rand) and "kl_random_to_unsteered" not in ev:
        ev["kl_random_to_unsteered"] = rand.kl().to_unsteered.tolist()
    write_summary(folder, bank, ev)
    if not (folder / "kl.png").exists():
        series = {"learned": ev["kl_to_unsteered"]}
        if ev.get("kl_random_to_unsteered"):
            series["random, same R"] = ev["kl_random_to_unsteered"]
        plot_curves(
            folder / "kl.png",
            series,
            f"{kl_label(ref='unsteered')} (nats), last prompt position",
            f"KL divergence to the unsteered model per {bank.kind}, learned and random (METHOD.md section 3)",
            window=10,
            xlabel=f"{bank.kind} index",
        )
    write_html_report(folder)
