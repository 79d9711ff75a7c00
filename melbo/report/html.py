"""``report.html``: one self-contained page for a run folder (or a planted-benchmark folder).

Per perturbation a card with its completions on the training and held-out prompts beside the
unsteered model and the random vector of the same row (same R), its objective, cos(start, end),
KL divergence to the unsteered model (nats, next token at the last prompt position, METHOD.md
section 3) and generalization rate (the share of held-out prompts whose completion the behavior
judge labels ``new``, :mod:`melbo.eval.judge`; for a folder written before the judge, the share
it changes and keeps coherent, :mod:`melbo.quality`). Every steered completion shows its label as
a colored tag, and the page filters cards and completions by label. Cards are grouped by what their completions say:
sentence-embedding clusters (average linkage, cosine distance below :data:`CLUSTER_DISTANCE`),
with the random baseline's spread beside for scale. The R-sweep curve and the benchmark tables
are included when the folder has them. Plots are inline PNG data URIs, the script is inline:
the page needs no server and no network; sorting and filtering run in the page.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, select_autoescape
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from melbo.bank import BANK_FILE, Bank
from melbo.core.errors import MelboError
from melbo.core.io import read_json, read_text, write_text
from melbo.core.outputs import check_output_file
from melbo.embed import embed, named_embedder
from melbo.eval.labels import JUDGE_NAME, ORDER, count_labels
from melbo.report.completions import COMPLETIONS, similarity
from melbo.report.summary import SUMMARY_JSON, TITLES, settings_line

REPORT = "report.html"
CLUSTER_DISTANCE = 0.25  # cosine distance of completion embeddings under which two vectors do the same thing
PLOTS = ("radius_sweep.png", "kl.png", "norms.png")
TEMPLATE = Path(__file__).with_name("report.html.j2")


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _rows(folder: Path) -> list[dict]:
    p = folder / COMPLETIONS
    if not p.is_file():
        return []
    out = []
    for n, line in enumerate(read_text(p, "completions file").splitlines()):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise MelboError(f"{str(p)!r} line {n + 1} is not JSON") from None
            vector = row.get("vector") if isinstance(row, dict) else None
            if (
                not isinstance(row, dict)
                or not isinstance(row.get("prompt"), str)
                or not isinstance(row.get("completion"), str)
                or not (row.get("kind") == "unsteered" or (isinstance(vector, int) and not isinstance(vector, bool)))
            ):
                raise MelboError(
                    f"{str(p)!r} line {n + 1} ({line[:80]!r}) is not a completion row: expected a JSON object with "
                    f"string prompt and completion and, unless kind is unsteered, an integer vector"
                )
            out.append(row)
    return out


def _distances(texts: list[str]) -> tuple[np.ndarray, str]:
    """Pairwise distances ``[n, n]`` of texts: cosine distance of sentence embeddings, or
    ``1 - character similarity`` when no embedding model is installed and none is named.

    Raises:
        MelboError: the embedding model named by ``MELBO_EMBEDDER`` is refused or cannot be loaded.
    """
    try:
        e = embed(texts).double()
        e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (1 - e @ e.T).clamp_min(0).numpy(), "cosine distance of sentence embeddings"
    except MelboError as err:
        if named_embedder():  # the user named this model: its failure is an error, as in the judge
            raise MelboError(f"MELBO_EMBEDDER={named_embedder()!r}: {err}") from None
        d = np.array([[1 - similarity(a, b) for b in texts] for a in texts])
        return d, "1 - character similarity (no sentence-embedding model installed)"


def clusters(dist: np.ndarray, threshold: float = CLUSTER_DISTANCE) -> list[int]:
    """Cluster labels (0 = the largest cluster, ties by first member) of items with pairwise distances ``dist [n, n]``:
    average-linkage agglomerative clustering cut at ``threshold``."""
    n = len(dist)
    if n < 2:
        return [0] * n
    sym = (dist + dist.T) / 2
    np.fill_diagonal(sym, 0)
    labels = fcluster(linkage(squareform(sym, checks=False), "average"), threshold, "distance")
    counts = Counter(labels.tolist())
    first = {lab: labels.tolist().index(lab) for lab in counts}
    order = {lab: i for i, lab in enumerate(sorted(counts, key=lambda lab: (-counts[lab], first[lab])))}
    return [order[lab] for lab in labels.tolist()]


def _mean_offdiag(d: np.ndarray) -> float | None:
    n = len(d)
    return float((d.sum() - np.trace(d)) / (n * (n - 1))) if n > 1 else None


def _label(row: dict) -> str | None:
    """The judge's label of a completion row (None when the folder predates the judge)."""
    lab = row.get("label")
    return lab if lab in ORDER else None


