"""Render a run's ``report.html`` in headless Chromium, check its DOM and take a screenshot.

Opt-in (needs the Debian package ``chromium`` and ``pip install playwright``; no browser download:
Playwright drives the system Chromium). Builds a 64-vector run on stories260k unless given one:

    apt-get install -y chromium && .venv/bin/pip install playwright
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/report_browser_check.py --out /tmp/report-check

Checks: a card per evaluated vector (as many as the run's completions hold), no console errors and
no page errors, the page loads nothing from the network, sorting by objective puts the cards in
descending objective order, the text filter and the group filter update the "N of M shown" count
and hide exactly the non-matching cards. Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def build_run(out: Path, model: str, n: int) -> Path:
    import melbo

    run = out / "run"
    if not (run / "report.html").is_file():
        lm = melbo.load_model(model, device="cpu", dtype="float32")
        melbo.train(
            lm,
            ["Once upon a time, there was a little girl named Lily.", "The dog ran to the park and saw a"],
            out=run,
            method="dct",
            num_vectors=n,
            heldout=["Tom had a red ball."],
        )
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="a run folder with report.html (default: build one)")
    ap.add_argument("--out", default="/tmp/report-check", help="folder for the built run and the screenshot")
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "stories260k"))
    ap.add_argument("--num-vectors", type=int, default=64)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Path(args.run) if args.run else build_run(out, args.model, args.num_vectors)
    page_file = run / "report.html"
    rows = [json.loads(x) for x in (run / "completions.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    evaluated = sorted({r["vector"] for r in rows if r["kind"] == "learned"})
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
        if not ok:
            failures.append(what)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1800})
        console, errors, requests = [], [], []
        page.on("console", lambda m: console.append(m) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
        page.goto(page_file.resolve().as_uri())
        page.wait_for_load_state("load")
        cards = page.locator("#cards .card")
        check(cards.count() == len(evaluated), f"{cards.count()} cards for {len(evaluated)} evaluated vectors")
        idx = [int(x) for x in page.eval_on_selector_all("#cards .card", "cs => cs.map(c => c.dataset.index)")]
        check(idx == evaluated, "one card per evaluated vector, in index order")
        check(not console, f"no console errors ({[m.text for m in console][:3]})")
        check(not errors, f"no page errors ({errors[:3]})")
        check(not requests, f"no network requests ({requests[:3]})")
        check(page.locator("img").count() >= 1, f"{page.locator('img').count()} inline plots")
        shown = page.inner_text("#shown")
        check(shown == f"{len(evaluated)} of {len(evaluated)} shown", f"counter reads {shown!r}")
        page.screenshot(path=str(out / "report-top.png"))
        page.select_option("#sort", "objective")
        objs = [float(x) for x in page.eval_on_selector_all("#cards .card", "cs => cs.map(c => c.dataset.objective)")]
        check(objs == sorted(objs, reverse=True), f"sort by objective: descending ({objs[:3]} ...)")
        first = page.locator("#cards .card").first
        word = first.locator("td.steered").first.inner_text().split()[:1]
        if word:
            q = word[0].lower()
            page.fill("#filter", q)
            vis = page.eval_on_selector_all("#cards .card:not(.hidden)", "cs => cs.length")
            want = sum(
                q in " ".join(r["completion"] for r in rows if r["kind"] == "learned" and r["vector"] == v).lower()
                for v in evaluated
            )
            check(vis == want, f"filter {q!r}: {vis} cards shown, {want} expected from completions.jsonl")
            check(page.inner_text("#shown") == f"{vis} of {len(evaluated)} shown", "counter follows the filter")
            page.fill("#filter", "")
        page.select_option("#group", "0")
        vis = page.eval_on_selector_all("#cards .card:not(.hidden)", "cs => cs.map(c => c.dataset.cluster)")
        check(bool(vis) and set(vis) == {"0"}, f"group 0 filter: {len(vis)} cards, all in group 0")
        page.select_option("#group", "")
        page.select_option("#sort", "index")
        page.screenshot(path=str(out / "report-full.png"), full_page=False)
        page.evaluate("document.getElementById('cards').scrollIntoView()")
        page.screenshot(path=str(out / "report-cards.png"))
        browser.close()
    print(f"screenshots: {out}/report-top.png, {out}/report-cards.png")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
