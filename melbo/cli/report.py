"""``melbo report RUN_DIR``: the self-contained HTML page of a run or benchmark folder."""

from __future__ import annotations

import click

from melbo.report.html import write_html_report


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", default=None, type=click.Path(), help="The HTML file to write (default: RUN_DIR/report.html).")
def report(run_dir: str, out: str | None) -> None:
    """Write one self-contained HTML page for RUN_DIR (a melbo run or benchmark folder): every
    perturbation's completions beside the unsteered model and a random vector at the same R,
    objective, cos(start, end), KL, generalization, groups of vectors that say the same thing, the
    R sweep and benchmark tables. Opens from disk in any browser; no server, no network."""
    path = write_html_report(run_dir, out)
    click.echo(f"wrote {path}")
