"""``melbo bench capability``: do learned vectors unlock a skill (METHOD.md section 4)?"""

from __future__ import annotations

from typing import Any

import click

from melbo.capability import Task, run_capability
from melbo.cli.common import given, model_inputs, model_options, open_model
from melbo.core.outputs import claim_folder
from melbo.eval.labels import counts_text
from melbo.methods.registry import STANDALONE_METHODS


@click.command("capability")
@click.option("--model", required=True, help="Hub id, local folder, or .gguf file of a causal language model.")
@click.option("--op", type=click.Choice(["times", "plus", "minus"]), default="times", help="The arithmetic operation.")
@click.option("--digits", default="2,1", help="Digits of a and of b, like 2,1 (a two-digit times a one-digit number).")
@click.option("--method", type=click.Choice(STANDALONE_METHODS), default="melbo", help="The method.")
@click.option("--num-vectors", type=int, default=16, help="Learned vectors (and as many random ones).")
@click.option("--num-train", type=int, default=1, help="Training instances (prompts).")
@click.option("--num-test", type=int, default=30, help="Held-out instances each vector answers.")
@click.option("--radius", default=None, help="R (default: the method's default).")
@click.option("--source-layer", type=int, default=None, help="Block after which vectors are added.")
@click.option("--target-layer", type=int, default=None, help="Block the objective measures.")
@click.option("--steps", type=int, default=None, help="Optimizer steps per vector.")
@click.option("--seed", type=int, default=0, help="Seed of the instances, the starts and the random baseline.")
@click.option("--max-new-tokens", type=int, default=48, help="Tokens per answer.")
@click.option("--out", required=True, type=click.Path(), help="Folder: capability.json, capability.md, the bank.")
@click.option("--overwrite", is_flag=True, help="Replace the results of an earlier `melbo bench capability` in --out.")
@model_options
@click.pass_context
def capability(
    ctx: click.Context,
    model: str,
    op: str,
    digits: str,
    method: str,
    num_train: int,
    num_test: int,
    seed: int,
    max_new_tokens: int,
    out: str,
    overwrite: bool,
    device: str,
    dtype: str,
    blocks_path: str | None,
    gguf_file: str | None,
    **_: Any,
) -> None:
    """Accuracy of each learned vector on held-out arithmetic instances, beside random vectors at the same
    R and the unsteered model (the post's chain-of-thought discovery)."""
    try:
        da, db = (int(x) for x in digits.split(","))
    except ValueError:
        raise click.BadParameter(f"{digits!r}; give the digits of a and b like 2,1", param_hint="--digits") from None
    settings = given(
        ctx,
        num_vectors="num_vectors",
        radius="radius",
        source_layer="source_layer",
        target_layer="target_layer",
        steps="steps",
    )
    settings.setdefault("num_vectors", ctx.params["num_vectors"])
    task = Task(op, da, db).check()
    claim_folder(out, "bench capability", inputs=model_inputs(model), overwrite=overwrite)  # before the model loads
    lm = open_model(model, device, dtype, blocks_path, gguf_file)
    rep = run_capability(
        lm,
        task,
        method,
        num_train,
        num_test,
        seed,
        max_new_tokens,
        out,
        show_progress=True,
        overwrite=overwrite,
        **settings,
    )
    click.echo(f"unsteered accuracy {100 * rep['unsteered']:.0f}% on {num_test} held-out instances")
    learned = sorted(rep["learned"], reverse=True)
    click.echo("learned vectors, best first: " + ", ".join(f"{100 * a:.0f}%" for a in learned))
    click.echo(
        "random vectors, best first:  " + ", ".join(f"{100 * a:.0f}%" for a in sorted(rep["random"], reverse=True))
    )
    jl = rep["judge_labels"]
    click.echo(f"behavior judge: learned {counts_text(jl['learned'])}; random {counts_text(jl['random'])}")
    click.echo(f"results: {out}/capability.md")
