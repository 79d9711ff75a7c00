"""``melbo sweep``: many settings of ``melbo train`` as Ray tasks (or in-process), one table."""

from __future__ import annotations

import click

from melbo.cli.common import check_rows, given, model_inputs, prompt_options, read_prompts
from melbo.core.errors import MelboError
from melbo.core.model_files import check_model_folder
from melbo.core.outputs import claim_folder
from melbo.sweep import read_grid, run_sweep, sweep_markdown


@click.command()
@click.option("--model", required=True, help="Hub id, local folder or .gguf file (each task loads it).")
@click.option(
    "--grid",
    default=None,
    help="Settings, e.g. prompts=Once upon a time|The cat,radius=0.1x,0.2x,source-layer=1,2,method=melbo,dct "
    "(cartesian product; | separates the prompts of one prompt set; a prompt with commas in double quotes: "
    'prompts="Hello, world"|The cat).',
)
@click.option(
    "--grid-file",
    type=click.Path(),
    default=None,
    help='The grid as a JSON or TOML file instead: {"prompts": [["Hello, world", "The cat"]], '
    '"radius": ["0.1x", "0.2x"], "source-layer": [1, 2]}.',
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
    grid: str | None,
    grid_file: str | None,
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
    GPU (one CPU without GPUs) and retried if its worker dies, into OUT/NN/; then one table, OUT/sweep.md.
    Exit code 2 when any setting failed (the table still holds the others)."""
    if (grid is None) == (grid_file is None):
        raise MelboError("give exactly one of --grid (inline) and --grid-file (JSON or TOML)")
    check_model_folder(model)  # custom code, broken weights: refused before the sweep folder is written
    inputs = [*model_inputs(model, prompts_file), ("the grid file (--grid-file)", grid_file)]
    claim_folder(out, "sweep", inputs=inputs)  # new, empty or a sweep's (rerun to resume); never over an input
    base = {"num_vectors": num_vectors, **given(ctx, steps="steps")}
    rows = run_sweep(
        model,
        grid if grid is not None else read_grid(str(grid_file)),
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
    check_rows(rows, f"{out}/sweep.md")
