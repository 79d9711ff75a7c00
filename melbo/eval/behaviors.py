"""Distinct behaviors, counted: the ``new`` completions of a run (:mod:`melbo.eval.judge`) grouped
into behaviors, each named by its most distinctive words, counted per group of perturbations
(learned, each negative control) as more perturbations are drawn, and every perturbation placed
on a fluency/novelty plane with its Pareto frontier.

- **Grouping** (:func:`cluster`): agglomerative clustering of what each completion adds to the
  unsteered one: its sentence embedding (:func:`melbo.embed.embed`, all-MiniLM-L6-v2) with the
  component along the unsteered completion's embedding removed (:func:`change_vectors`), with
  :data:`LINKAGE` linkage cut at cosine distance :data:`THRESHOLD` (``scipy.cluster.hierarchy``).
  Completions of different prompts are never merged: a behavior belongs to one prompt. Learned
  and control completions are clustered *together*, so a behavior a control also writes is
  recognized as the same one.
- **Names** (:func:`ctfidf_words`): class-based TF-IDF (Grootendorst 2022, BERTopic,
  arXiv:2203.05794): ``W(t, c) = tf(t, c) · log(1 + A / f(t))`` with ``tf(t, c)`` the frequency of
  word ``t`` in class ``c`` divided by the class's word count, ``A`` the mean word count per class
  and ``f(t)`` the frequency of ``t`` over all classes; classes are the behaviors plus the
  unsteered completions, so words a behavior shares with the unsteered text score low.
- **Enumeration curve** (:func:`expected_distinct`): the number of distinct behaviors found by
  ``k`` of a group's ``N`` perturbations, averaged over all ``N!`` orderings, computed exactly:
  the first ``k`` of a uniformly random ordering are a uniformly random ``k``-subset, which misses
  behavior ``b`` (hit by ``m_b`` perturbations) with probability ``C(N − m_b, k) / C(N, k)``, so
  ``E[distinct(k)] = Σ_b (1 − C(N − m_b, k) / C(N, k))``.
- **Frontier** (:func:`pareto_front`): per perturbation, fluency = 1 − the judge's mean
  ``degenerate`` score over its completions and novelty = the mean embedding cosine distance of its
  completions to the unsteered completion of the same prompt (both rounded to 6 decimals); a
  point is on the frontier when no other point is at least as fluent and as novel and strictly
  better in one.

:func:`run_behaviors` does all of it for a run folder (``completions.jsonl``, ``controls.jsonl``)
and writes ``enumeration.png`` and ``frontier.png``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from melbo.core.errors import MelboError
from melbo.core.io import read_text
from melbo.core.models import LoadedModel
from melbo.embed import distance_to, embed, embedder_path, named_embedder
from melbo.eval.judge import judge
from melbo.report.behaviors import plot_enumeration, plot_frontier

THRESHOLD = 0.4
"""Cosine distance at which the :data:`LINKAGE` dendrogram of a prompt's ``new`` completions'
change vectors (:func:`change_vectors`) is cut into behaviors.

