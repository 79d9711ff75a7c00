"""``melbo sweep``: many settings of ``melbo train`` as Ray tasks (or in-process), one table."""

from __future__ import annotations

import click

from melbo.cli.common import given, prompt_options, read_prompts
from melbo.sweep import run_sweep, sweep_markdown


@click.command()
@click.option("--model", required=True, help="Hub id, local folder or .gguf file (each task loads it).")
@click.option(
    "--grid",
    required=True,
    help="Settings, e.g. prompts=Once upon a time|The cat,radius=0.1x,0.2x,source-layer=1,2,method=melbo,dct "
    "(cartesian product; | separates the prompts of one prompt set).",
)
@prompt_options
@click.option("--num-vectors", type=int, default=4, help="Vectors per setting (unless the grid sweeps it).")
@click.option("--steps", type=int, default=None, help="Optimizer steps per vector (melbo, adapter).")
@click.option("--max-new-tokens", type=int, default=32, help="Tokens per completion in each setting's summary.")
@click.option("--out", required=True, type=click.Path(), help="Sweep folder (rerun the same command to resume).")
@click.option("--ray-address", default=None, help="A running Ray cluster (default: start a local one).")
@click.option("--local", is_flag=True, help="Run the settings one after the other in this process, without Ray.")
@click.option("--device", default="cpu", help="Device of in-process settings (Ray tasks use a GPU where there is one).")
@click.pass_context
def sweep(
    ctx: click.Context,
    model: str,
    grid: str,
    prompt: tuple[str, ...],
    prompts_file: str | None,
    num_vectors: int,
    steps: int | None,
    max_new_tokens: int,
    out: str,
    ray_address: str | None,
    local: bool,
    device: str,
) -> None:
    """Train every setting of a grid (prompts x R x layers x methods ...), each as one Ray task with one
    GPU (one CPU without GPUs) and retried if its worker dies, into OUT/NN/; then one table, OUT/sweep.md."""
    base = {"num_vectors": num_vectors, **given(ctx, steps="steps")}
    rows = run_sweep(
        model,
        grid,
        out,
        read_prompts(prompt, prompts_file) or None,
        base,
        max_new_tokens,
        device,
        ray_address,
        local,
        echo=click.echo,
    )
    click.echo(sweep_markdown(rows, model))
    click.echo(f"results: {out}/sweep.md, {out}/sweep.json")