def _generalizes(row: dict) -> bool:
    """A held-out completion counted by the generalization rate: labelled ``new`` by the judge (a
    row without a label: changed and coherent, the older flags)."""
    if "label" in row:
        return row["label"] == "new"
    return bool(row.get("changed")) and bool(row.get("coherent", True))


def report_data(folder: str | os.PathLike) -> dict[str, Any]:
    """Everything the page shows, read from the files of a run folder (bank, completions,
    summary, sweep, measures) or of a benchmark folder (``bench.json``/``bench.md``).

    Raises:
        MelboError: not a folder, or a folder with neither a bank nor a benchmark report; a
            malformed file; a bank with no perturbations; a ``MELBO_EMBEDDER`` model that is refused or
            cannot be loaded (with no embedder named or installed the page uses character similarity).
    """
    root = Path(folder)
    if not root.is_dir():
        raise MelboError(f"report: {str(root)!r} is not a folder; give a melbo run folder")
    bench_md = root / "bench.md"
    if not (root / BANK_FILE).is_file() and not bench_md.is_file():
        raise MelboError(
            f"{str(root)!r} holds no {BANK_FILE} (nor bench.md); give a melbo run folder (melbo train --out) "
            f"or a benchmark folder (melbo bench ... --out)"
        )
    plots = [{"name": n, "src": _data_uri(root / n)} for n in PLOTS if (root / n).is_file()]
    data: dict[str, Any] = {"folder": str(root), "plots": plots, "cards": [], "bench": None, "sweep": None}
    if bench_md.is_file():
        data["bench"] = read_text(bench_md, "benchmark report")
    if not (root / BANK_FILE).is_file():
        data["title"] = f"melbo benchmark report: {root.name}"
        return data
    bank = Bank.load(root)
    if not len(bank):
        raise MelboError(f"the bank of {str(root)!r} holds no perturbations (0 rows); there is nothing to report")
    meta = bank.meta
    summary = read_json(root / SUMMARY_JSON, "run summary") if (root / SUMMARY_JSON).is_file() else {}
    kls = ("kl_to_unsteered", "kl_random_to_unsteered")
    wrong = [k for k in kls if isinstance(summary, dict) and not isinstance(summary.get(k), (list, type(None)))]
    if not isinstance(summary, dict) or wrong:
        found = f"a JSON {type(summary).__name__}" if not isinstance(summary, dict) else f"{wrong[0]} of another type"
        raise MelboError(
            f"run summary {str(root / SUMMARY_JSON)!r} holds {found}; expected a JSON object whose "
            f"{' and '.join(kls)} are lists of numbers"
        )
    data["title"] = f"melbo report: {TITLES.get(bank.method, bank.method)} on {meta.get('model')}"
    data["settings"] = settings_line(meta)
    data["n"] = len(bank)
    data["stats"] = {k: summary.get(k) for k in ("learned", "random") if isinstance(summary.get(k), dict)}
    data["label_order"] = list(ORDER)
    data["judge"] = JUDGE_NAME
    if isinstance(meta.get("radius_sweep"), dict):
        data["sweep"] = meta["radius_sweep"]
    rows = _rows(root)
    unsteered = {r["prompt"]: r["completion"] for r in rows if r.get("kind") == "unsteered"}
    by: dict[tuple[str, int, str], dict] = {
        (str(r.get("kind")), int(r.get("vector", -1)), r["prompt"]): r for r in rows if r.get("kind") != "unsteered"
    }
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    split = {r["prompt"]: r.get("split", "train") for r in rows}
    kl_l, kl_r = summary.get("kl_to_unsteered") or [], summary.get("kl_random_to_unsteered") or []
    evaluated = sorted({v for (k, v, _) in by if k == "learned"})
    texts = [" ".join(by[("learned", v, p)]["completion"] for p in prompts if split[p] == "train") for v in evaluated]
    rtexts = [
        " ".join(by[("random", v, p)]["completion"] for p in prompts if split[p] == "train" and ("random", v, p) in by)
        for v in sorted({v for (k, v, _) in by if k == "random"})
    ]
    labels: list[int] = []
    if texts:
        d, how = _distances(texts + rtexts)
        n = len(texts)
        labels = clusters(d[:n, :n])
        data["clusters"] = {
            "how": how,
            "threshold": CLUSTER_DISTANCE,
            "count": len(set(labels)),
            "learned_spread": _mean_offdiag(d[:n, :n]),
            "random_spread": _mean_offdiag(d[n:, n:]),
        }
    held = [p for p in prompts if split[p] == "heldout"]
    for j, v in enumerate(evaluated):
        info = bank.info(v)
        gen = [by[("learned", v, p)] for p in held]
        card = {
            "index": v,
            "objective": info.get("objective", info.get("causal_importance")),
            "cos": info.get("cosine_start_end"),
            "kl": kl_l[v] if v < len(kl_l) else None,
            "kl_random": kl_r[v] if v < len(kl_r) else None,
            "generalization": (sum(_generalizes(r) for r in gen) / len(gen)) if gen else None,
            "labels": count_labels(by[("learned", v, p)].get("label", "") for p in prompts),
            "cluster": labels[j] if labels else 0,
            "rows": [
                {
                    "prompt": p,
                    "split": split[p],
                    "unsteered": unsteered.get(p, ""),
                    "steered": by[("learned", v, p)]["completion"],
                    "coherent": by[("learned", v, p)].get("coherent"),
                    "label": _label(by[("learned", v, p)]),
                    "random": by.get(("random", v, p), {}).get("completion"),
                    "random_label": _label(by.get(("random", v, p), {})),
                }
                for p in prompts
            ],
        }
        data["cards"].append(card)
    return data