Chosen by ``benchmarks/behavior_clusters.py`` on the tune half of the hand-labelled set
(benchmarks/data/judge, GUIDE.md: 67 ``new`` rows in 10 prompt+model groups; two rows of one
prompt and model are the same behavior when their behavior names are equal): among linkages
(average, complete) and thresholds (0.05 to 1.2 by 0.025) at which three unrelated topics × three
paraphrases come out as exactly three clusters (0.4 to 0.925 for complete linkage), the highest
mean within-group adjusted Rand index (ARI), averaged over the threshold and its 4 grid
neighbours. Measured, tune / held-out (83 rows in 10 groups): mean within-group ARI 0.434 /
0.337, ARI of the whole half (prompts kept apart) 0.454 / 0.304, pair F1 of "same behavior"
0.463 / 0.312 (precision 0.613 / 0.708, recall 0.373 / 0.200), pair accuracy 0.839 / 0.816; ROC
AUC of the change vectors' cosine similarity as a same-behavior score 0.764 / 0.826. References
on the held-out half: one cluster per prompt: within-group ARI 0, ARI 0.317, F1 0.345; every
completion alone: within-group ARI 0.100, ARI 0, F1 0, accuracy 0.792. Clusters are tighter than
the hand-named behaviors (high precision, low recall: a named behavior is often split in two):
read behavior counts as upper estimates, and compare learned with controls, which are counted
by the same rule."""
LINKAGE = "complete"
"""Linkage of the agglomerative clustering (``scipy.cluster.hierarchy.linkage`` method): complete
linkage keeps every pair in a behavior within :data:`THRESHOLD` of each other."""
NAME_WORDS = 3
"""Words in a behavior's name."""
STOP_WORDS = frozenset(
    "a an and are as at be but by for from had has have he her him his i in is it its me my of on or "
    "our she so that the their them then there they this to was we were what when which who will with "
    "you your".split()
)
"""Function words never used in a name."""

Labeller = Callable[[list[dict]], list[tuple[str, float]]]
"""Labels rows (``prompt``, ``unsteered``, ``completion``): one ``(label, degenerate score in [0,
1])`` per row, label ``new``, ``degenerate`` or ``unchanged``."""


def judge_labeller(lm: LoadedModel | None = None, chat: bool = False) -> Labeller:
    """The behavior judge (:func:`melbo.eval.judge.judge`, with the unsteered ``lm``) as a :data:`Labeller`."""

    def label(rows: list[dict]) -> list[tuple[str, float]]:
        return [(r["label"], float(r["scores"]["degenerate"])) for r in judge(rows, lm=lm, chat=chat)]

    return label


def change_vectors(emb: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[n, dim]`` float64: each unit embedding row ``e`` of ``emb`` without its component along
    the unit embedding ``u`` of the unsteered completion of its prompt, ``e − (e·u) u`` (``ref``:
    ``u`` as ``[dim]``, or one row per row of ``emb``). Content the steered and unsteered texts
    share drops out; unlike ``e − u``, two completions far from the unsteered one and from each
    other stay far apart."""
    e, u = np.asarray(emb, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return e - (e * u).sum(-1, keepdims=True) * u


def cluster(emb: torch.Tensor | np.ndarray, threshold: float = THRESHOLD, method: str = LINKAGE) -> list[int]:
    """Cluster ids (0, 1, ... in order of first appearance) of the rows of ``emb`` ``[n, dim]``:
    agglomerative clustering on cosine distance (``1 − cos``; a zero row is at distance 1 from
    every row), ``method`` linkage, cut where the merge distance exceeds ``threshold``
    (``scipy.cluster.hierarchy.fcluster``, criterion ``distance``). One row is one cluster; no
    row, no cluster.

    Raises:
        MelboError: ``threshold`` not in [0, 2]; an unknown ``method``.
    """
    if not 0 <= threshold <= 2:
        raise MelboError(f"clustering threshold {threshold!r} is not a cosine distance in [0, 2]")
    if method not in ("average", "complete", "single", "weighted"):
        raise MelboError(f"unknown linkage {method!r}; allowed: average, complete, single, weighted")
    x = np.asarray(emb, dtype=np.float64)
    if len(x) < 2:
        return [0] * len(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.clip(np.nan_to_num(pdist(x, "cosine"), nan=1.0), 0.0, 2.0)
    raw = fcluster(linkage(d, method=method), t=threshold, criterion="distance")
    first: dict[int, int] = {}
    return [first.setdefault(int(c), len(first)) for c in raw]


def adjusted_rand_index(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Adjusted Rand index of two partitions given as labels per item (Hubert & Arabie 1985):
    ``(Σ_ij C(n_ij, 2) − E) / (½(Σ_i C(a_i, 2) + Σ_j C(b_j, 2)) − E)`` with ``E = Σ_i C(a_i, 2) ·
    Σ_j C(b_j, 2) / C(n, 2)``; 1.0 when the denominator is 0 and the partitions are the same.

    Raises:
        MelboError: ``a`` and ``b`` differ in length.
    """
    if len(a) != len(b):
        raise MelboError(f"partitions of {len(a)} and {len(b)} items")
    pairs = lambda counts: sum(math.comb(c, 2) for c in counts)  # noqa: E731
    index = pairs(Counter(zip(a, b)).values())
    sa, sb, n2 = pairs(Counter(a).values()), pairs(Counter(b).values()), math.comb(len(a), 2)
    expected = sa * sb / n2 if n2 else 0.0
    top = (sa + sb) / 2
    if top == expected:
        return 1.0 if index == top else 0.0
    return (index - expected) / (top - expected)


def words(text: str) -> list[str]:
    """Lower-cased words of ``text`` (runs of letters or digits) of 2+ characters, stop words out."""
    return [w for w in re.findall(r"[^\W_]+", text.lower()) if len(w) > 1 and w not in STOP_WORDS]


def ctfidf_words(classes: Sequence[Sequence[str]], top: int = NAME_WORDS) -> list[list[str]]:
    """The ``top`` words of highest c-TF-IDF (module docstring) of each class of texts, best first
    (ties by the word). A class without words gets no words."""
    counts = [Counter(w for t in texts for w in words(t)) for texts in classes]
    total = Counter[str]()
    for c in counts:
        total.update(c)
    sizes = [sum(c.values()) for c in counts]
    mean = sum(sizes) / max(1, len(counts))
    out = []
    for c, size in zip(counts, sizes):
        score = {w: n / size * math.log(1 + mean / total[w]) for w, n in c.items()}
        out.append([w for w, _ in sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))[:top]])
    return out


