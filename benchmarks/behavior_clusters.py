"""How well the behavior clustering of melbo.eval.behaviors matches the hand-named behaviors of
``benchmarks/data/judge`` (rows.jsonl, labels.jsonl, GUIDE.md).

The ``new`` rows carry a behavior name. Pairs of ``new`` rows of the same prompt and model are
"same behavior" when their names are equal, else "different". For each linkage and cosine-distance
threshold the change vectors (melbo.eval.behaviors.change_vectors: the completion's embedding
without its component along the unsteered completion's) of each prompt and model are clustered
(melbo.eval.behaviors.cluster); a pair is predicted "same" when both rows land in one cluster. The
linkage and threshold are chosen on the TUNE half only (GUIDE.md's split by a hash of ``id``):
among the thresholds at which a constructed check passes (three unrelated topics × three
paraphrases each, far from an unsteered story, come out as exactly three clusters: :data:`TOPICS`),
the highest mean within-group adjusted Rand index (ARI), averaged over the threshold and its 4
nearest grid neighbours (the tune half is small and its curve jagged); the held-out half is then
scored. Printed for both halves:
pair accuracy / precision / recall / F1, the ARI of the half's whole partition (clusters and names
never span two prompts, so separating prompts alone already scores), the mean within-group ARI,
the ROC AUC of cosine similarity as a same/different score (threshold-free; change vectors and
plain embeddings), and two reference partitions (every row alone; one cluster per prompt).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/behavior_clusters.py     # about 20 seconds
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata

from melbo.embed import embed
from melbo.eval.agreement import split_of
from melbo.eval.behaviors import LINKAGE, THRESHOLD, adjusted_rand_index, change_vectors, cluster

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "judge")
LINKAGES = ("average", "complete")
GRID = [round(float(t), 3) for t in np.arange(0.05, 1.2001, 0.025)]
with open(os.path.join(DATA, "constructed_topics.json"), encoding="utf-8") as _f:
    _CONSTRUCTED = json.load(_f)
STORY: str = _CONSTRUCTED["unsteered"]
TOPICS: list[list[str]] = _CONSTRUCTED["topics"]
"""The constructed check (``data/judge/constructed_topics.json``, shared with the tests): unsteered
text STORY, three behaviors of three paraphrases each."""


def load_new(folder: str) -> list[dict]:
    """The ``new`` rows with their behavior name, split and prompt+model group."""
    labels = {}
    with open(os.path.join(folder, "labels.jsonl"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                labels[r["id"]] = r
    out = []
    with open(os.path.join(folder, "rows.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line) if line.strip() else None
            lab = labels.get(r["id"]) if r else None
            if lab and lab["label"] == "new":
                out.append(dict(r, behavior=lab["behavior"], split=split_of(r["id"]), group=(r["model"], r["prompt"])))
    return out


def by_group(rows: list[dict]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for j, r in enumerate(rows):
        groups[r["group"]].append(j)
    return groups


def auc(scores_pos: list[float], scores_neg: list[float]) -> float:
    """ROC AUC = P(score of a positive > a negative's) + ½ P(tie) (Mann-Whitney U / (n₊ n₋))."""
    ranks = rankdata(np.asarray(scores_pos + scores_neg))
    n_p, n_n = len(scores_pos), len(scores_neg)
    return float((ranks[:n_p].sum() - n_p * (n_p + 1) / 2) / (n_p * n_n))


def score(rows: list[dict], emb: np.ndarray, assign: Callable[[np.ndarray], list[int]]) -> dict[str, float]:
    """Pair and partition agreement of ``assign`` (cluster ids of one group's embeddings) with the names."""
    pred, true, tp = [], [], dict(tp=0, fp=0, fn=0, tn=0)
    aris, weights = [], []
    for g, idx in by_group(rows).items():
        ids = assign(emb[idx])
        names = [rows[j]["behavior"] for j in idx]
        pred += [(g, c) for c in ids]
        true += [(g, n) for n in names]
        if len(idx) > 1:
            aris.append(adjusted_rand_index(ids, names))
            weights.append(len(idx))
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                same, said = names[a] == names[b], ids[a] == ids[b]
                tp["tp" if same and said else "fn" if same else "fp" if said else "tn"] += 1
    n = sum(tp.values())
    prec = tp["tp"] / max(1, tp["tp"] + tp["fp"])
    rec = tp["tp"] / max(1, tp["tp"] + tp["fn"])
    return {
        "pairs": n,
        "same_pairs": tp["tp"] + tp["fn"],
        "accuracy": (tp["tp"] + tp["tn"]) / max(1, n),
        "precision": prec,
        "recall": rec,
        "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        "ari": adjusted_rand_index(pred, true),
        "mean_group_ari": float(np.mean(aris)) if aris else float("nan"),
    }


def distance_auc(rows: list[dict], emb: np.ndarray) -> float:
    pos, neg = [], []
    for idx in by_group(rows).values():
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                sim = float(emb[idx[a]] @ emb[idx[b]])
                (pos if rows[idx[a]]["behavior"] == rows[idx[b]]["behavior"] else neg).append(sim)
    return auc(pos, neg)


def line(name: str, m: dict) -> str:
    return (
        f"{name:<34} pairs {m['pairs']:4d} (same {m['same_pairs']:3d})  acc {m['accuracy']:.3f}  "
        f"P {m['precision']:.3f}  R {m['recall']:.3f}  F1 {m['f1']:.3f}  ARI {m['ari']:.3f}  "
        f"mean group ARI {m['mean_group_ari']:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=DATA, help="folder with rows.jsonl and labels.jsonl")
    ap.add_argument("--curve", action="store_true", help="print the tune criterion at every threshold")
    args = ap.parse_args()
    rows = load_new(args.data)
    plain = embed([r["completion"] for r in rows]).numpy().astype(np.float64)
    change = change_vectors(plain, embed([r["unsteered"] for r in rows]).numpy())
    unit = change / np.linalg.norm(change, axis=1, keepdims=True).clip(1e-12)
    halves = {s: [j for j, r in enumerate(rows) if r["split"] == s] for s in ("tune", "heldout")}
    sub = {s: ([rows[j] for j in idx], change[idx]) for s, idx in halves.items()}
    print(f"{len(rows)} new rows: tune {len(halves['tune'])}, held-out {len(halves['heldout'])}")
    topics = change_vectors(embed([t for ts in TOPICS for t in ts]).numpy(), embed([STORY]).numpy()[0])
    truth = [k for k, ts in enumerate(TOPICS) for _ in ts]
    best: tuple[float, str, float] | None = None
    for method in LINKAGES:
        g = np.array([score(*sub["tune"], lambda e, t=t, m=method: cluster(e, t, m))["mean_group_ari"] for t in GRID])
        smooth = np.convolve(np.pad(g, 2, mode="edge"), np.ones(5) / 5, "valid")
        ok = [cluster(topics, t, method) == truth for t in GRID]
        span = (
            f"{min(t for t, o in zip(GRID, ok) if o)}..{max(t for t, o in zip(GRID, ok) if o)}" if any(ok) else "none"
        )
        print(f"{method}: the constructed topics come out as 3 clusters for t in {span}")
        for t, raw, sm, topics_ok in zip(GRID, g, smooth, ok):
            if args.curve:
                print(f"  tune {method:<8} t={t:.3f}  mean group ARI {raw:.3f}  smoothed {sm:.3f}  topics {topics_ok}")
            if topics_ok and (best is None or sm > best[0] + 1e-12):
                best = (float(sm), method, t)
    assert best is not None
    _, method, t = best
    print(f"\nchosen on tune: {method} linkage, threshold {t:g} (melbo.eval.behaviors: {LINKAGE}, {THRESHOLD:g})")
    for s in ("tune", "heldout"):
        r, e = sub[s]
        print(f"\n== {s}: {len(r)} new rows in {len(by_group(r))} prompt+model groups")
        print(line(f"{method} linkage at {t:g}", score(r, e, lambda x: cluster(x, t, method))))
        if (method, t) != (LINKAGE, THRESHOLD):
            print(line(f"package: {LINKAGE} at {THRESHOLD:g}", score(r, e, lambda x: cluster(x, THRESHOLD, LINKAGE))))
        print(line("reference: every row alone", score(r, e, lambda x: list(range(len(x))))))
        print(line("reference: one cluster per prompt", score(r, e, lambda x: [0] * len(x))))
        idx = halves[s]
        print(
            "ROC AUC of cosine similarity, same vs different behavior pairs: "
            f"change vectors {distance_auc(r, unit[idx]):.3f}, plain embeddings {distance_auc(r, plain[idx]):.3f}"
        )


if __name__ == "__main__":
    main()
