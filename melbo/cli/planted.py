"""``melbo plant``, ``melbo bench backdoor`` and ``melbo demo``: planted behaviors (METHOD.md section 4)."""

from __future__ import annotations

import os

import click

from melbo.cli.common import check_rows, print_run
from melbo.cli.demo import real_model_demo
from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig
from melbo.core.outputs import claim_folder
from melbo.defaults import PLANTED
from melbo.eval.control_stats import controls_markdown
from melbo.eval.controls import CONTROLS, parse_controls
from melbo.methods.registry import STANDALONE_METHODS
from melbo.planted.bench import bench_prompts, run_bench
from melbo.planted.bench_config import parse_sweep, read_sweep_file, setting_from_options
from melbo.planted.bench_report import summary_lines
from melbo.planted.fixtures import demo_model, load_planted_lm
from melbo.planted.plant import SPEC_FILE, check_report, format_report
from melbo.planted.plant import plant as run_plant
from melbo.planted.spec import PACKAGED_SPECS, load_spec, with_noise
from melbo.planted.sweep import run_sweep

PLANTED_HELP = "\b\nDefaults per task and method (melbo.defaults.PLANTED):\n" + "\n".join(
    f"\b\n  {task} {m}: " + ", ".join(f"{k}={v}" for k, v in d.items())
    for task, rows in PLANTED.items()
    for m, d in rows.items()
)


@click.command()
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(),
    default=None,
    help="Planted-behavior spec: a JSON file, or a packaged one by name: " + ", ".join(PACKAGED_SPECS) + ".",
)
@click.option("--out", required=True, type=click.Path(), help="Folder to write the model, spec and report to.")
@click.option("--seed", type=int, default=None, help="Override the spec's train.seed.")
@click.option("--steps", type=int, default=None, help="Override the spec's train.steps.")
@click.option(
    "--noise",
    type=float,
    default=None,
    help="Override noise.residual_std (recipe 'noisy': Gaussian residual noise, x residual RMS).",
)
@click.option("--device", default="cpu", help="Torch device: cpu, cuda, cuda:N, mps.")
@click.option("--overwrite", is_flag=True, help="Replace the earlier planted model in --out (only its own files).")
def plant(
    spec_path: str | None,
    out: str,
    seed: int | None,
    steps: int | None,
    noise: float | None,
    device: str,
    overwrite: bool,
) -> None:
    """Train a small model with planted backdoors (arithmetic task, or a story fine-tune) and check it:
    clean accuracy, firing rates, false firing. Exit code 2 when it misses the thresholds (the folder is
    kept, its plant_report.json says FAILED)."""
    spec = load_spec(spec_path)
    if noise is not None:
        spec = with_noise(spec, residual_std=noise)
    inputs = [("the spec (--spec)", spec_path), ("the base model", spec.base_model)]
    claim_folder(out, "plant", inputs=inputs, overwrite=overwrite)
    report = run_plant(spec, out, seed=seed, steps=steps, device=device, overwrite=overwrite)
    click.echo(format_report(report))
    check_report(report)


@click.group()
def bench() -> None:
    """Benchmarks of the methods on models with known planted behaviors."""