def expected_distinct(hits: Sequence[set], ks: Sequence[int] | None = None) -> list[float]:
    """``E[number of distinct behaviors hit by the first k perturbations]`` over uniformly random
    orderings of the ``N = len(hits)`` perturbations, exactly (module docstring), for each ``k`` of
    ``ks`` (default ``1..N``). ``hits[p]``: the behaviors perturbation ``p`` writes.

    Raises:
        MelboError: a ``k`` outside ``0..N``.
    """
    n = len(hits)
    ks = list(range(1, n + 1)) if ks is None else list(ks)
    m = Counter(b for h in hits for b in set(h))
    out = []
    for k in ks:
        if not 0 <= k <= n:
            raise MelboError(f"k = {k} perturbations out of {n}; allowed: 0..{n}")
        out.append(float(sum(1 - math.comb(n - mb, k) / math.comb(n, k) for mb in m.values())))
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which points ``(x, y)`` no other point dominates (``x' ≥ x``, ``y' ≥ y``, one strictly; both
    maximized). Equal points do not dominate each other. O(n log n)."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best = [False] * len(points), -math.inf
    for _, run in groupby(order, key=lambda i: points[i][0]):  # runs of equal x, best y first
        same = list(run)
        top = points[same[0]][1]
        for i in same:
            front[i] = points[i][1] == top and top > best
        best = max(best, top)
    return front


