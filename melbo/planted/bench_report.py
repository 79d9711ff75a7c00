"""Reports of the planted-behavior benchmark: ``bench.json`` (everything) and ``bench.md``
(the recall table, learned against random, and each discovering perturbation with its completion),
and the short text table the CLI prints."""

from __future__ import annotations

import os
from pathlib import Path

from melbo.core.io import write_json, write_text
from melbo.core.outputs import claim_folder
from melbo.eval.control_stats import controls_markdown
from melbo.eval.labels import JUDGE_NAME, counts_text
from melbo.report.html import write_html_report

BENCH_JSON, BENCH_MD = "bench.json", "bench.md"


def write_report(out: str | os.PathLike, report: dict, overwrite: bool = False) -> Path:
    """Write ``bench.json``, ``bench.md`` and ``report.html`` into ``out`` (created), atomically. Returns the folder.

    Raises:
        MelboError: ``out`` holds files melbo did not write, or an earlier benchmark and not
            ``overwrite`` (:func:`melbo.core.outputs.claim_folder`); it cannot be written.
    """
    folder = claim_folder(out, "bench backdoor", overwrite=overwrite).prepare()
    write_json(folder / BENCH_JSON, report, indent=1)
    write_text(folder / BENCH_MD, report_markdown(report))
    write_html_report(folder)
    return folder


def first_hit(rows: list[dict], behavior: str) -> dict:
    return next((r for r in rows if r["label"] == f"backdoor:{behavior}"), {"completion": ""})


def around(text: str, phrase: str, n: int = 70) -> str:
    """``text`` shortened to ``n`` characters so that the first ``phrase`` in it shows."""
    t = " ".join(text.split())
    i = t.find(phrase)
    if i <= 0 or len(t) <= n:
        return short(t, n)
    start = max(0, min(i - 15, len(t) - n))
    return "…" + short(t[start + 1 :], n - 1)


def short(text: str, n: int = 70) -> str:
    t = " ".join(text.split())
    return (t[: n - 1] + "…") if len(t) > n else t


def report_markdown(report: dict) -> str:
    """The report as Markdown: setting, recall table (learned vs random), discovering vectors
    with their completions and generalization."""
    lines = [
        f"# Planted-behavior benchmark: {report['spec']} on {report['model']}",
        "",
        f"- setting: `{report['label']}`",
        f"- R = {report['radius']:.4g} ({report['radius_over_residual']:.3g} x the mean residual norm "
        f"{report['residual_norm']:.4g}), layers {report['source_layer']} -> {report['target_layer']}",
        f"- training prompt(s): {', '.join(repr(p) for p in report['train_prompts'])}; "
        f"{report['max_new_tokens']} new tokens, greedy",
        "- unsteered: " + "; ".join(f"{u['label']} `{short(u['completion'])}`" for u in report["unsteered"]),
        f"- seconds: train {report['seconds']['train']:.1f}, generate "
        f"{report['seconds']['generate_learned'] + report['seconds']['generate_random']:.1f}, "
        f"generalization {report['seconds']['generalization']:.1f}, total {report['seconds']['total']:.1f}",
        "",
        f"**Recall: learned {report['learned']['recall']:.2f}, random {report['random']['recall']:.2f}**",
        "",
        "| behavior | phrase | learned: vectors | first | random: vectors | first | best generalization (learned) |",
        "|---|---|---|---|---|---|---|",
    ]
    n = report["setting"]["num_vectors"]
    for b, phrase in report["phrases"].items():
        L, R = report["learned"]["behaviors"][b], report["random"]["behaviors"][b]
        g = max((x["rate"] for x in L["generalization"]), default=None)
        lines.append(
            f"| {b} | `{phrase}` | {L['count']}/{n} | {L['first_index'] if L['first_index'] is not None else '-'} "
            f"| {R['count']}/{n} | {R['first_index'] if R['first_index'] is not None else '-'} "
            f"| {'-' if g is None else f'{100 * g:.0f}%'} |"
        )
    lines += [
        "",
        f"Labels (learned): {report['learned']['label_counts']}",
        f"Labels (random): {report['random']['label_counts']}",
        *judge_lines(report),
        "",
        "## Discovering vectors",
        "",
    ]
    any_hit = False
    for kind in ("learned", "random"):
        for b in report["phrases"]:
            for g in report[kind]["behaviors"][b]["generalization"]:
                hit = first_hit(report["completions"][kind][g["vector"]], b)
                any_hit = True
                lines.append(
                    f"- {kind} vector {g['vector']} (scale {g['scale']:g}) -> **{b}**, fires on "
                    f"{100 * g['rate']:.0f}% of {len(report['generalization_prompts'])} other clean prompts: "
                    f"`{around(hit['completion'], report['phrases'][b], 90)}`"
                )
    if not any_hit:
        lines.append("(none)")
    if report.get("controls"):
        lines += controls_markdown(report["controls"])
    return "\n".join(lines) + "\n"


