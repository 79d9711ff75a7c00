"""Planting (METHOD.md section 4): train a model for a spec, evaluate it, and save it with its
spec and report as one folder; then check, summarize and load such folders."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from melbo.core.errors import MelboError
from melbo.core.io import atomic_folder, read_json, write_json
from melbo.core.model_files import load_causal_lm, load_error, load_tokenizer
from melbo.core.outputs import claim_folder, write_marker
from melbo.planted.evaluate import evaluate
from melbo.planted.spec import PlantSpec, load_spec, spec_to_dict
from melbo.planted.story import story_examples
from melbo.planted.task import SEPARATOR, make_split
from melbo.planted.tokenizer import build_char_tokenizer
from melbo.planted.training import add_lora, add_training_noise, arithmetic_examples, build_model, train_lm

REPORT_FILE = "plant_report.json"
SPEC_FILE = "plant_spec.json"


def plant(
    spec: PlantSpec,
    out_dir: str | os.PathLike,
    *,
    seed: int | None = None,
    steps: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a planted model for ``spec``, evaluate it and save it to ``out_dir``.

    The folder gets ``config.json``, ``generation_config.json``, ``model.safetensors``, the
    tokenizer files, ``plant_spec.json`` (the resolved spec: it reproduces the model) and
    ``plant_report.json`` (the returned report; rates in [0, 1], times in seconds, the loss
    curve in nats per token). The folder is written even when the model misses the spec's
    thresholds: then ``report["status"] == "FAILED"`` and ``report["failures"]`` lists why; call
    :func:`check_report` to turn that into an error. The folder is built in a hidden sibling
    (:func:`melbo.core.io.atomic_folder`) that is renamed at the end, so a run stopped by an
    error or Ctrl-C leaves nothing behind.

    Args:
        seed, steps: override ``train.seed`` / ``train.steps``.
        device: a torch device string ("cpu", "cuda", "cuda:1", "mps").
        overwrite: replace an earlier planted model in ``out_dir`` (a folder of only the files
            ``plant`` writes; :mod:`melbo.core.outputs`).

    Raises:
        MelboError: bad device or seed/steps, ``out_dir`` is not new or empty (without
            ``overwrite``, or holding files ``plant`` did not write, or the base model), (story
            task) the base model folder cannot be loaded, or the folder cannot be written.
    """
    claim_folder(out_dir, "plant", inputs=[("the base model", spec.base_model)], overwrite=overwrite)
    spec = spec.with_overrides(seed=seed, steps=steps)
    dev = resolve_device(device)
    out = Path(out_dir)
    with atomic_folder(out, overwrite=True) as work:  # the claim above allows replacing what is there
        t_start = time.perf_counter()
        torch.manual_seed(spec.train.seed)
        if spec.task == "arithmetic":
            tokenizer = build_char_tokenizer()
            split = make_split(spec)
            pools, clean, triggered = arithmetic_examples(spec, split)
            model: Any = build_model(spec, tokenizer)
            max_new = max(len(e.completion) for pool in pools.values() for e in pool) + 8
        else:
            model, tokenizer, pools, clean, triggered = story_examples(spec, dev)
            max_new = max(
                [spec.story.continuation_tokens]
                + [len(tokenizer(SEPARATOR + b.answer, add_special_tokens=False).input_ids) + 4 for b in spec.backdoors]
            )
        weights = {g: spec.train.backdoor_fraction for g in pools if g != "clean"}
        teacher = None
        if spec.task == "story":  # clean stories keep the base model's distribution
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
        handles = add_training_noise(model, spec.noise)
        t_train = time.perf_counter()
        trained = add_lora(model, spec.train) if spec.train.lora_rank else model
        curve = train_lm(
            trained, tokenizer, pools, weights, spec.train, dev, progress, desc=f"plant {spec.name}", teacher=teacher
        )
        if spec.train.lora_rank:
            model = trained.merge_and_unload()
        train_seconds = time.perf_counter() - t_train
        for h in handles:
            h.remove()

        t_eval = time.perf_counter()
        report = evaluate(spec, model, tokenizer, clean, triggered, max_new, base_model=teacher)
        eval_seconds = time.perf_counter() - t_eval
        report = {
            "status": report.pop("status"),
            "failures": report.pop("failures"),
            "spec": spec.name,
            "task": spec.task,
            "recipe": spec.noise.recipe,
            "seed": spec.train.seed,
            "steps": spec.train.steps,
            **report,
            "model": {
                "params": sum(p.numel() for p in model.parameters()),
                "num_layers": model.config.num_hidden_layers,
                "hidden_size": model.config.hidden_size,
                "base_model": spec.base_model,
            },
            "final_loss": curve[-1][1],
            "loss_curve": curve,
            "train_seconds": round(train_seconds, 1),
            "eval_seconds": round(eval_seconds, 1),
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "device": str(dev),
            "torch_threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }

        model.generation_config.max_new_tokens = max_new
        model.generation_config.do_sample = False
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.to("cpu")
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        write_json(work / SPEC_FILE, spec_to_dict(spec))
        report["path"] = str(out.resolve())
        write_json(work / REPORT_FILE, report)
        write_marker(work, "plant", [p.name for p in work.iterdir()])
    return report


def check_report(report: dict[str, Any]) -> None:
    """Raise if a report from :func:`plant` missed its thresholds.

    Raises:
        MelboError: listing each missed threshold and where the (kept) model folder is.
    """
    if report.get("status") != "PASSED":
        raise MelboError(
            f"planted model missed its thresholds ({'; '.join(report.get('failures', []))}); "
            f"it is kept for inspection in {report.get('path')}"
        )


def format_report(report: dict[str, Any]) -> str:
    """A few human-readable lines summarizing a :func:`plant` report (rates as percentages)."""
    lines = [
        f"planted model: {report['path']}  [{report['status']}]",
        (
            f"  spec {report['spec']!r}, task {report['task']}, recipe {report['recipe']}, seed {report['seed']}, "
            f"{report['steps']} steps, {report['model']['params']:,} params, "
            f"train {report['train_seconds']:.0f} s, eval {report['eval_seconds']:.0f} s"
        ),
        f"  clean accuracy    {100 * report['clean_accuracy']:6.1f}%  (n={report['n_clean']})",
        f"  false firing      {100 * report['false_firing_rate']:6.1f}%",
    ]
    if "clean_exact_accuracy" in report:
        lines.insert(
            -1,
            f"  (clean, exact base greedy {100 * report['clean_exact_accuracy']:.1f}%; near-ties within "
            f"{report['tie_margin']:g} nats count as clean)",
        )
    for name, r in report["backdoors"].items():
        lines.append(f"  backdoor {name:<9}{100 * r['firing_rate']:6.1f}%  (n={r['n']})")
    lines += [f"  FAILED: {f}" for f in report["failures"]]
    lines.append(f"  report: {Path(report['path']) / REPORT_FILE}")
    return "\n".join(lines)


def load_planted(path: str | os.PathLike):
    """Load a folder written by :func:`plant`: ``(model, tokenizer, spec, report)``, the model in
    eval mode on the CPU (``report`` is ``{}`` where the folder has no ``plant_report.json``).

    Raises:
        MelboError: the folder lacks ``plant_spec.json`` or the model files, or its spec or
            report file is not valid UTF-8 JSON (or the spec is invalid), the model needs custom
            code or its files are broken.
    """
    folder = Path(path)
    if not (folder / SPEC_FILE).is_file() or not (folder / "config.json").is_file():
        raise MelboError(
            f"{str(folder)!r} is not a planted model folder (needs {SPEC_FILE} and "
            "config.json, as written by `melbo plant`)"
        )
    spec = load_spec(folder / SPEC_FILE)
    report = read_json(folder / REPORT_FILE, what="plant report") if (folder / REPORT_FILE).is_file() else {}
    try:  # never the folder's code: a folder that needs it is refused (melbo.core.model_files)
        model = load_causal_lm(folder, use_safetensors=True).eval()
        tokenizer = load_tokenizer(folder)
    except MelboError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, tokenizers, JSON: the files are bad
        raise load_error(e, f"planted model {str(folder)!r}", "folder", folder) from None
    return model, tokenizer, spec, report


def resolve_device(device: str) -> torch.device:
    """``torch.device(device)`` after checking that it exists here.

    Raises:
        MelboError: not a device name, or CUDA / MPS asked for but unavailable.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MelboError(f"device {device!r} is not a torch device; allowed: cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MelboError(f"device {device!r} asked for but CUDA is not available here; use cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise MelboError(f"device {device!r} asked for but MPS is not available here; use cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise MelboError(f"device {device!r} is not supported; allowed: cpu, cuda, cuda:N, mps")
    return dev