def find_behaviors(
    items: list[dict], labeller: Labeller, embedder: str | None = None, threshold: float = THRESHOLD
) -> dict[str, Any]:
    """Label, cluster, name, count and place every perturbation of every group.

    Args:
        items: one per completion: ``group`` (``learned``, a control's name, ...), ``index`` (the
            perturbation or sample in its group), ``prompt``, ``unsteered``, ``completion``.
        labeller: labels the completions (:data:`Labeller`; e.g. :func:`judge_labeller`).
        embedder: the sentence-embedding model (:func:`melbo.embed.embedder_path`).

    Returns:
        ``{"threshold", "linkage", "groups": {group: {"perturbations", "new", "distinct",
        "shared"}}, "learned_only", "behaviors": [{"id", "prompt", "name", "words", "completions",
        "members": {group: [indices]}}], "curves": {group: [E distinct at k = 1..N]}, "points":
        [{"group", "index", "fluency", "novelty", "frontier"}] (frontier first, then by novelty)}``;
        ``shared``: the group's behaviors that another group writes too (for ``learned``: any
        other group; for the others: ``learned``); ``learned_only``: behaviors only learned
        perturbations write.

    Raises:
        MelboError: an item without one of the keys; a labeller returning the wrong count or
            an unknown label; no sentence-embedding model.
    """
    keys = ("group", "index", "prompt", "unsteered", "completion")
    for n, it in enumerate(items):
        if not all(k in it for k in keys):
            raise MelboError(f"completion {n} lacks one of {', '.join(keys)}")
    labels = labeller(items) if items else []
    if len(labels) != len(items) or any(lab not in ("new", "degenerate", "unchanged") for lab, _ in labels):
        raise MelboError("the labeller must return one (new | degenerate | unchanged, score) per completion")
    unsteered = sorted({it["unsteered"] for it in items})
    emb = embed([it["completion"] for it in items] + unsteered, embedder) if items else torch.zeros(0, 1)
    ref = {u: emb[len(items) + j] for j, u in enumerate(unsteered)}
    novelty = [float(distance_to(emb[j : j + 1], ref[it["unsteered"]])[0]) for j, it in enumerate(items)]
    beh_of: dict[int, int] = {}
    behaviors: list[dict] = []
    for prompt in dict.fromkeys(it["prompt"] for it in items):
        new = [j for j, it in enumerate(items) if it["prompt"] == prompt and labels[j][0] == "new"]
        refs = torch.stack([ref[items[j]["unsteered"]] for j in new]) if new else None
        ids = cluster(change_vectors(emb[new], refs), threshold) if refs is not None else []
        base = len(behaviors)
        behaviors += [{"id": base + c, "prompt": prompt} for c in range(max(ids, default=-1) + 1)]
        beh_of.update({j: base + c for j, c in zip(new, ids)})
    texts: list[list[str]] = [[] for _ in behaviors]
    members: list[dict[str, set]] = [defaultdict(set) for _ in behaviors]
    for j, b in beh_of.items():
        texts[b].append(items[j]["completion"])
        members[b][items[j]["group"]].add(items[j]["index"])
    names = ctfidf_words([*texts, unsteered])
    for b, beh in enumerate(behaviors):
        beh.update(
            name=" / ".join(names[b]) or "(no words)",
            words=names[b],
            completions=len(texts[b]),
            members={g: sorted(v) for g, v in members[b].items()},
        )
    groups = list(dict.fromkeys(it["group"] for it in items))
    per: dict[tuple[str, Any], list[int]] = defaultdict(list)
    for j, it in enumerate(items):
        per[(it["group"], it["index"])].append(j)
    stats, curves = {}, {}
    learned_hit = {b for b, m in enumerate(members) if "learned" in m}
    hit_by_others = {b for b, m in enumerate(members) if set(m) - {"learned"}}
    for g in groups:
        perts = [key for key in per if key[0] == g]
        hits = [{beh_of[j] for j in per[key] if j in beh_of} for key in perts]
        found = set().union(*hits)
        curves[g] = expected_distinct(hits)
        stats[g] = {
            "perturbations": len(perts),
            "new": sum(labels[j][0] == "new" for key in perts for j in per[key]),
            "distinct": len(found),
            "shared": len(found & (hit_by_others if g == "learned" else learned_hit)),
        }
    points = [  # rounded: float noise (1e-7 for identical texts) must not make a point dominate
        {
            "group": g,
            "index": i,
            "fluency": round(float(np.mean([1 - labels[j][1] for j in js])), 6),
            "novelty": round(float(np.mean([novelty[j] for j in js])), 6),
        }
        for (g, i), js in per.items()
    ]
    for p, f in zip(points, pareto_front([(p["novelty"], p["fluency"]) for p in points])):
        p["frontier"] = f
    points.sort(key=lambda p: (not p["frontier"], -p["novelty"], -p["fluency"]))
    return {
        "threshold": threshold,
        "linkage": LINKAGE,
        "groups": stats,
        "learned_only": sum(1 for m in members if set(m) == {"learned"}),
        "behaviors": behaviors,
        "curves": curves,
        "points": points,
    }


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in read_text(path, path.name).splitlines() if line.strip()]


