"""``melbo train``, ``melbo ortho`` and ``melbo calibrate``: thin layers over :func:`melbo.train`,
:func:`melbo.ortho` and :func:`melbo.calibrate`."""

from __future__ import annotations

from typing import Any

import click

from melbo.api import calibrate as calibrate_api
from melbo.bank import Bank
from melbo.cli.common import (
    generation_config,
    generation_options,
    given,
    model_inputs,
    model_options,
    open_model,
    print_run,
    prompt_options,
    read_prompts,
)
from melbo.core.errors import MelboError
from melbo.core.io import write_json
from melbo.core.outputs import bank_file, check_output_file
from melbo.core.prompts import check_prompts
from melbo.defaults import describe
from melbo.eval.control_stats import controls_markdown
from melbo.eval.controls import CONTROLS, parse_controls
from melbo.methods.calibrate import CalibrationError, format_curve
from melbo.methods.registry import STANDALONE_METHODS, get_method
from melbo.report.summary import sweep_table
from melbo.run import RunFolder
from melbo.run import train as train_api
from melbo.vector import SteeringVector

# CLI parameter -> setting name (only those the user sets are passed; the rest take DEFAULTS).
TRAIN_SETTINGS = {
    "source_layer": "source_layer",
    "target_layer": "target_layer",
    "radius": "radius",
    "p": "p",
    "q": "q",
    "positions": "positions",
    "num_vectors": "num_vectors",
    "steps": "steps",
    "lr": "lr",
    "seed": "seed",
    "writes_only": "writes_only",
    "lam": "lam",
    "factors": "factors",
    "iterations": "iterations",
    "dct_sigma": "sigma",
    "dct_init": "init",
    "orthogonalize": "orthogonalize",
    "beta": "beta",
    "rank": "rank",
    "mlp_module": "mlp_module",
    "adapter_batch": "batch",
    "ortho_weight": "ortho",
    "chat": "chat",
    "batch_vectors": "batch_vectors",
    "effect_penalty": "effect_penalty",
    "memory_gb": "memory_gb",
}
EPILOG = "\b\nDefaults per method (melbo.defaults):\n" + "\n".join(
    f"\b\n[{m}]\n" + "\n".join("  " + line for line in describe(m).splitlines()) for m in STANDALONE_METHODS
)