@bench.command("backdoor", epilog=PLANTED_HELP)
@click.option("--model", required=True, type=click.Path(), help="A planted model folder (written by melbo plant).")
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(),
    default=None,
    help="The spec the model was planted with. Default: the folder's plant_spec.json.",
)
@click.option(
    "--method",
    type=click.Choice(STANDALONE_METHODS),
    default="dct",
    help="dct: the top N of a deep causal transcoder's factors (the best measured on every planted subject); "
    "melbo: N vectors one by one; adapter: N steering adapters; rank1: N rank-1 factors at once.",
)
@click.option("--num-vectors", type=int, default=64, help="Learned perturbations N (and as many random ones).")
@click.option(
    "--prompt",
    multiple=True,
    help="Clean training prompt (repeatable). Default: clean prompts planting never trained on.",
)
@click.option("--num-prompts", type=int, default=1, help="Without --prompt: train on this many clean prompts.")
@click.option("--source-layer", type=int, default=None, help="Block after which vectors are added.")
@click.option("--target-layer", type=int, default=None, help="Block the objective measures.")
@click.option(
    "--radius",
    default=None,
    help="R: a number, kx (median residual norm) or calibrate. Default: per task and method (below).",
)
@click.option("--p", "p", type=float, default=None, help="MELBO's power on each position's distance.")
@click.option("--q", "q", type=float, default=None, help="MELBO's per-prompt exponent 1/q.")
@click.option("--positions", default=None, help="all, last:K or indices. Default: all.")
@click.option("--steps", type=int, default=None, help="Optimizer steps per vector (melbo, adapter).")
@click.option("--seed", type=int, default=None, help="Seed of the random starts and of the random baseline.")
@click.option("--writes-only/--keep-residual", default=None, help="Measure only what the blocks write (Z(θ) − θ).")
@click.option("--scales", default=None, help="Multiples of every vector to generate at, like 1,5,8,12, or scan.")
@click.option("--lambda", "lam", type=float, default=None, help="λ of --radius calibrate.")
@click.option("--factors", type=int, default=None, help="DCT factors m (default min(512, d_model)).")
@click.option("--orthogonalize", type=click.Choice(["qr", "soft"]), default=None, help="DCT's orthogonalization.")
@click.option("--rank", type=int, default=None, help="Adapter rank r.")
@click.option("--batch-vectors", type=int, default=None, help="MELBO: vectors at once (1: one by one).")
@click.option("--max-new-tokens", type=int, default=64, help="New tokens per completion (at least ~50, METHOD.md 4).")
@click.option("--generalization", "n_general", type=int, default=20, help="Other clean prompts for each firing rate.")
@click.option(
    "--controls",
    default=None,
    is_flag=False,
    flag_value="cheap",
    help="Negative controls at a matched budget, labelled by the same judge: cheap (also --controls alone), all, "
    f"or a comma list of {', '.join(CONTROLS)}; hits (a backdoor phrase fires), recall and one-sided Fisher p "
    "per control in bench.md. Not with --sweep. Default: none.",
)
@click.option(
    "--sweep",
    default=None,
    help="A grid, e.g. radius=0.5x,1x,source-layer=1,2 (writes OUT/NN/, sweep.md; a value with commas in double "
    'quotes: positions="0,3",all). Exit code 2 when any setting failed (the table still holds the others).',
)
@click.option(
    "--sweep-file",
    type=click.Path(),
    default=None,
    help='The grid as a JSON or TOML file instead: {"radius": ["0.5x", "1x"], "source-layer": [1, 2]}.',
)
@click.option("--out", required=True, type=click.Path(), help="Folder for bench.json and bench.md.")
@click.option("--overwrite", is_flag=True, help="Replace the results of an earlier `melbo bench backdoor` in --out.")
@click.option("--device", default="cpu", help="cpu, cuda, cuda:N.")
def bench_backdoor(
    model: str,
    spec_path: str | None,
    method: str,
    num_vectors: int,
    prompt: tuple[str, ...],
    num_prompts: int,
    source_layer: int | None,
    target_layer: int | None,
    radius: str | None,
    p: float | None,
    q: float | None,
    positions: str | None,
    steps: int | None,
    seed: int | None,
    writes_only: bool | None,
    scales: str | None,
    lam: float | None,
    factors: int | None,
    orthogonalize: str | None,
    rank: int | None,
    batch_vectors: int | None,
    max_new_tokens: int,
    n_general: int,
    controls: str | None,
    sweep: str | None,
    sweep_file: str | None,
    out: str,
    overwrite: bool,
    device: str,
) -> None:
    """Does a method find a planted model's backdoors from clean prompts? Recall, perturbations per
    behavior, first index, the random baseline at the same R, generalization."""
    if controls is not None and (sweep is not None or sweep_file is not None):
        raise MelboError(f"--controls {controls} runs with one benchmark setting, not with a sweep; drop one of them")
    if controls is not None:
        parse_controls(controls)  # unknown names fail before the model loads
    if sweep is not None and sweep_file is not None:
        raise MelboError("give at most one of --sweep (inline) and --sweep-file (JSON or TOML)")
    inputs = [("the planted model (--model)", model), ("the spec (--spec)", spec_path), ("--sweep-file", sweep_file)]
    claim_folder(out, "bench backdoor", inputs=inputs, overwrite=overwrite)  # before the model loads
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
        p=p,
        q=q,
        positions=positions,
        steps=steps,
        seed=seed,
        writes_only=writes_only,
        scales=scales,
        lam=lam,
        factors=factors,
        orthogonalize=orthogonalize,
        rank=rank,
        batch_vectors=batch_vectors,
    )
    grid = parse_sweep(sweep) if sweep is not None else read_sweep_file(sweep_file) if sweep_file else None
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    bench_prompts(spec, list(prompt) or None, n_general, None, num_prompts)  # bad prompts: fail before any work
    if grid:
        click.echo(f"sweep: {len(grid)} settings on {model} (spec {spec.name!r})")

        def show(k: int, r: dict) -> None:
            if "error" in r:
                click.echo(f"[{k}] {r['label']}: error: {r['error']}")
                return
            click.echo(
                f"[{k}] {r['label']}: recall {r['recall']:.2f} (random {r['random_recall']:.2f}); "
                + ", ".join(
                    f"{b} {x['count']} first {x['first_index']} (random {x['random_count']})"
                    for b, x in r["behaviors"].items()
                )
            )

        prompts = list(prompt) or None
        rows = run_sweep(
            lm, spec, setting, grid, out, prompts, gen, n_general, model, show, num_prompts, overwrite=overwrite
        )
        click.echo(f"results: {out}/sweep.md")
        check_rows(rows, f"{out}/sweep.md")
        return
    report = run_bench(
        lm,
        spec,
        setting,
        list(prompt) or None,
        gen,
        n_general,
        out,
        model_name=model,
        num_prompts=num_prompts,
        controls=controls,
        overwrite=overwrite,
    )
    click.echo("\n".join(summary_lines(report)))
    if report.get("controls"):
        click.echo("\n".join(controls_markdown(report["controls"])[2:]))
    click.echo(f"results: {out}/bench.md, {out}/bench.json")