def _item(group: str, index: Any, r: dict) -> dict:
    item = {"group": group, "index": index, "prompt": r["prompt"], "completion": r["completion"]}
    scores = r.get("scores")
    if r.get("label") in ("new", "degenerate", "unchanged") and isinstance(scores, dict) and "degenerate" in scores:
        item["stored"] = (r["label"], float(scores["degenerate"]))  # the judge's label, kept by the run
    return item


def run_items(folder: str | os.PathLike) -> list[dict]:
    """The completions of a run folder as :func:`find_behaviors` items: the learned ones of
    ``completions.jsonl`` and every control's of ``controls.jsonl`` when the run has controls
    (the random baseline of ``completions.jsonl`` is left out: it is the ``random-vectors``
    control). Rows that carry the judge's ``label`` and ``scores`` keep them as ``stored``:
    ``(label, degenerate score)``.

    Raises:
        MelboError: no ``completions.jsonl``, or a file that is not JSON lines.
    """
    folder = Path(folder)
    try:
        rows = _jsonl(folder / "completions.jsonl")
        ctl = _jsonl(folder / "controls.jsonl") if (folder / "controls.jsonl").is_file() else []
    except json.JSONDecodeError as e:
        raise MelboError(f"{str(folder)!r}: a completions file that is not JSON lines ({e.msg})") from None
    base = {r["prompt"]: r["completion"] for r in rows if r["kind"] == "unsteered"}
    items = [_item("learned", r["vector"], r) for r in rows if r["kind"] == "learned"]
    items += [_item(r["control"], r["sample"], r) for r in ctl]
    return [dict(it, unsteered=base[it["prompt"]]) for it in items if it["prompt"] in base]


def stored_labels(rows: list[dict]) -> list[tuple[str, float]]:
    """A :data:`Labeller` that reads the ``stored`` judge labels of :func:`run_items` items."""
    return [r["stored"] for r in rows]


def run_behaviors(
    folder: str | os.PathLike, lm: LoadedModel | None = None, chat: bool = False, labeller: Labeller | None = None
) -> dict[str, Any]:
    """:func:`find_behaviors` on a run folder's completions (:func:`run_items`), with
    ``enumeration.png`` and ``frontier.png`` written into it.

    Args:
        lm: the unsteered model, for the judge's log-probability criteria (None: text only).
        labeller: default: the judge's labels the run's files carry (:func:`stored_labels`; no
            model call), else :func:`judge_labeller` of ``lm``.

    Returns:
        the result of :func:`find_behaviors` with ``labeller`` and ``embedder`` added, or
        ``{"skipped": reason}`` when no sentence-embedding model is installed and none is named.

    Raises:
        MelboError: the embedding model named by ``MELBO_EMBEDDER`` cannot be loaded.
    """
    try:
        path = embedder_path()
        embed(["probe"], path)  # loads the model once (cached): a missing or broken one skips the count
    except MelboError as e:
        if named_embedder():  # a model the user named that fails is an error, as in the judge
            raise
        return {"skipped": str(e)}
    items = run_items(folder)
    how = "a caller's labeller" if labeller else "the behavior judge (melbo.eval.judge)"
    if labeller is None and items and all("stored" in it for it in items):
        labeller, how = stored_labels, "the behavior judge's labels stored in the run's completion files"
    result = find_behaviors(items, labeller or judge_labeller(lm, chat), path)
    result["labeller"] = how
    result["embedder"] = Path(path).name
    plot_enumeration(Path(folder) / "enumeration.png", result["curves"])
    plot_frontier(Path(folder) / "frontier.png", result["points"])
    return result