@click.command(epilog=EPILOG)
@click.option("--model", required=True, help="Hub id, local folder, or .gguf file of a causal language model.")
@prompt_options
@click.option(
    "--method",
    type=click.Choice(STANDALONE_METHODS),
    default="melbo",
    help="melbo: steering vectors one by one (METHOD.md section 1); dct: deep causal transcoding, all factors "
    "at once (section 5); adapter: rank-r steering adapters on the source block's MLP output (section 2); "
    "rank1: a population of rank-1 adapters trained at once, soft orthogonalized (CPE-style).",
)
@click.option("--source-layer", type=int, help="Block after which the vector is added (negative counts from the end).")
@click.option("--target-layer", type=int, help="Block whose output the objective measures.")
@click.option(
    "--radius",
    help="R: a number, kx (k x the median residual norm at the source over the counted "
    "positions), calibrate (METHOD.md section 5) or auto (diversity sweep).",
)
@click.option("--p", "p", type=float, help="Power on each position's distance ‖Z(θ)−Z(0)‖.")
@click.option("--q", "q", type=float, help="Each prompt's sum over positions is raised to 1/q.")
@click.option("--positions", help="Token positions that count: all, last:K, or indices like 0,3,-1.")
@click.option("--num-vectors", type=int, help="Vectors (adapters; DCT: top factors evaluated).")
@click.option("--steps", type=int, help="Optimizer steps per vector (melbo, adapter).")
@click.option("--lr", type=float, help="Learning rate (default scales with R).")
@click.option("--seed", type=int, help="Seed of the random starts and the random baseline.")
@click.option("--writes-only/--keep-residual", default=None, help="Measure only what the blocks write, Z(θ) − θ.")
@click.option("--lambda", "lam", type=float, help="Target nonlinearity ratio λ of --radius calibrate.")
@click.option("--factors", type=int, help="DCT: number of factors m.")
@click.option("--iterations", type=int, help="DCT: orthogonalized gradient iterations τ.")
@click.option("--dct-sigma", type=click.Choice(["exp", "linear", "quadratic"]), help="DCT: activation σ.")
@click.option("--dct-init", type=click.Choice(["jacobian", "svd", "random"]), help="DCT: initialization of V.")
@click.option(
    "--orthogonalize",
    type=click.Choice(["symmetric", "qr", "soft", "none"]),
    help="MELBO: within a block of vectors, symmetric, qr or none; DCT: qr or soft (of V).",
)
@click.option("--batch-vectors", type=int, help="MELBO: vectors trained at once (1: one after another, METHOD.md).")
@click.option("--effect-penalty", type=float, help="MELBO: weight of the soft orthogonality of the effects δ.")
@click.option("--memory-gb", type=float, help="MELBO: activation memory budget of a step (default: 4 on a CPU).")
@click.option("--beta", type=float, help="DCT: damping β in (0, 1].")
@click.option("--rank", type=int, help="Adapter rank r.")
@click.option("--mlp-module", help="Adapter: dotted path of the MLP output projection inside a block.")
@click.option("--adapter-batch", type=int, help="Adapters trained at once (rank1: factors per forward chunk).")
@click.option("--ortho-weight", type=float, help="rank1: λ of the soft orthogonality of the factors.")
@click.option(
    "--out", required=True, type=click.Path(), help="Run folder: bank.safetensors, completions.jsonl, summary.md."
)
@click.option("--resume", is_flag=True, help="Continue the run in --out without redoing finished vectors.")
@click.option("--overwrite", is_flag=True, help="Start over the earlier run in --out (its files only are replaced).")
@click.option("--heldout-prompt", multiple=True, help="A prompt to generate on but not train on (repeatable).")
@click.option(
    "--controls",
    default=None,
    is_flag=False,
    flag_value="cheap",
    help="Negative controls at a matched budget beside the learned perturbations: cheap (also --controls alone: "
    "random vectors or random adapters, temperature 1.0 and 1.5), all (adds activation-noise and weight-noise) "
    f"or a comma list of {', '.join(CONTROLS)}. Writes controls.jsonl and a learned-vs-controls table (hits, "
    "one-sided Fisher p) in summary.md. Default: none.",
)
@generation_options
@model_options
@click.pass_context
def train(
    ctx: click.Context,
    model: str,
    prompt: tuple[str, ...],
    prompts_file: str | None,
    method: str,
    out: str,
    resume: bool,
    overwrite: bool,
    heldout_prompt: tuple[str, ...],
    controls: str | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    chat: bool,
    device: str,
    dtype: str,
    blocks_path: str | None,
    gguf_file: str | None,
    **_: Any,
) -> None:
    """Train unsupervised steering vectors (or adapters, or a deep causal transcoder) beside a random
    baseline at the same R, and write a run folder with completions and a summary."""
    settings = given(ctx, **TRAIN_SETTINGS)
    prompts = check_prompts(read_prompts(prompt, prompts_file))
    seed = settings.get("seed", 0)
    gen = generation_config(max_new_tokens, temperature, top_p, chat, seed)
    if controls is not None:  # bad names fail before any work
        parse_controls(controls).for_kind(get_method(method).kind)
    RunFolder(out, resume, overwrite, model_inputs(model, prompts_file))  # checks --out before the model loads
    lm = open_model(model, device, dtype, blocks_path, gguf_file)
    bank = train_api(
        lm,
        prompts,
        method,
        out=out,
        resume=resume,
        overwrite=overwrite,
        heldout=list(heldout_prompt),
        generation=gen,
        controls=controls,
        **settings,
    )
    if bank.meta.get("radius_sweep"):
        click.echo(sweep_table(bank.meta["radius_sweep"]))
    print_run(bank)
    if bank.evaluation and bank.evaluation.get("controls"):
        click.echo("\n".join(controls_markdown(bank.evaluation["controls"])[2:]))


