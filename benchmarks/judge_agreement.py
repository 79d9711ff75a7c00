"""Agreement of the behavior judge (melbo.eval.judge) with the hand labels of
``benchmarks/data/judge`` (rows.jsonl, labels.jsonl, GUIDE.md): confusion matrix and Cohen's κ on
the held-out half (the split of GUIDE.md, by a hash of ``id``), the tune half for reference, and
the share of human-``degenerate`` rows the judge calls ``new``. It tunes nothing: the judge's
thresholds are module constants (their choice is recorded in melbo/eval/judge.py).

The unsteered model of each row scores it: gemma-3-270m for gemma rows, the micro model of
``../shared/models`` named in the row's ``model`` for the others.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/judge_agreement.py            # about 4 minutes
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/judge_agreement.py --text-only
    # judge once and keep the features, then re-decide from them (e.g. after changing a threshold):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/judge_agreement.py --dump /tmp/judged.jsonl
    .venv/bin/python benchmarks/judge_agreement.py --from-dump /tmp/judged.jsonl --errors
"""

from __future__ import annotations

import argparse
import json
import os
import time

import melbo
from melbo.cli.demo import shared_model
from melbo.eval.agreement import cohen_kappa, confusion, format_confusion, split_of
from melbo.eval.judge import LABELS, decide, judge, read_rows

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "judge")


def load_set(folder: str) -> list[dict]:
    """The rows of ``folder`` that carry a hand label, each with ``human`` and ``split``."""
    rows = read_rows(os.path.join(folder, "rows.jsonl"), "rows.jsonl")
    labels = {}
    with open(os.path.join(folder, "labels.jsonl"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                labels[r["id"]] = r["label"]
    out = [dict(r, human=labels[r["id"]], split=split_of(r["id"])) for r in rows if r["id"] in labels]
    unknown = {r["human"] for r in out} - set(LABELS)
    if unknown:
        raise SystemExit(f"error: labels {sorted(unknown)} are not among {LABELS}")
    return out


def run_judge(rows: list[dict], text_only: bool, embedder: bool) -> list[dict]:
    """Judge the rows, one model at a time (its unsteered model as ``lm`` unless ``text_only``)."""
    out: dict[str, dict] = {}
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        lm = None
        if not text_only:
            name = model if model == "gemma-3-270m" else shared_model(model)
            lm = melbo.load_model(name, device="cpu")
        t0 = time.perf_counter()
        for r in judge(mine, lm=lm, embedder=None if embedder else False):
            out[r["id"]] = r
        print(f"judged {len(mine)} {model} rows in {time.perf_counter() - t0:.1f} s", flush=True)
    return [out[r["id"]] for r in rows]


def redecide(rows: list[dict]) -> list[dict]:
    """Labels from the features kept in a dump, with the judge's current thresholds."""
    for r in rows:
        s = r["scores"]
        r["label"], new = decide(s["features"], s["distance"], s["distance_measure"])
        r["scores"] = dict(s, **new)
    return rows


def report(rows: list[dict], errors: bool) -> None:
    for split in ("heldout", "tune"):
        mine = [r for r in rows if r["split"] == split]
        m = confusion([r["human"] for r in mine], [r["label"] for r in mine])
        deg = [r for r in mine if r["human"] == "degenerate"]
        to_new = sum(r["label"] == "new" for r in deg)
        agree = sum(r["human"] == r["label"] for r in mine)
        print(f"\n== {split}: {len(mine)} rows, agreement {agree}/{len(mine)}, Cohen's kappa {cohen_kappa(m):.3f}")
        print(format_confusion(m))
        print(f"degenerate labelled new: {to_new}/{len(deg)} = {to_new / max(1, len(deg)):.1%}")
        for model in sorted({r["model"] for r in mine}):
            sub = [r for r in mine if r["model"] == model]
            k = cohen_kappa(confusion([r["human"] for r in sub], [r["label"] for r in sub]))
            print(f"  {model}: {len(sub)} rows, kappa {k:.3f}")
        if errors:
            for r in mine:
                if r["human"] != r["label"]:
                    s = r["scores"]
                    print(
                        f"  {r['id']}: human {r['human']}, judge {r['label']} {s['reasons']} "
                        f"d={s['distance']:.3f} | {r['completion'][:110]!r}"
                    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DATA, help="folder with rows.jsonl and labels.jsonl")
    ap.add_argument("--text-only", action="store_true", help="no model: text and embedding features only")
    ap.add_argument("--no-embedder", action="store_true", help="word-overlap distance instead of embeddings")
    ap.add_argument("--dump", default=None, help="write the judged rows (with features) to this JSONL file")
    ap.add_argument("--from-dump", default=None, help="re-decide the rows of a dump instead of judging")
    ap.add_argument("--errors", action="store_true", help="list every disagreement")
    args = ap.parse_args()
    if args.from_dump:
        with open(args.from_dump, encoding="utf-8") as f:
            rows = redecide([json.loads(line) for line in f if line.strip()])
    else:
        rows = run_judge(load_set(args.data), args.text_only, not args.no_embedder)
        if args.dump:
            with open(args.dump, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    report(rows, args.errors)


if __name__ == "__main__":
    main()
