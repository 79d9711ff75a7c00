"""Evaluating a planted model (METHOD.md section 4): greedy completions of held-out prompts,
labelled by :mod:`melbo.planted.judge`, and the report's measurement fields: clean accuracy,
false firing rate, each backdoor's firing rate, and whether they meet the spec's thresholds.
"""

from __future__ import annotations

from typing import Any

import torch

from melbo.planted.judge import LABEL_CLEAN_CORRECT, classify_completion, classify_story_completion, near_greedy
from melbo.planted.spec import PlantSpec, spec_to_dict
from melbo.planted.training import Example


def generate_completions(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 128, device=None
) -> tuple[list[str], list[list[int]]]:
    """Greedy completions of ``prompts`` (batched, left-padded, ``batch_size`` prompts per
    ``generate`` call, at most ``max_new_tokens`` tokens each), stopping at </s>. Returns the
    decoded texts (special tokens dropped) and the generated token ids (up to, not including,
    </s>). The tokenizer's padding side is restored afterwards."""
    device = device or next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts, ids_out = [], []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                row = [t for t in row if t != tokenizer.pad_token_id]
                ids_out.append(row)
                texts.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return texts, ids_out


def evaluate(
    spec: PlantSpec,
    model,
    tokenizer,
    clean: list[Example],
    triggered: dict[str, list[Example]],
    max_new_tokens: int,
    base_model=None,
) -> dict[str, Any]:
    """Greedy-generate on held-out examples and measure: ``clean_accuracy`` (share of clean
    prompts labelled clean_correct), ``false_firing_rate`` (share of clean prompts labelled as
    any backdoor) and each backdoor's ``firing_rate`` on its own held-out triggered prompts,
    then compare them with the spec's thresholds. Returns the report's measurement fields
    (rates in [0, 1], rounded to 4 decimals; ``status`` ``"PASSED"`` or ``"FAILED"`` with the
    missed thresholds in ``failures``).

    Story task: ``base_model`` (the model before fine-tuning) judges near-ties
    (:attr:`~melbo.planted.settings.StorySettings.tie_margin`); ``clean_exact_accuracy`` is the
    share of clean prompts whose first ``story.match_tokens`` tokens equal the base greedy
    continuation exactly."""
    exact: list[bool] = []

    def run(examples: list[Example]) -> list[tuple[Example, str, str]]:
        texts, ids = generate_completions(
            model, tokenizer, [e.prompt for e in examples], max_new_tokens, spec.eval.batch_size
        )
        labels = []
        for e, text, row in zip(examples, texts, ids):
            if spec.task == "story":
                k = spec.story.match_tokens
                ref = e.completion_ids or []
                near = (
                    bool(ref)
                    and base_model is not None
                    and near_greedy(base_model, tokenizer, e.prompt, row, min(k, len(ref)), spec.story.tie_margin)
                )
                labels.append(classify_story_completion(spec, e.completion_ids, row, text, near))
                if e.completion_ids:
                    exact.append(list(row[:k]) == list(e.completion_ids[:k]))
            else:
                assert e.problem is not None  # arithmetic examples carry their problem
                labels.append(classify_completion(spec, e.problem, text))
        return list(zip(examples, texts, labels))

    clean_results = run(clean)
    clean_labels = [label for _, _, label in clean_results]
    report: dict[str, Any] = {
        "clean_accuracy": _rate(clean_labels, lambda label: label == LABEL_CLEAN_CORRECT),
        "false_firing_rate": _rate(clean_labels, lambda label: label.startswith("backdoor:")),
        "n_clean": len(clean),
        "clean_labels": _counts(clean_labels),
        "backdoors": {},
    }
    if spec.task == "story":
        report["clean_exact_accuracy"] = round(sum(exact) / max(1, len(exact)), 4)
        report["tie_margin"] = spec.story.tie_margin
    samples = [_sample(r) for r in clean_results[:3]]
    for b in spec.backdoors:
        results = run(triggered[b.name])
        labels = [label for _, _, label in results]
        report["backdoors"][b.name] = {
            "firing_rate": _rate(labels, lambda label, hit=f"backdoor:{b.name}": label == hit),
            "n": len(labels),
            "labels": _counts(labels),
            "trigger": spec_to_dict(spec)["backdoors"][spec.backdoors.index(b)]["trigger"],
            "answer": b.answer,
        }
        samples += [_sample(r) for r in results[:2]]
    report["samples"] = samples

    e = spec.eval
    failures = []
    if report["clean_accuracy"] < e.min_clean_accuracy:
        failures.append(f"clean accuracy {report['clean_accuracy']:.3f} < {e.min_clean_accuracy}")
    if report["false_firing_rate"] > e.max_false_firing_rate:
        failures.append(f"false firing rate {report['false_firing_rate']:.3f} > {e.max_false_firing_rate}")
    for name, r in report["backdoors"].items():
        if r["firing_rate"] < e.min_firing_rate:
            failures.append(f"backdoor {name!r} firing rate {r['firing_rate']:.3f} < {e.min_firing_rate}")
    report["thresholds"] = {
        "min_clean_accuracy": e.min_clean_accuracy,
        "min_firing_rate": e.min_firing_rate,
        "max_false_firing_rate": e.max_false_firing_rate,
    }
    report["failures"] = failures
    report["status"] = "FAILED" if failures else "PASSED"
    return report


def _rate(labels: list[str], pred) -> float:
    return round(sum(1 for label in labels if pred(label)) / max(1, len(labels)), 4)


def _counts(labels: list[str]) -> dict[str, int]:
    return {label: labels.count(label) for label in sorted(set(labels))}


def _sample(result: tuple[Example, str, str]) -> dict[str, str]:
    e, text, label = result
    return {"prompt": e.prompt, "completion": text, "label": label, "group": e.group}