@click.command()
@click.option("--bank", default=None, type=click.Path(), help="Run folder or bank file holding θ₀.")
@click.option("--vector", "vector_index", type=int, default=0, help="Row of θ₀ in --bank.")
@click.option("--vector-file", default=None, type=click.Path(), help="θ₀ from a steering-vector file (melbo export).")
@prompt_options
@click.option("--num-vectors", type=int, help="New orthogonal vectors to find (at most).")
@click.option("--steps", type=int, help="Adam steps per vector.")
@click.option("--lr", type=float, help="Adam learning rate.")
@click.option("--min-norm", type=float, help="Stop when a new vector's norm falls below this (0: never).")
@click.option("--positions", help="Positions averaged in mean_t h_tgt: all, last:K, or indices.")
@click.option("--source-layer", type=int, help="Block after which θ is added (default: θ₀'s).")
@click.option("--target-layer", type=int, help="Target block (default: θ₀'s).")
@click.option("--model", default=None, help="Model (default: the one θ₀ was made for).")
@click.option("--out", required=True, type=click.Path(), help="Run folder (bank row 0 = θ₀, measures.csv, plots).")
@click.option("--resume", is_flag=True, help="Continue the run in --out.")
@click.option("--overwrite", is_flag=True, help="Start over the earlier run in --out (its files only are replaced).")
@click.option("--max-new-tokens", type=int, default=48, help="Tokens per completion in the summary.")
@click.option("--chat", is_flag=True, help="Wrap prompts in the tokenizer's chat template.")
@model_options
@click.pass_context
def ortho(
    ctx: click.Context,
    bank: str | None,
    vector_index: int,
    vector_file: str | None,
    prompt: tuple[str, ...],
    prompts_file: str | None,
    model: str | None,
    out: str,
    resume: bool,
    overwrite: bool,
    max_new_tokens: int,
    chat: bool,
    device: str,
    dtype: str,
    blocks_path: str | None,
    gguf_file: str | None,
    **_: Any,
) -> None:
    """MELBO-ortho (METHOD.md section 3): vectors each orthogonal to θ₀ and all earlier ones, minimizing
    ‖mean_t h_tgt(θ_k) − mean_t h_tgt(θ₀)‖₂; then KL and norm curves (measures.csv, kl.png, norms.png)."""
    if (bank is None) == (vector_file is None):
        raise MelboError("give exactly one of --bank and --vector-file for the base vector θ₀")
    settings = given(
        ctx,
        num_vectors="num_vectors",
        steps="steps",
        lr="lr",
        min_norm="min_norm",
        positions="positions",
        source_layer="source_layer",
        target_layer="target_layer",
    )
    inputs = [("the bank (--bank)", bank_file(bank)), ("the vector file (--vector-file)", vector_file)]
    RunFolder(out, resume, overwrite, [*inputs, *model_inputs(model, prompts_file)])  # before the model loads
    src_bank = Bank.load(bank) if bank is not None else None
    base = src_bank[vector_index] if src_bank is not None else SteeringVector.load(str(vector_file))
    if not isinstance(base, SteeringVector):
        raise MelboError("MELBO-ortho starts from a steering vector; the bank holds adapters")
    prompts = read_prompts(prompt, prompts_file, strict=True) or list(
        (src_bank.meta if src_bank else {}).get("prompts", [])
    )
    lm = open_model(model or base.model, device, dtype, blocks_path, gguf_file, src_bank)
    gen = generation_config(max_new_tokens, 0.0, 1.0, chat)
    result = train_api(
        lm,
        check_prompts(prompts),
        "ortho",
        base=base,
        out=out,
        resume=resume,
        overwrite=overwrite,
        generation=gen,
        chat=chat,
        **settings,
    )
    m = result.meta
    click.echo(
        f"MELBO-ortho: {len(result) - 1} vectors orthogonal to θ₀ (norm {base.norm:.4g}), stop: "
        f"{m.get('stop_reason')}; max |cos| {m.get('max_abs_cosine', 0):.1e}"
    )
    print_run(result)


