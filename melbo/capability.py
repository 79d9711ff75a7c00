"""Capability discovery (METHOD.md section 4): do learned vectors unlock a skill the model does not
show unsteered? "On a one-shot direct-answer arithmetic prompt, 7 of 32 vectors elicited
chain-of-thought; the best raised test accuracy from 11% to 63% on other numbers."

The task is arithmetic in a fixed template (``Q: What is 17 times 3?\\nA:``): vectors are trained
with :func:`melbo.train` on a few instances, then every learned vector, as many random vectors
at the same R, and the unsteered model answer held-out instances greedily. An answer is read as
the **last integer** the completion writes before it starts a new question (``\\nQ:``): a
chain-of-thought ("17 times 3 = 17 + 17 + 17 = 51") and a direct answer ("51") both count;
a completion that lists unrelated numbers after the right one does not. Accuracy per vector is
the share of held-out instances answered correctly.
"""

from __future__ import annotations

import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any

from melbo.bank import Bank
from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig, check_fits
from melbo.core.io import write_json, write_text
from melbo.core.models import LoadedModel
from melbo.core.outputs import claim_folder
from melbo.core.validate import check_choice, check_int
from melbo.eval.labels import JUDGE_NAME, count_labels, counts_text, judge_groups
from melbo.run import train

OPERATIONS = {"times": lambda a, b: a * b, "plus": lambda a, b: a + b, "minus": lambda a, b: a - b}
TEMPLATE = "Q: What is {a} {op} {b}?\nA:"
_INT = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Task:
    """Arithmetic instances ``a op b`` with ``a`` of ``digits_a`` digits and ``b`` of ``digits_b``."""

    op: str = "times"
    digits_a: int = 2
    digits_b: int = 1

    def check(self) -> Task:
        check_choice("operation", self.op, OPERATIONS)
        check_int("digits of a", self.digits_a, 1, 4)
        check_int("digits of b", self.digits_b, 1, 4)
        return self

    def instances(self, n: int, seed: int) -> list[tuple[int, int]]:
        """``n`` distinct ``(a, b)`` pairs drawn from ``seed`` (b >= 2, so that ``times`` is not trivial)."""
        rng = random.Random(f"melbo-capability-{seed}")
        lo_a, hi_a = 10 ** (self.digits_a - 1), 10**self.digits_a - 1
        lo_b, hi_b = max(2, 10 ** (self.digits_b - 1)), 10**self.digits_b - 1
        space = (hi_a - lo_a + 1) * (hi_b - lo_b + 1)
        if n > space:
            raise MelboError(f"the task has {space} distinct instances, {n} were asked for")
        seen: set[tuple[int, int]] = set()
        while len(seen) < n:
            seen.add((rng.randint(lo_a, hi_a), rng.randint(lo_b, hi_b)))
        return sorted(seen, key=lambda x: rng.random())

    def prompt(self, a: int, b: int) -> str:
        return TEMPLATE.format(a=a, op=self.op, b=b)

    def answer(self, a: int, b: int) -> int:
        return int(OPERATIONS[self.op](a, b))


def read_answer(completion: str) -> int | None:
    """The last integer of ``completion`` before a new question starts (module docstring), or None."""
    text = completion.split("\nQ:")[0]
    found = _INT.findall(text)
    return int(found[-1]) if found else None


def accuracy(completions: list[str], truths: list[int]) -> float:
    """Share of completions whose answer (:func:`read_answer`) is the truth."""
    return sum(read_answer(c) == t for c, t in zip(completions, truths)) / max(1, len(truths))


