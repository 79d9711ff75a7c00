"""``melbo report RUN_DIR``: the self-contained HTML page of a run or benchmark folder."""

from __future__ import annotations

from pathlib import Path

import click

from melbo.core.outputs import check_output_file
from melbo.report.html import REPORT, report_inputs, write_html_report


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", default=None, type=click.Path(), help="The HTML file to write (default: RUN_DIR/report.html).")
@click.option("--overwrite", is_flag=True, help="Replace the --out file if it exists (never one the report reads).")
def report(run_dir: str, out: str | None, overwrite: bool) -> None:
    """Write one self-contained HTML page for RUN_DIR (a melbo run or benchmark folder): every
    perturbation's completions beside the unsteered model and a random vector at the same R,
    objective, cos(start, end), KL, generalization, groups of vectors that say the same thing, the
    R sweep and benchmark tables. Opens from disk in any browser; no server, no network."""
    if out is not None:
        own = Path(out).resolve() == (Path(run_dir) / REPORT).resolve()  # the folder's own page: rewritten
        check_output_file(out, "--out", inputs=report_inputs(run_dir), overwrite=overwrite or own)
    path = write_html_report(run_dir, out)
    click.echo(f"wrote {path}")
