"""``melbo detect`` (score inputs with a bank) and ``melbo bench detect`` (AUROC on a planted model)."""

from __future__ import annotations

import click

from melbo.cli.common import load_bank, model_inputs, model_options, open_model, read_prompts
from melbo.core.errors import MelboError
from melbo.core.io import write_jsonl
from melbo.core.outputs import bank_file, check_output_file, claim_folder
from melbo.detect import POSITIONS, WHERE, check_fpr
from melbo.detect import detect as run_detect
from melbo.planted.bench_config import setting_from_options
from melbo.planted.detect_bench import run_detect_bench
from melbo.planted.fixtures import load_planted_lm
from melbo.planted.plant import SPEC_FILE

SCORE_HELP = (
    "Score: the largest shift of the input's activation from the clean mean along a bank direction, in units "
    "of the clean prompts' spread along it (target layer: the shift each vector causes there; source layer: "
    "the vector itself)."
)

where_option = click.option(
    "--layer", "where", type=click.Choice(WHERE), default="target", help="Where activations are compared."
)
positions_option = click.option(
    "--positions", type=click.Choice(POSITIONS), default="last", help="Each prompt's last token, or the mean."
)
fpr_option = click.option(
    "--fpr", type=float, default=0.05, help="Share of clean reference prompts above the flagging threshold."
)


@click.command(epilog=SCORE_HELP)
@click.option("--bank", required=True, type=click.Path(), help="A run folder or bank.safetensors (steering vectors).")
@click.option("--prompt", multiple=True, help="An input to score (repeatable; \\n in it is a newline).")
@click.option("--prompts-file", type=click.Path(), default=None, help="UTF-8 file of inputs, one per line.")
@click.option("--reference-file", required=True, type=click.Path(), help="UTF-8 file of clean prompts (>= 3).")
@where_option
@positions_option
@fpr_option
@click.option("--random", "use_random", is_flag=True, help="Score with the bank's random baseline vectors instead.")
@click.option("--out", default=None, type=click.Path(), help="Write the scores as JSONL here (one row per input).")
@click.option("--overwrite", is_flag=True, help="Replace the --out file if it exists (never an input).")
@click.option("--model", default=None, help="Model (default: the one in the bank's metadata).")
@model_options
def detect(
    bank: str,
    prompt: tuple[str, ...],
    prompts_file: str | None,
    reference_file: str,
    where: str,
    positions: str,
    fpr: float,
    use_random: bool,
    out: str | None,
    overwrite: bool,
    model: str | None,
    gguf_file: str | None,
    device: str,
    dtype: str,
    blocks_path: str | None,
) -> None:
    """Flag inputs whose activations look like one of a bank's perturbations is active (the MELBO
    post's auditing proposal): the score, the bank vector it follows, and the distance baseline."""
    prompts = read_prompts(prompt, prompts_file)
    if not prompts:
        raise MelboError("no inputs to score: give --prompt or --prompts-file")
    reference = read_prompts((), reference_file)
    check_fpr(fpr, "--fpr")
    if out:
        inputs = [
            ("the bank (--bank)", bank_file(bank)),
            ("the reference file (--reference-file)", reference_file),
            *model_inputs(model, prompts_file),
        ]
        check_output_file(out, "--out", inputs=inputs, overwrite=overwrite)
    b, use = load_bank(bank, use_random, "melbo detect")
    use.lm = open_model(model, device, dtype, blocks_path, gguf_file, b)
    result = run_detect(use, prompts, reference, where, positions, fpr)
    n_ref = len(reference)
    click.echo(f"threshold {result['threshold']:.3f} ({100 * fpr:g}% of {n_ref} clean reference prompts above)")
    click.echo(f"{'score':>8} {'vector':>6} {'baseline':>9}  flag  input")
    for r in result["rows"]:
        flag = "FLAG" if r["flagged"] else "    "
        click.echo(f"{r['score']:8.3f} {r['vector']:6d} {r['baseline']:9.3f}  {flag}  {r['prompt']!r}")
    if out:
        write_jsonl(out, result["rows"])
        click.echo(f"scores: {out}")


@click.command("detect", epilog=SCORE_HELP)
@click.option("--model", required=True, type=click.Path(), help="A planted model folder (written by melbo plant).")
@click.option("--spec", "spec_path", type=click.Path(), default=None, help="Its spec (default: plant_spec.json).")
@click.option("--method", type=click.Choice(["melbo", "dct"]), default="dct", help="How the bank is trained.")
@click.option("--num-vectors", type=int, default=32, help="Learned vectors N (and as many random ones).")
@click.option("--num-prompts", type=int, default=1, help="Clean training prompts of the bank.")
@click.option("--num-reference", type=int, default=32, help="Clean reference prompts of the detector.")
@click.option("--num-test", type=int, default=30, help="Clean test prompts, and triggered ones per backdoor.")
@click.option("--radius", default=None, help="R: a number, kx (median residual norm). Default: per task and method.")
@click.option("--source-layer", type=int, default=None, help="Block after which vectors are added.")
@click.option("--target-layer", type=int, default=None, help="Block the objective measures.")
@click.option("--steps", type=int, default=None, help="Optimizer steps per vector (melbo).")
@click.option("--seed", type=int, default=None, help="Seed of the random starts and of the random baseline.")
@positions_option
@fpr_option
@click.option("--out", required=True, type=click.Path(), help="Folder for detect.json and detect.md.")
@click.option("--overwrite", is_flag=True, help="Replace the results of an earlier `melbo bench detect` in --out.")
@click.option("--device", default="cpu", help="cpu, cuda, cuda:N.")
def bench_detect(
    model: str,
    spec_path: str | None,
    method: str,
    num_vectors: int,
    num_prompts: int,
    num_reference: int,
    num_test: int,
    radius: str | None,
    source_layer: int | None,
    target_layer: int | None,
    steps: int | None,
    seed: int | None,
    positions: str,
    fpr: float,
    out: str,
    overwrite: bool,
    device: str,
) -> None:
    """AUROC of triggered vs clean prompts of a planted model for a bank trained on clean prompts only,
    against a random bank at the same R and the distance-from-the-clean-mean baseline."""
    inputs = [("the planted model (--model)", model), ("the spec (--spec)", spec_path)]
    claim_folder(out, "bench detect", inputs=inputs, overwrite=overwrite)  # before the model loads
    check_fpr(fpr, "--fpr")
    lm, spec = load_planted_lm(model, spec_path, device)
    if spec_path is None:
        click.echo(f"spec: {spec.name!r}, recorded with the model ({model}/{SPEC_FILE})")
    setting = setting_from_options(
        method,
        spec.task,
        num_vectors=num_vectors,
        radius=radius,
        source_layer=source_layer,
        target_layer=target_layer,
        steps=steps,
        seed=seed,
    )
    report = run_detect_bench(
        lm,
        spec,
        setting,
        out,
        n_reference=num_reference,
        n_test=num_test,
        positions=positions,
        fpr=fpr,
        num_prompts=num_prompts,
        model_name=model,
        overwrite=overwrite,
    )
    for where, row in report["layers"].items():
        for key in ("learned", "random", "baseline"):
            a = row[key]["auroc"]
            click.echo(f"{where:6} {key:8} AUROC " + ", ".join(f"{g} {v:.3f}" for g, v in a.items()))
    click.echo(f"results: {out}/detect.md, {out}/detect.json")
