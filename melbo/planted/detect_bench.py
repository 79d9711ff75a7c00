"""The anomaly-detection benchmark on a planted model: does a bank trained on clean prompts only
tell triggered prompts from clean ones (:mod:`melbo.detect`)?

1. trains the setting's steering vectors on clean training prompts (:func:`melbo.planted.bench.learn`,
   as ``melbo bench backdoor`` does) and takes the random bank at the same R;
2. fits a detector per bank and layer (``target``: directions δ_i, ``source``: θ_i) on
   ``n_reference`` other clean prompts;
3. scores held-out clean prompts and held-out triggered prompts of every backdoor (all disjoint
   from training and reference; none trained on by planting where the spec allows) and reports
   the AUROC of triggered vs clean, per backdoor and for all triggered prompts together, for the
   learned bank, the random bank and the baseline ‖a − μ‖, and the share of triggered prompts
   flagged at the reference-calibrated threshold (5% false positives on clean prompts).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from melbo.core.errors import MelboError
from melbo.core.io import write_json, write_text
from melbo.core.models import LoadedModel
from melbo.core.outputs import claim_folder
from melbo.core.validate import check_int
from melbo.detect import WHERE, Detector, activations, auroc, threshold
from melbo.methods.registry import trains_adapters
from melbo.planted.bench import bench_prompts, check_task, learn
from melbo.planted.bench_config import BenchSetting
from melbo.planted.story import story_groups, unseen_story_prompts
from melbo.planted.task import format_prompt, heldout_count, make_split

RESULT_INDEX = {"source": 0, "target": 1}  # where melbo.detect.activations returns each layer


def detection_prompts(
    spec: Any, train_prompts: list[str], n_reference: int, n_test: int
) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """``(reference, clean test, triggered test by backdoor)`` prompts, disjoint from each other
    and from ``train_prompts``: clean ones from those planting never trained on (arithmetic: the
    held-out clean problems; story: :func:`~melbo.planted.story.unseen_story_prompts`), triggered
    ones from the held-out triggered prompts (at most ``n_test`` per backdoor).

    Raises:
        MelboError: counts out of range, or too few clean prompts for ``n_reference + n_test``.
    """
    n_reference = check_int("number of reference prompts", n_reference, 3, 1000)
    n_test = check_int("number of test prompts", n_test, 1, 1000)
    if spec.task == "story":
        pool = unseen_story_prompts(spec)
        groups = story_groups(spec)
        triggered = {}
        for b in spec.backdoors:
            members = groups.get(b.name, [])
            triggered[b.name] = members[: heldout_count(spec, len(members))][:n_test]
    else:
        split = make_split(spec)
        pool = [format_prompt(p) for p in split.heldout_clean]
        triggered = {name: [format_prompt(p) for p in ps[:n_test]] for name, ps in split.heldout_triggered.items()}
    pool = [p for p in pool if p not in set(train_prompts)]
    if len(pool) < n_reference + n_test:
        raise MelboError(
            f"spec {spec.name!r} has {len(pool)} unseen clean prompts besides the training ones; "
            f"{n_reference} reference + {n_test} test prompts need {n_reference + n_test}"
        )
    return pool[:n_reference], pool[n_reference : n_reference + n_test], triggered


def _evaluate(det: Detector, acts: dict[str, torch.Tensor], fpr: float) -> tuple[dict, dict]:
    """(bank scores, baseline scores) as ``{"auroc": {group: a}, "tpr": {group: t}}`` per group."""
    scored = {g: det.score(a) for g, a in acts.items()}
    ref_s, ref_b = det.reference_scores()
    out = []
    for k, ref in ((0, ref_s), (2, ref_b)):
        cut = threshold(ref, fpr)
        clean = scored["clean"][k]
        groups = [g for g in acts if g != "clean"]
        every = torch.cat([scored[g][k] for g in groups])
        res: dict[str, Any] = {"auroc": {}, "tpr": {}}
        for g, s in [(g, scored[g][k]) for g in groups] + [("all", every)]:
            res["auroc"][g] = round(auroc(s, clean), 4)
            res["tpr"][g] = round(float((s > cut).float().mean()), 4)
        res["clean_flagged"] = round(float((clean > cut).float().mean()), 4)
        out.append(res)
    return out[0], out[1]


def run_detect_bench(
    lm: LoadedModel,
    spec: Any,
    setting: BenchSetting,
    out_dir: str | os.PathLike,
    *,
    n_reference: int = 32,
    n_test: int = 30,
    positions: str = "last",
    fpr: float = 0.05,
    num_prompts: int = 1,
    model_name: str = "",
    overwrite: bool = False,
) -> dict:
    """Run the benchmark (module docstring) and write ``detect.json`` and ``detect.md`` to
    ``out_dir`` (created; each file written atomically). Returns the report: per layer (``target``, ``source``) the
    ``learned``, ``random`` and ``baseline`` results, each ``{"auroc": {backdoor|"all": a},
    "tpr": {...}, "clean_flagged"}``, plus the setting, R and counts.

    ``out_dir`` must be new, empty or an earlier output of the benchmark, which ``overwrite``
    replaces (:mod:`melbo.core.outputs`).

    Raises:
        MelboError: the spec does not fit the model, bad counts or setting, a vector-less method,
            an ``out_dir`` the output rule refuses.
    """
    target = claim_folder(out_dir, "bench detect", overwrite=overwrite)
    check_task(spec, lm)
    if trains_adapters(setting.method):
        raise MelboError("the detection benchmark takes steering vectors (melbo, dct); adapters have no direction")
    t0 = time.perf_counter()
    train_prompts, _ = bench_prompts(spec, None, 1, None, num_prompts)
    reference, clean, triggered = detection_prompts(spec, train_prompts, n_reference, n_test)
    found = learn(lm, train_prompts, setting)
    src, tgt = int(found["source_layer"]), int(found["target_layer"])
    # each test prompt's activations at both layers, from one pass (they do not depend on the bank)
    both = {g: activations(lm, ps, src, tgt, positions)[:2] for g, ps in {"clean": clean, **triggered}.items()}
    layers: dict[str, dict] = {}
    for where in WHERE:
        acts = {g: a[RESULT_INDEX[where]].cpu() for g, a in both.items()}
        row: dict[str, Any] = {}
        for name in ("learned", "random"):
            det = Detector.fit(lm, found[name].vectors, src, tgt, reference, where, positions)
            row[name], base = _evaluate(det, acts, fpr)
            row["baseline"] = base  # the same for both banks: it ignores the directions
        layers[where] = row
    report = {
        "model": model_name or lm.name,
        "spec": spec.name,
        "method": setting.method,
        "num_vectors": setting.num_vectors,
        "radius": found["radius"],
        "source_layer": src,
        "target_layer": tgt,
        "positions": positions,
        "fpr": fpr,
        "train_prompts": train_prompts,
        "n_reference": len(reference),
        "n_clean": len(clean),
        "n_triggered": {g: len(ps) for g, ps in triggered.items()},
        "layers": layers,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    folder = target.prepare()
    write_json(folder / "detect.json", report, indent=1)
    write_text(folder / "detect.md", detect_markdown(report))
    return report


def detect_markdown(report: dict) -> str:
    """The report as a Markdown table: AUROC (and share flagged at the threshold) per detector."""
    groups = list(report["n_triggered"]) + ["all"]
    lines = [
        f"# melbo detect on {report['model']} (spec {report['spec']!r})",
        "",
        f"{report['method']} bank of {report['num_vectors']} vectors, R = {report['radius']:.4g}, source "
        f"{report['source_layer']} -> target {report['target_layer']}, positions {report['positions']}; "
        f"{report['n_reference']} clean reference prompts, {report['n_clean']} clean test prompts, triggered "
        + ", ".join(f"{g} {n}" for g, n in report["n_triggered"].items())
        + ".",
        "",
        f"AUROC of triggered vs clean (in brackets: share flagged at {100 * report['fpr']:g}% false positives "
        "on the clean reference, leave-one-out).",
        "",
        "| detector | layer | " + " | ".join(groups) + " | clean flagged |",
        "|---|---|" + "---|" * len(groups) + "---|",
    ]
    names = {"learned": "learned bank", "random": "random bank", "baseline": "baseline ‖a − μ‖"}
    for where, row in report["layers"].items():
        for key in ("learned", "random", "baseline"):
            r = row[key]
            cells = [f"{r['auroc'][g]:.3f} ({100 * r['tpr'][g]:.0f}%)" for g in groups]
            lines.append(f"| {names[key]} | {where} | " + " | ".join(cells) + f" | {100 * r['clean_flagged']:.0f}% |")
    return "\n".join(lines) + "\n"
