"""Wall time of the default ``melbo train`` on gemma-3-270m, per phase, and its result.

Runs, in this process and on ``--threads`` CPU threads (OMP_NUM_THREADS and torch's intra-op
threads), the command the README leads with::

    melbo train --model gemma-3-270m --prompt "Q: What is 17 times 3?\\nA:" --out D

and prints the seconds of each phase (model load, radius sweep, training of the 16 vectors,
evaluation = completions + coherence + embeddings, KL, report), the total, the machine load
(``os.getloadavg``) before and after, and the result from ``summary.json``: the R chosen and
the counts of learned / random vectors that changed the completion and that are coherent and
different from the unsteered one.

Phases are timed by wrapping melbo's own functions (so the script times any version of melbo
alike); ``summary.json``'s ``timings`` (when the run writes them) are printed beside.

    .venv/bin/python benchmarks/default_train_speed.py [--threads 2] [--out DIR] [--json FILE] [-- extra train args]
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--prompt", default="Q: What is 17 times 3?\\nA:")
    ap.add_argument("--out", default=None, help="run folder (default: a new temporary folder)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("extra", nargs="*", help="more `melbo train` arguments (after --)")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["MKL_NUM_THREADS"] = str(args.threads)

    import json
    import tempfile
    import time
    from pathlib import Path

    import torch

    torch.set_num_threads(args.threads)
    import melbo.bank
    import melbo.cli
    import melbo.cli.train
    import melbo.run

    marks: dict[str, tuple[float, float]] = {}
    spent: dict[str, list[float]] = {}

    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def timed(owner, name, phase, mark_start=None, mark_end=None):
        fn = getattr(owner, name)

        def wrapper(*a, **k):
            t0 = now()
            if mark_start:
                marks.setdefault(mark_start, t0)
            try:
                return fn(*a, **k)
            finally:
                t1 = now()
                acc = spent.setdefault(phase, [0.0, 0.0])
                acc[0] += t1[0] - t0[0]
                acc[1] += t1[1] - t0[1]
                if mark_end:
                    marks[mark_end] = t1

        setattr(owner, name, wrapper)

    cli_train, run = sys.modules["melbo.cli.train"], sys.modules["melbo.run"]  # (names shadowed by functions)
    timed(cli_train, "open_model", "model load")
    timed(run, "sweep_radius", "radius sweep", mark_end="sweep_end")
    timed(run, "write_sweep", "sweep files")
    timed(run, "evaluate_bank", "evaluation (completions, coherence, embeddings)", mark_start="eval_start")
    timed(melbo.bank.Bank, "kl", "KL")
    timed(run, "_kl_and_report", "report (with KL)")

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="melbo-speed-")) / "run"
    argv = ["train", "--model", args.model, "--prompt", args.prompt, "--out", str(out), *args.extra]
    load0 = os.getloadavg()
    t0 = now()
    try:
        melbo.cli.cli.main(argv, standalone_mode=False)
    finally:
        t1 = now()
    load1 = os.getloadavg()

    def phase_table(i: int) -> dict[str, float]:
        """Seconds per phase: ``i`` = 0 wall time, 1 CPU time of this process (all threads)."""

        def get(name: str) -> float:
            return spent.get(name, [0.0, 0.0])[i]

        total = t1[i] - t0[i]
        out = {"model load": get("model load"), "radius sweep": get("radius sweep")}
        start = marks.get("sweep_end", (t0[0] + out["model load"], t0[1] + out["model load"]))[i]
        eval_start = marks.get("eval_start", (start, start))[i]
        out["training (16 vectors, random baseline)"] = eval_start - start - get("sweep files")
        out["evaluation (completions, coherence, embeddings)"] = get("evaluation (completions, coherence, embeddings)")
        out["KL"] = get("KL")
        out["report (files, plots)"] = get("report (with KL)") - out["KL"] + get("sweep files")
        out["other (CLI, checks, printing)"] = total - sum(out.values())
        out["total"] = total
        return out

    wall, cpu = phase_table(0), phase_table(1)

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    L, R = summary["learned"], summary["random"]
    n = L.get("n", 0)

    def count(x: dict, key: str) -> str:
        v = x.get(key)
        return "-" if v is None else f"{round(v * x.get('n', 0))}/{x.get('n', 0)}"

    result = {
        "radius": summary.get("radius"),
        "relative": (summary.get("radius_sweep") or {}).get("chosen", {}).get("relative"),
        "learned_changed": f"{L.get('changed_train')}/{n}",
        "learned_coherent": count(L, "coherent_train"),
        "learned_coherent_and_different": count(L, "coherent_and_different_train"),
        "random_changed": f"{R.get('changed_train')}/{R.get('n', 0)}",
        "random_coherent": count(R, "coherent_train"),
        "random_coherent_and_different": count(R, "coherent_and_different_train"),
        "sweep_radii": len((summary.get("radius_sweep") or {}).get("rows", [])),
    }
    print(f"\nmelbo {' '.join(argv)}  ({args.threads} threads)")
    print(f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after {load1[0]:.2f} {load1[1]:.2f}")
    print("| phase | wall s | CPU s (all threads) |\n|---|---|---|")
    for k, v in wall.items():
        print(f"| {k} | {v:.1f} | {cpu[k]:.1f} |")
    if summary.get("timings"):
        print("summary.json timings:", json.dumps({k: round(v, 1) for k, v in summary["timings"].items()}))
    print("result:", json.dumps(result))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "argv": argv,
                    "threads": args.threads,
                    "loadavg_before": load0,
                    "loadavg_after": load1,
                    "wall_seconds": wall,
                    "cpu_seconds": cpu,
                    "result": result,
                    "summary_timings": summary.get("timings"),
                    "sweep_rows": [
                        {k: r[k] for k in ("relative", "score", "seconds")}
                        for r in (summary.get("radius_sweep") or {}).get("rows", [])
                    ],
                },
                indent=1,
            ),
            encoding="utf-8",
        )


if __name__ == "__main__":
    sys.exit(main())