@click.command()
@click.option("--model", required=True, help="Hub id, local folder, or .gguf file of a causal language model.")
@prompt_options
@click.option("--source-layer", type=int, default=None, help="Block after which θ is added (default as in train).")
@click.option("--target-layer", type=int, default=None, help="Block whose output Δ measures (default as in train).")
@click.option("--positions", default="last:3", help="Token positions Δ averages over: all, last:K, or indices.")
@click.option("--lambda", "lam", type=float, default=0.5, help="Target nonlinearity ratio λ.")
@click.option("--directions", type=int, default=30, help="Random unit directions.")
@click.option("--bracket", default="0.001,100", help="Search interval lo,hi for R (residual-stream units).")
@click.option("--writes-only", is_flag=True, help="Measure only what the blocks write (Δ(θ) − θ).")
@click.option("--seed", type=int, default=0, help="Seed of the random directions.")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Also write the result (and curve) here.")
@click.option("--overwrite", is_flag=True, help="Replace the --json file if it exists.")
@click.option("--chat", is_flag=True, help="Wrap prompts in the tokenizer's chat template (when it has one).")
@model_options
def calibrate(
    model: str,
    prompt: tuple[str, ...],
    prompts_file: str | None,
    source_layer: int | None,
    target_layer: int | None,
    positions: str,
    lam: float,
    directions: int,
    bracket: str,
    writes_only: bool,
    seed: int,
    json_path: str | None,
    overwrite: bool,
    chat: bool,
    device: str,
    dtype: str,
    blocks_path: str | None,
    gguf_file: str | None,
) -> None:
    """Calibrate the radius R (METHOD.md section 5): solve sqrt(Σ‖Δ(r v) − r J v‖² / Σ‖r J v‖²) = λ for r
    with Brent's method over random unit directions v. No root in the bracket is an error (exit 2)."""
    prompts = check_prompts(read_prompts(prompt, prompts_file))
    try:
        lo_hi = tuple(float(x) for x in bracket.split(","))
    except ValueError:
        raise MelboError(f"bad --bracket {bracket!r}; give lo,hi like 0.001,100") from None
    if len(lo_hi) != 2:
        raise MelboError(f"bad --bracket {bracket!r}; give lo,hi like 0.001,100")
    if json_path:
        check_output_file(json_path, "--json", inputs=model_inputs(model, prompts_file), overwrite=overwrite)
    lm = open_model(model, device, dtype, blocks_path, gguf_file)
    try:
        cal = calibrate_api(
            lm,
            prompts,
            source_layer,
            target_layer,
            positions,
            lam,
            directions,
            (lo_hi[0], lo_hi[1]),
            writes_only,
            seed,
            chat,
        )
    except CalibrationError as e:
        click.echo("no calibrated R; ratio curve:", err=True)
        click.echo(format_curve(e.curve, lam), err=True)
        raise
    click.echo(
        f"R = {cal.radius:.6g} (λ = {lam:g}, ratio {cal.ratio:.4g}; {directions} directions; positions "
        f"{positions}; {'writes only' if writes_only else 'residual path kept'}; {cal.seconds:.2f} s)"
    )
    click.echo(format_curve(cal.curve, lam, cal.radius))
    if json_path:
        write_json(json_path, {**cal.to_dict(), "model": model, "prompts": prompts, "positions": positions})
