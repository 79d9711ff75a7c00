"""``melbo judge``: label steered completions degenerate, new or unchanged (:mod:`melbo.eval.judge`)."""

from __future__ import annotations

from collections import Counter

import click

from melbo.cli.common import model_options, open_model
from melbo.core.errors import MelboError
from melbo.core.io import write_jsonl
from melbo.core.outputs import check_output_file
from melbo.eval.judge import LABELS, judge, read_rows


@click.command("judge")
@click.option(
    "--input", "input_path", required=True, type=click.Path(), help="JSONL rows: prompt, unsteered, completion."
)
@click.option("--out", required=True, type=click.Path(), help="JSONL file to write: each row with label and scores.")
@click.option(
    "--model",
    default=None,
    help="The unsteered model (its tokens and log-probabilities); without it, text and embedding features only.",
)
@click.option("--embedder", default=None, help="Sentence-embedding model (default: the offline all-MiniLM-L6-v2).")
@click.option("--chat", is_flag=True, help="The prompts were wrapped in the tokenizer's chat template.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (never the --input file).")
@model_options
def judge_command(
    input_path: str,
    out: str,
    model: str | None,
    embedder: str | None,
    chat: bool,
    overwrite: bool,
    gguf_file: str | None,
    device: str,
    dtype: str,
    blocks_path: str | None,
) -> None:
    """Label each steered completion of --input degenerate (loops, gibberish, mixed-script soup, empty),
    new (fluent, different content or style) or unchanged (the unsteered content, re-phrased or not),
    with a score for each label and the features behind them. Other fields of the rows are kept."""
    check_output_file(out, "--out", inputs=[("the rows (--input)", input_path)], overwrite=overwrite)
    rows = read_rows(input_path)
    if not rows:  # an empty file would give an empty --out and exit code 0, as if it had been judged
        raise MelboError(f"--input {input_path!r} holds no rows; give JSONL rows with prompt, unsteered, completion")
    lm = open_model(model, device, dtype, blocks_path, gguf_file) if model else None
    labelled = judge(rows, lm, embedder, chat)
    write_jsonl(out, labelled)
    counts = Counter(r["label"] for r in labelled)
    measure = labelled[0]["scores"]["distance_measure"] if labelled else "embedding"
    click.echo(
        f"{len(labelled)} rows: "
        + ", ".join(f"{counts[k]} {k}" for k in LABELS)
        + f" ({'text and log-probability' if lm else 'text'} features, {measure} distance)"
    )
    click.echo(f"labels: {out}")