def run_capability(
    lm: LoadedModel,
    task: Task,
    method: str = "melbo",
    num_train: int = 1,
    num_test: int = 30,
    seed: int = 0,
    max_new_tokens: int = 48,
    out: str | os.PathLike | None = None,
    show_progress: bool = False,
    overwrite: bool = False,
    **settings: Any,
) -> dict:
    """Train on ``num_train`` instances, score every vector on ``num_test`` other ones.

    Returns:
        ``{"unsteered": accuracy, "learned": [accuracy per vector], "random": [...], "best": {...},
        "examples": {...}, "judge_labels": {"learned": counts, "random": counts} (the behavior
        judge's new / degenerate / unchanged over the test completions, :mod:`melbo.eval.judge`),
        "radius", "train_prompts", "seconds"}``; with ``out``, ``capability.json``
        and ``capability.md`` there. ``out`` must be new, empty or an earlier output of the
        benchmark, which ``overwrite`` replaces (:mod:`melbo.core.outputs`).

    Raises:
        MelboError: a bad task or setting; an ``out`` the output rule refuses; test prompts that,
            with ``max_new_tokens``, need more positions than the model reads.
    """
    target = claim_folder(out, "bench capability", overwrite=overwrite) if out is not None else None
    task.check()
    num_train = check_int("training instances", num_train, 1, 100)
    num_test = check_int("test instances", num_test, 1, 10_000)
    pairs = task.instances(num_train + num_test, seed)
    train_pairs, test_pairs = pairs[:num_train], pairs[num_train:]
    check_fits(lm, [task.prompt(a, b) for a, b in test_pairs], GenerationConfig(max_new_tokens=max_new_tokens))
    t0 = time.perf_counter()
    bank = train(
        lm,
        [task.prompt(a, b) for a, b in train_pairs],
        method,
        evaluate=False,
        show_progress=show_progress,
        seed=seed,
        **settings,
    )
    n = min(len(bank), int(settings.get("num_vectors", len(bank))))
    test_prompts = [task.prompt(a, b) for a, b in test_pairs]
    truths = [task.answer(a, b) for a, b in test_pairs]
    learned = bank.generate(test_prompts, vectors=list(range(n)), max_new_tokens=max_new_tokens)
    base = learned.pop("unsteered")
    rand_bank = bank.random
    assert rand_bank is not None
    rand = rand_bank.generate(test_prompts, vectors=list(range(n)), unsteered=False, max_new_tokens=max_new_tokens)
    acc_l = [accuracy(c, truths) for c in learned.values()]
    acc_r = [accuracy(c, truths) for c in rand.values()]
    judged = judge_groups(test_prompts, base, {"learned": list(learned.values()), "random": list(rand.values())}, lm)
    judge_labels = {g: count_labels(j["label"] for v in judged[g] for j in v) for g in judged}
    best = max(range(len(acc_l)), key=lambda i: acc_l[i]) if acc_l else None
    report = {
        "task": {"op": task.op, "digits_a": task.digits_a, "digits_b": task.digits_b, "template": TEMPLATE},
        "model": lm.name,
        "method": method,
        "radius": bank.meta["radius"],
        "source_layer": bank.meta["source_layer"],
        "target_layer": bank.meta["target_layer"],
        "train_prompts": [task.prompt(a, b) for a, b in train_pairs],
        "num_test": num_test,
        "unsteered": accuracy(base, truths),
        "learned": acc_l,
        "random": acc_r,
        "best": None
        if best is None
        else {
            "vector": best,
            "accuracy": acc_l[best],
            "examples": list(zip(test_prompts[:3], list(learned.values())[best][:3])),
        },
        "unsteered_examples": list(zip(test_prompts[:3], base[:3])),
        "judge_labels": judge_labels,
        "seconds": time.perf_counter() - t0,
        "rule": "answer = last integer before a new 'Q:'; accuracy = share of test instances answered correctly",
    }
    if target is not None:
        folder = target.prepare()
        write_json(folder / "capability.json", report)
        write_text(folder / "capability.md", capability_markdown(report))
        bank.save(folder)
    return report


def capability_markdown(report: dict) -> str:
    """The capability report as Markdown: accuracy per vector beside random and unsteered."""
    t = report["task"]
    lines = [
        f"# Capability: a {t['digits_a']}-digit number {t['op']} a {t['digits_b']}-digit number ({report['model']})",
        "",
        f"{report['method']}, R = {report['radius']:.4g}, layers {report['source_layer']} -> "
        f"{report['target_layer']}, trained on {len(report['train_prompts'])} instance(s), scored on "
        f"{report['num_test']} others. {report['rule']}.",
        "",
        f"**Unsteered accuracy: {100 * report['unsteered']:.0f}%**",
        "",
        "| vector | learned accuracy | random vector | random accuracy |",
        "|---|---|---|---|",
    ]
    for i, (a, r) in enumerate(zip(report["learned"], report["random"] + [None] * len(report["learned"]))):
        lines.append(f"| {i} | {100 * a:.0f}% | r{i} | {'-' if r is None else f'{100 * r:.0f}%'} |")
    if report.get("judge_labels"):
        jl = report["judge_labels"]
        lines += [
            "",
            f"Behavior judge ({JUDGE_NAME}) over the test completions, against the unsteered one: learned "
            f"{counts_text(jl['learned'])}; random {counts_text(jl['random'])}.",
        ]
    if report["best"]:
        lines += ["", f"Best learned vector: {report['best']['vector']} ({100 * report['best']['accuracy']:.0f}%):", ""]
        lines += [f"- `{' '.join((p + c).split())[:160]}`" for p, c in report["best"]["examples"]]
    return "\n".join(lines) + "\n"


def bank_accuracy(bank: Bank, task: Task, pairs: list[tuple[int, int]], max_new_tokens: int = 48) -> list[float]:
    """Accuracy of every vector of ``bank`` on the instances ``pairs`` (for banks trained elsewhere)."""
    prompts = [task.prompt(a, b) for a, b in pairs]
    truths = [task.answer(a, b) for a, b in pairs]
    comps = bank.generate(prompts, unsteered=False, max_new_tokens=max_new_tokens)
    return [accuracy(c, truths) for c in comps.values()]
