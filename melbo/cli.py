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
@click.option("--radius", default="1x",
              help="R, the norm of every steering vector: a number (residual-stream units), a multiple of the "
                   "mean residual norm at the source layer like 0.5x, or auto (calibrated: the R where Δ's "
                   "nonlinearity ratio is --lambda, METHOD.md section 5). Default for --method dct: auto.")
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
                   "--radius kx sets R so that the random starts add k x the residual norm to the MLP output.")
@click.option("--rank", type=int, default=None, help="Adapter rank r (--kind adapter). Default: min(64, d_model).")
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
    """
    from melbo.generate import GenerationConfig
    from melbo.run import RunSpec, run_train

    if method == "dct":  # DCT's own defaults where the user left MELBO's
        ctx = click.get_current_context()
        default = click.core.ParameterSource.DEFAULT
        radius = "auto" if ctx.get_parameter_source("radius") == default else radius
        positions = "last:3" if ctx.get_parameter_source("positions") == default else positions
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
@click.option("--bank", required=True, type=click.Path(), help="A bank.safetensors written by melbo.")
@click.option("--prompt", multiple=True, help="A prompt (repeatable).")
@click.option("--prompts-file", type=click.Path(), default=None, help="Text file with one prompt per line.")
@click.option("--vectors", default="all", help="Which vectors of the bank: all, or indices like 0,3 or ranges like 0-7.")
@click.option("--scale", type=float, default=1.0, help="Multiply each vector by this (negative subtracts it).")
@click.option("--random", "use_random", is_flag=True,
              help="Use the bank's random baseline vectors instead of the learned ones.")
@click.option("--model", default=None, help="Model to apply the bank to (default: the one in the bank's metadata).")
@click.option("--layer", type=int, default=None, help="Block to add vectors after (default: the bank's source layer).")
@click.option("--no-unsteered", is_flag=True, help="Do not print the unsteered completion.")
@generation_options
@model_options
def generate(bank, prompt, prompts_file, vectors, scale, use_random, model, layer, no_unsteered, max_new_tokens,
             temperature, top_p, chat, device, dtype, blocks_path):
    """Generate completions of new prompts with vectors of a bank applied (each vector alone)."""
    import torch

    from melbo.bank import check_bank, load_bank, select_vectors
    from melbo.generate import GenerationConfig
    from melbo.generate import generate as steered_completions
    from melbo.models import load_model, resolve_layer
    from melbo.prompts import check_prompts

    prompts = check_prompts(_read_prompts(prompt, prompts_file))
    b = load_bank(bank)
    idx = select_vectors(b, vectors)
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
    rows = source[idx]
    if not no_unsteered:
        rows = torch.cat([torch.zeros(1, rows.shape[1]), rows])
    comps = steered_completions(lm, prompts, rows, src, scale, cfg)
    kind = "random" if use_random else "vector"
    labels = ([] if no_unsteered else ["unsteered"]) + [f"{kind} {i} x {scale:g}" for i in idx]
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
DEMO_RADIUS = "1x"


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
@click.option("--out", default="runs/demo", type=click.Path(), help="Run folder (replaced if it holds a demo run).")
@click.option("--num-vectors", type=int, default=16, help="Number of vectors.")
@click.option("--device", default="auto", help="auto, cpu, cuda.")
def demo(out, num_vectors, device):
    """The main job on an embedded default: MELBO on the real stories260k model (../shared/models)."""
    import shutil

    from melbo.generate import GenerationConfig
    from melbo.run import RunSpec, run_train

    model = shared_model("stories260k")
    if os.path.exists(os.path.join(out, "bank.safetensors")):
        shutil.rmtree(out)
    spec = RunSpec(model=model, prompts=[DEMO_PROMPT], out=out, num_vectors=num_vectors, device=device,
                   radius=DEMO_RADIUS, heldout=["The little dog ran to the park"],
                   generation=GenerationConfig(max_new_tokens=48))
    click.echo(f"melbo demo: {num_vectors} steering vectors on {model}, prompt {DEMO_PROMPT!r}")
    print_run_summary(run_train(spec))


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