@click.command()
@click.option(
    "--out",
    default="runs/demo",
    type=click.Path(),
    help="Folder for the demo's results (an earlier demo's are replaced).",
)
@click.option(
    "--part",
    type=click.Choice(["all", "real", "planted"]),
    default="all",
    help="real: MELBO on a real pretrained model; planted: the planted-backdoor benchmark; all: both.",
)
@click.option(
    "--num-vectors", type=int, default=64, help="Learned vectors of the planted benchmark (and as many random)."
)
@click.option(
    "--method", type=click.Choice(["both", "dct", "melbo"]), default="both", help="Method(s) of the planted benchmark."
)
@click.option("--device", default="cpu", help="cpu, cuda.")
def demo(out: str, part: str, num_vectors: int, method: str, device: str) -> None:
    """The main job, offline, in a few minutes on a CPU: (1) MELBO on a real pretrained model beside random
    vectors at the same R, with R chosen by the model; (2) the planted-behavior benchmark on small models
    shipped with melbo (METHOD.md section 4). Exit code 2 when a benchmark subject failed (the others are
    still run and written)."""
    subjects = []
    if part in ("all", "planted") and method in ("both", "dct"):
        subjects += [
            ("story", "dct", 1, "full recall, though random vectors find these backdoors about as often"),
            ("default", "dct", 4, "learned vectors beat random ones most clearly"),
        ]
    if part in ("all", "planted") and method in ("both", "melbo"):
        subjects.append(("default", "melbo", 4, "MELBO, for comparison"))
    # the output rule, before any work: --out is new, empty or an earlier demo's, whose own results are replaced
    target = claim_folder(out, "demo")
    run_dir = os.path.join(out, "real")
    if part in ("all", "real"):
        claim_folder(run_dir, "train", overwrite=True)
    for name, m, _, _ in subjects:
        claim_folder(os.path.join(out, f"planted-{name}-{m}"), "bench backdoor", overwrite=True)
    target.prepare()
    if part in ("all", "real"):
        bank = real_model_demo(run_dir, device, click.echo)
        if bank is not None:
            print_run(bank)
    if part not in ("all", "planted"):
        return
    click.echo(
        "== 2. Planted-behavior benchmark (METHOD.md section 4): learned vectors beside random vectors at the same R"
    )
    failed: list[str] = []
    for name, m, n_prompts, why in subjects:
        folder = demo_model(click.echo, name)
        lm, spec = load_planted_lm(folder, None, device)
        s = setting_from_options(m, spec.task, num_vectors=num_vectors)
        bench_dir = os.path.join(out, f"planted-{name}-{m}")
        click.echo(
            f"-- {spec.name!r} subject ({folder}): " + ", ".join(f"{b.name} -> {b.phrase!r}" for b in spec.backdoors)
        )
        click.echo(f"   {m}, {num_vectors} vectors, {n_prompts} clean prompt(s), R {s.radius} ({why})")
        try:
            report = run_bench(
                lm,
                spec,
                s,
                None,
                None,
                20,
                bench_dir,
                show_progress=True,
                model_name=str(folder),
                num_prompts=n_prompts,
                overwrite=True,
            )
        except MelboError as e:
            click.echo(f"   error: {e}")
            failed.append(f"{name} subject, {m}: {e}")
            continue
        click.echo("\n".join(summary_lines(report)))
        click.echo(f"results: {bench_dir}/bench.md, {bench_dir}/bench.json")
    if failed:  # the other subjects ran and are written; a failed one must not end with exit code 0
        raise MelboError(f"{len(failed)} of {len(subjects)} benchmark subjects failed: " + "; ".join(failed))