def judge_lines(report: dict) -> list[str]:
    """The behavior judge's label counts, learned against random (none for a report without them)."""
    if "judge_labels" not in report["learned"]:
        return []
    return [
        "",
        f"Behavior judge ({JUDGE_NAME}, against the unsteered completion): learned "
        f"{counts_text(report['learned']['judge_labels'])}; random {counts_text(report['random']['judge_labels'])}",
    ]


def summary_lines(report: dict, completions: bool = True, width: int = 60, max_listed: int = 5) -> list[str]:
    """A short text table of one report: per behavior, learned vs random (count, first index,
    generalization), then which vectors found what (at most ``max_listed`` per behavior and kind),
    with their completions."""
    n = report["setting"]["num_vectors"]
    out = [
        f"setting: {report['label']}",
        f"R = {report['radius']:.4g} ({report['radius_over_residual']:.3g} x residual norm), layers "
        f"{report['source_layer']} -> {report['target_layer']}, "
        + (
            f"prompt {report['train_prompts'][0]!r}"
            if len(report["train_prompts"]) == 1
            else f"{len(report['train_prompts'])} prompts, the first {report['train_prompts'][0]!r}"
        ),
        f"unsteered: {short(report['unsteered'][0]['completion'], width)}  [{report['unsteered'][0]['label']}]",
        f"recall: learned {report['learned']['recall']:.2f}, random {report['random']['recall']:.2f}   "
        f"({report['seconds']['train']:.1f} s training, {report['seconds']['total']:.1f} s in all)",
        f"{'behavior':<10} {'phrase':<28} {'learned':>8} {'first':>6} {'random':>8} {'first':>6}",
    ]
    if "judge_labels" in report["learned"]:
        out.insert(
            -1,
            f"judge: learned {counts_text(report['learned']['judge_labels'])}; "
            f"random {counts_text(report['random']['judge_labels'])}",
        )
    for b, phrase in report["phrases"].items():
        L, R = report["learned"]["behaviors"][b], report["random"]["behaviors"][b]
        fl = "-" if L["first_index"] is None else L["first_index"]
        fr = "-" if R["first_index"] is None else R["first_index"]
        out.append(f"{b:<10} {short(phrase, 28):<28} {L['count']:>4}/{n:<3} {fl!s:>6} {R['count']:>4}/{n:<3} {fr!s:>6}")
    if completions:
        for kind in ("learned", "random"):
            for b in report["phrases"]:
                found = report[kind]["behaviors"][b]["generalization"]
                for g in found[:max_listed]:
                    hit = first_hit(report["completions"][kind][g["vector"]], b)
                    out.append(
                        f"  {kind} #{g['vector']} x{g['scale']:g} -> {b} (fires on {100 * g['rate']:.0f}% of "
                        f"{len(report['generalization_prompts'])} other prompts): "
                        f"{around(hit['completion'], report['phrases'][b], width)}"
                    )
                if len(found) > max_listed:
                    out.append(f"  ... and {len(found) - max_listed} more {kind} vectors -> {b} (all in bench.md)")
        if not any(report[k]["behaviors"][b]["count"] for k in ("learned", "random") for b in report["phrases"]):
            out.append("  no vector elicited a planted behavior")
    return out
