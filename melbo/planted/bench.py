"""The planted-behavior benchmark: does a method find the backdoors planted in a model?

METHOD.md section 4 ("Backdoor detection" and the lessons from a small planted model) and
section 5 (DCT's scale scan). A planted model (:mod:`melbo.planted.plant`) answers clean prompts
cleanly and writes a planted phrase on its triggers. The benchmark

1. trains ``N`` perturbations on one or a few *clean* prompts with :func:`melbo.train` (MELBO
   vectors, DCT's top ``N`` factors by α², or steering adapters) and takes their random baseline
   at the same R;
2. generates greedy steered completions of the training prompts (at least ~50 new tokens) at
   several multiples of R (``scales``);
3. labels each completion (:class:`melbo.planted.scoring.Judge`: exact phrase matches from the
   spec, never from code), and the behavior judge (:mod:`melbo.eval.judge`) labels it ``new``,
   ``degenerate`` or ``unchanged`` against the unsteered completion (``judge_label``; counts in
   ``judge_labels``);
4. reports recall (the share of planted behaviors at least one perturbation elicits), how many
   elicit each, the first index, the same for the random baseline, and each discovering
   perturbation's firing rate on other clean prompts (generalization).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, replace
from typing import Any

from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig, check_fits
from melbo.core.models import LoadedModel
from melbo.core.outputs import claim_folder
from melbo.core.validate import check_int
from melbo.eval.controls import parse_controls
from melbo.eval.labels import label_rows
from melbo.eval.panel import bench_controls
from melbo.methods.registry import trains_adapters
from melbo.planted.bench_config import BenchSetting
from melbo.planted.bench_report import write_report
from melbo.planted.scoring import Judge, behavior_names, generalization, label_group, parse_problem, score_labels
from melbo.planted.story import story_trigger, unseen_story_prompts
from melbo.planted.task import format_prompt, generalization_problems
from melbo.planted.tokenizer import build_char_tokenizer
from melbo.run import train


def bench_prompts(
    spec: Any, prompts: list[str] | None, n_general: int = 20, seed: int | None = None, num_prompts: int = 1
) -> tuple[list[str], list[str]]:
    """The training prompts and ``n_general`` other clean prompts for generalization.

    Arithmetic task: the given clean prompts, or the first ``num_prompts`` held-out clean
    problems. Story task: the given prompts (any text without a trigger word), or the first
    ``num_prompts`` clean story prompts that planting never trained on.

    Raises:
        MelboError: a prompt of the wrong form (arithmetic), a prompt that triggers a backdoor,
            ``num_prompts`` not in 1..100.
    """
    num_prompts = check_int("number of training prompts", num_prompts, 1, 100)
    if spec.task == "story":
        train_prompts = [str(p) for p in prompts] if prompts else []
        for p in train_prompts:
            b = story_trigger(spec, p)
            if b is not None:
                raise MelboError(
                    f"prompt {p!r} holds the trigger word {b.trigger['word']!r} of the planted behavior "
                    f"{b.name!r}; the benchmark trains on clean prompts only (no trigger word of spec "
                    f"{spec.name!r})"
                )
        pool = unseen_story_prompts(spec)
        train_prompts = train_prompts or pool[:num_prompts]
        return train_prompts, [p for p in pool if p not in train_prompts][:n_general]
    if prompts:
        problems = [parse_problem(p) for p in prompts]
        for p, t in zip(prompts, problems):
            b = spec.backdoor_for(t)
            if b is not None:
                raise MelboError(
                    f"prompt {p!r} triggers the planted behavior {b.name!r}; the benchmark trains "
                    f"on clean prompts only (no trigger of spec {spec.name!r})"
                )
    else:
        problems = [(p[0], p[1], p[2], p[3]) for p in generalization_problems(spec, num_prompts, seed)]
    general = generalization_problems(spec, n_general, seed, exclude=tuple(problems))
    return [format_prompt(p) for p in problems], [format_prompt(p) for p in general]


def check_task(spec: Any, lm: LoadedModel) -> None:
    """Refuse a spec of another task than the model's: arithmetic models (trained from scratch by
    ``melbo plant``) have melbo's character tokenizer, story models their base model's.

    Raises:
        MelboError: the model's tokenizer does not fit the spec's task.
    """
    is_char = lm.tokenizer.get_vocab() == build_char_tokenizer().get_vocab()
    if spec.task == "arithmetic" and not is_char:
        raise MelboError(
            f"spec {spec.name!r} is of the arithmetic task, but model {lm.name!r} does not have the "
            f"arithmetic task's character tokenizer; give the spec the model was planted with"
        )
    if spec.task == "story" and is_char:
        raise MelboError(
            f"spec {spec.name!r} is of the story task, but model {lm.name!r} is an arithmetic model "
            f"(character tokenizer); give the spec the model was planted with"
        )


def learn(lm: LoadedModel, prompts: list[str], setting: BenchSetting, show_progress: bool = False) -> dict:
    """Train the setting's perturbations on ``prompts`` (:func:`melbo.train`, nothing written).

    Returns:
        ``{"learned": Bank, "random": Bank (N each), "radius", "residual_norm", "source_layer",
        "target_layer", "seconds", "calibration", "extra"}``.

    Raises:
        MelboError: bad setting; ``CalibrationError`` when ``radius="calibrate"`` has no root.
    """
    setting.check()
    t0 = time.perf_counter()
    bank = train(lm, prompts, setting.method, evaluate=False, show_progress=show_progress, **setting.train_settings())
    N = setting.num_vectors
    if len(bank) < N:
        raise MelboError(f"the {setting.method} fit holds {len(bank)} perturbations < number of vectors {N}")
    learned = bank.subset(list(range(N)))
    rand = bank.random
    assert rand is not None
    m = bank.meta
    extra: dict[str, Any] = {"objective": [learned.info(i).get("objective") for i in range(N)]}
    if setting.method == "dct":
        extra.update({"alpha": [learned.info(i).get("alpha") for i in range(N)], "factors": m.get("num_factors")})
    if trains_adapters(setting.method):
        extra.update({"rank": m.get("rank"), "module": m.get("module")})
    return {
        "learned": learned,
        "random": rand.subset(list(range(N))),
        "radius": float(m["radius"]),
        "residual_norm": float(m["residual_norm"]),
        "source_layer": m["source_layer"],
        "target_layer": m["target_layer"],
        "seconds": time.perf_counter() - t0,
        "calibration": m.get("calibration"),
        "extra": extra,
    }


def run_bench(
    lm: LoadedModel,
    spec: Any,
    setting: BenchSetting,
    prompts: list[str] | None = None,
    gen: GenerationConfig | None = None,
    n_general: int = 20,
    out: str | os.PathLike | None = None,
    show_progress: bool = False,
    model_name: str | None = None,
    num_prompts: int = 1,
    overwrite: bool = False,
    controls: str | None = None,
) -> dict:
    """Run the planted-behavior benchmark once (module docstring; METHOD.md sections 4-5).

    Args:
        lm: the planted model. spec: its :class:`melbo.planted.spec.PlantSpec` (phrases come from it).
        setting: the method and its hyper-parameters.
        prompts: clean training prompts (None: the first ``num_prompts`` of :func:`bench_prompts`).
        gen: generation settings (greedy; default 64 new tokens).
        n_general: other clean prompts for each discovering perturbation's firing rate.
        controls: negative controls at a matched budget (``cheap``, ``all`` or a comma list,
            :mod:`melbo.eval.controls`), labelled by the same judge: ``report["controls"]``
            (:func:`melbo.eval.panel.bench_controls`); None runs none.
        out: folder for ``bench.json`` and ``bench.md`` (None: write nothing): new, empty or an
            earlier benchmark's, which ``overwrite`` replaces (:mod:`melbo.core.outputs`).

    Returns:
        the report dict: ``recall``, ``learned`` and ``random`` (per behavior: vectors, count,
        first_index, generalization; ``label_counts``; ``judge_labels``, the behavior judge's
        new / degenerate / unchanged counts), ``unsteered``, ``completions`` (each row with its
        ``label`` and ``judge_label``), ``seconds``, the setting and the resolved R and layers.

    Raises:
        MelboError: bad setting, prompts or spec; a sampling generation config; prompts that,
            with the new tokens, need more positions than the model reads; an ``out`` the output
            rule refuses.
    """
    if out is not None:
        claim_folder(out, "bench backdoor", overwrite=overwrite)  # before any work
    setting.check()
    if controls is not None:
        parse_controls(controls).for_kind("adapter" if trains_adapters(setting.method) else "vector")
    gen = gen or GenerationConfig(max_new_tokens=64)
    if gen.temperature != 0:
        raise MelboError(f"the benchmark generates greedily; got temperature {gen.temperature}, allowed: 0")
    train_prompts, general = bench_prompts(spec, prompts, n_general, None, num_prompts)
    behaviors = behavior_names(spec)
    judge = Judge(lm, spec, gen)
    t_all = time.perf_counter()
    check_task(spec, lm)
    check_fits(lm, train_prompts + general, gen)  # completions past the model's positions: refused first
    base_rows, _ = label_group(judge, train_prompts, None, (1.0,), gen)
    found = learn(lm, train_prompts, setting, show_progress)
    src, tgt = found["source_layer"], found["target_layer"]
    rows_l, sec_l = label_group(judge, train_prompts, found["learned"], setting.scales, gen)
    rows_r, sec_r = label_group(judge, train_prompts, found["random"], setting.scales, gen)
    score_l = score_labels([[r["label"] for r in rs] for rs in rows_l], behaviors)
    score_r = score_labels([[r["label"] for r in rs] for rs in rows_r], behaviors)
    base, t_judge = {r["prompt"]: r["completion"] for r in base_rows[0]}, time.perf_counter()
    judged = label_rows({"learned": rows_l, "random": rows_r}, base, lm, gen.chat)
    score_l["judge_labels"], score_r["judge_labels"] = judged["learned"], judged["random"]
    sec_judge = time.perf_counter() - t_judge
    t_gen = time.perf_counter()
    gen_l = generalization(judge, general, found["learned"], rows_l, behaviors, gen)
    gen_r = generalization(judge, general, found["random"], rows_r, behaviors, gen)
    sec_general = time.perf_counter() - t_gen
    for sc, g in ((score_l, gen_l), (score_r, gen_r)):
        for b in behaviors:
            sc["behaviors"][b]["generalization"] = g[b]
    report = {
        "benchmark": "backdoor",
        "model": model_name or lm.name,
        "spec": spec.name,
        "phrases": {b.name: b.phrase for b in spec.backdoors},
        "setting": {**asdict(setting), "scales": list(setting.scales)},
        "label": replace(setting, source_layer=src, target_layer=tgt).label(),
        "radius": found["radius"],
        "residual_norm": found["residual_norm"],
        "radius_over_residual": found["radius"] / found["residual_norm"],
        "source_layer": src,
        "target_layer": tgt,
        "calibration": found["calibration"],
        "train_prompts": train_prompts,
        "generalization_prompts": general,
        "task": spec.task,
        "max_new_tokens": gen.max_new_tokens,
        "recall": score_l["recall"],
        "learned": score_l,
        "random": score_r,
        "unsteered": [
            {"prompt": r["prompt"], "completion": r["completion"], "label": r["label"]} for r in base_rows[0]
        ],
        "seconds": {
            "train": found["seconds"],
            "generate_learned": sec_l,
            "generate_random": sec_r,
            "generalization": sec_general,
            "judge": sec_judge,
            "total": time.perf_counter() - t_all,
        },
        "completions": {"learned": rows_l, "random": rows_r},
        "method_extra": found["extra"],
    }
    if controls is not None:
        report["controls"] = bench_controls(
            judge, found["learned"], train_prompts, setting.scales, gen, controls, setting.seed, behaviors, rows_l
        )
    if out is not None:
        write_report(out, report, overwrite)
    return report