def markdown_html(text: str) -> str:
    """The subset of Markdown melbo writes (headings, bullets, pipe tables, paragraphs) as HTML."""
    out: list[str] = []
    table: list[list[str]] = []

    def inline(s: str) -> str:
        s = html.escape(s)
        parts = s.split("`")
        s = "".join(f"<code>{x}</code>" if i % 2 else x for i, x in enumerate(parts))
        parts = s.split("**")
        return "".join(f"<b>{x}</b>" if i % 2 else x for i, x in enumerate(parts))

    def flush() -> None:
        if table:
            head, *body = [r for r in table if not all(set(c) <= set("-: ") for c in r)]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
            out.append("</table>")
            table.clear()

    for line in text.splitlines():
        s = line.strip()
        if s.startswith("|"):
            table.append([c.strip().replace("\\|", "|") for c in s.strip("|").split(" | ")])
            continue
        flush()
        if s.startswith("#"):
            level = min(6, len(s) - len(s.lstrip("#")) + 1)
            out.append(f"<h{level}>{inline(s.lstrip('#').strip())}</h{level}>")
        elif s.startswith("- "):
            out.append(f"<li>{inline(s[2:])}</li>")
        elif s:
            out.append(f"<p>{inline(s)}</p>")
    flush()
    return "\n".join(out)


def render(data: dict[str, Any]) -> str:
    """The page (HTML text) for :func:`report_data`'s ``data``."""
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters["num"] = lambda x, f=".4g": "-" if not isinstance(x, (int, float)) else format(x, f)
    env.filters["pct"] = lambda x: "-" if not isinstance(x, (int, float)) else f"{100 * x:.0f}%"
    template = env.from_string(TEMPLATE.read_text(encoding="utf-8"))
    bench = markdown_html(data["bench"]) if data.get("bench") else None
    return template.render(d=data, bench_html=bench)


def report_inputs(folder: str | os.PathLike) -> list[tuple[str, Path]]:
    """The files of ``folder`` the page is made from (the output rule keeps the page off them)."""
    root = Path(folder)
    return [
        (f"{name}, read by the report", root / name)
        for name in (BANK_FILE, COMPLETIONS, SUMMARY_JSON, "bench.md", *PLOTS)
    ]


def write_html_report(folder: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write ``report.html`` for the run (or benchmark) folder ``folder`` (into it, or to ``out``),
    atomically. Returns the file.

    Raises:
        MelboError: see :func:`report_data`; ``out`` is one of the files the page is made from
            (:func:`report_inputs`); the output cannot be written.
    """
    if out is not None:
        check_output_file(out, "report file", inputs=report_inputs(folder), overwrite=True)
    data = report_data(folder)
    target = Path(out) if out is not None else Path(folder) / REPORT
    return write_text(target, render(data))
