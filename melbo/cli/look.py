"""``melbo generate`` and ``melbo plot``: looking at what a bank found (METHOD.md sections 3-4)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import click

from melbo.bank import Bank
from melbo.cli.common import (
    generation_config,
    generation_options,
    load_bank,
    model_inputs,
    model_options,
    open_model,
    print_completions,
    prompt_options,
    read_prompts,
    steer_option,
)
from melbo.core.errors import MelboError
from melbo.core.generate import generate_rows
from melbo.core.lora import linear_dims, module_by_name
from melbo.core.outputs import bank_file, claim_folder
from melbo.core.peft import load_peft_adapter
from melbo.core.prompts import check_prompts
from melbo.core.validate import parse_indices
from melbo.measure import effective_window, kl_label, vector_variants
from melbo.report.measures import write_measures
from melbo.vector import SteeringAdapter


def _print_span(name: str, vals: list[float]) -> None:
    head = ", ".join(f"{v:.3g}" for v in vals[:3])
    tail = ", ".join(f"{v:.3g}" for v in vals[-3:])
    click.echo(f"{name}: first [{head}] ... last [{tail}]; min {min(vals):.3g}, max {max(vals):.3g}")


@click.command()
@click.option("--bank", default=None, type=click.Path(), help="A run folder or bank.safetensors (or give --adapter).")
@prompt_options
@click.option("--vectors", default=None, help="Which perturbations: all, or indices like 0,3 or ranges like 0-7.")
@click.option("--scale", type=float, default=1.0, help="Multiply each vector (adapters: their R) by this.")
@click.option("--random", "use_random", is_flag=True, help="Use the bank's random baseline instead.")
@click.option("--model", default=None, help="Model (default: the one in the bank's metadata).")
@click.option("--layer", type=int, default=None, help="Block to add vectors after (default: the bank's source layer).")
@steer_option
@click.option("--no-unsteered", is_flag=True, help="Do not print the unsteered completion.")
@click.option(
    "--adapter", default=None, type=click.Path(), help="Apply one PEFT LoRA folder (e.g. RUN/peft/adapter_003)."
)
@click.option(
    "--rescale", type=float, default=None, help="Also apply each chosen vector (and the --mean) at this norm."
)
@click.option("--mean", "mean_of", default=None, help="Also apply the mean of these vectors, like 3,5,8 or 1-20.")
@generation_options
@model_options
def generate(
    bank: str | None,
    prompt: tuple[str, ...],
    prompts_file: str | None,
    vectors: str | None,
    scale: float,
    use_random: bool,
    model: str | None,
    layer: int | None,
    steer_positions: str,
    no_unsteered: bool,
    adapter: str | None,
    rescale: float | None,
    mean_of: str | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    chat: bool,
    device: str,
    dtype: str,
    blocks_path: str | None,
    gguf_file: str | None,
) -> None:
    """Completions of prompts with perturbations of a bank applied (each alone), beside the unsteered
    model. --rescale and --mean check METHOD.md section 3's claims in one command."""
    prompts = check_prompts(read_prompts(prompt, prompts_file))
    gen = generation_config(max_new_tokens, temperature, top_p, chat, 0, steer_positions)
    fields = {k: getattr(gen, k) for k in gen.__dataclass_fields__}
    if (bank is None) == (adapter is None):
        raise MelboError("give exactly one of --bank (a melbo run) and --adapter (a PEFT LoRA folder)")
    if adapter is not None:
        if rescale is not None or mean_of or use_random or vectors:
            raise MelboError("--rescale, --mean, --random and --vectors need a bank (--bank), not one PEFT folder")
        ad = load_peft_adapter(adapter)
        lm = open_model(model or ad.meta.get("model"), device, dtype, blocks_path, gguf_file)
        dims = linear_dims(module_by_name(lm, ad.module_name))
        if dims is None or (dims[0], dims[1]) != (ad.omega_a.shape[0], ad.omega_b.shape[0]):
            raise MelboError(
                f"the adapter ({ad.omega_a.shape[0]} -> {ad.omega_b.shape[0]}) does not fit module "
                f"{ad.module_name!r} of model {lm.name!r}; apply it to the model it was trained on"
            )
        one = SteeringAdapter(
            ad.omega_a, ad.omega_b, ad.scale, ad.module_name, 0, lm.name, f"adapter {Path(adapter).name}"
        )
        out = {} if no_unsteered else {"unsteered": generate_rows(lm, prompts, 1, lambda rows: nullcontext(), gen)[0]}
        out[f"{one.label} x {scale:g}"] = one.generate(lm, prompts, scale, **fields)
        print_completions(prompts, out)
        return
    b, src = load_bank(str(bank), use_random)
    if layer is not None:
        src.meta["source_layer"] = layer
    lm = open_model(model, device, dtype, blocks_path, gguf_file, b)
    src.lm = lm
    if rescale is None and not mean_of:
        comps = src.generate(prompts, vectors=vectors, scale=scale, unsteered=not no_unsteered, **fields)
        print_completions(prompts, {(k if k == "unsteered" else f"{k} x {scale:g}"): v for k, v in comps.items()})
        return
    if src.kind != "vector":
        raise MelboError("--rescale and --mean apply to steering vectors, not to adapters")
    mean_idx = parse_indices(mean_of, len(src)) if mean_of else None
    idx = parse_indices(vectors, len(src)) if vectors is not None or not mean_idx else list(mean_idx)
    rows, labels = vector_variants(src.vectors, idx, mean_idx, rescale, "random" if use_random else "vector")
    variants = Bank({"vectors": rows}, {**src.meta, "vectors": []}, lm)
    comps = variants.generate(prompts, unsteered=not no_unsteered, scale=scale, **fields)
    names = (["unsteered"] if not no_unsteered else []) + [f"{lab} x {scale:g}" for lab in labels]
    print_completions(prompts, dict(zip(names, comps.values())))


@click.command()
@click.option("--bank", required=True, type=click.Path(), help="A run folder or bank.safetensors.")
@prompt_options
@click.option("--reference", default="0", help="Row of the reference vector θ_ref, or none (only KL to unsteered).")
@click.option("--vectors", default=None, help="Which vectors: all, or indices like 0,3 or ranges like 0-7.")
@click.option("--random", "use_random", is_flag=True, help="Measure the bank's random baseline vectors instead.")
@click.option("--scale", type=float, default=1.0, help="Multiply every vector (the reference too) by this.")
@click.option(
    "--direction",
    type=click.Choice(["k||ref", "ref||k"]),
    default="k||ref",
    help="k||ref: KL(P_k ‖ P_ref) (what the MELBO-ortho reference computed); ref||k: KL(P_ref ‖ P_k).",
)
@click.option("--window", type=int, default=50, help="Moving-average window (shrunk for short banks).")
@click.option("--batch-size", type=int, default=64, help="Vectors per forward pass.")
@click.option("--model", default=None, help="Model (default: the one in the bank's metadata).")
@click.option("--chat", is_flag=True, help="Wrap prompts in the tokenizer's chat template (when it has one).")
@click.option(
    "--out", default=None, type=click.Path(), help="Folder for kl.png, norms.png, measures.csv (default: the bank's)."
)
@model_options
def plot(
    bank: str,
    prompt: tuple[str, ...],
    prompts_file: str | None,
    reference: str,
    vectors: str | None,
    use_random: bool,
    scale: float,
    direction: str,
    window: int,
    batch_size: int,
    model: str | None,
    chat: bool,
    out: str | None,
    device: str,
    dtype: str,
    blocks_path: str | None,
    gguf_file: str | None,
) -> None:
    """KL divergence of the next-token distribution at the last prompt position (steered by each vector vs by
    the reference vector, and vs unsteered) and vector norms, over the vector index (METHOD.md section 3)."""
    folder = Path(out) if out else (Path(bank) if Path(bank).is_dir() else Path(bank).parent)
    inputs = [("the bank (--bank)", bank_file(bank)), *model_inputs(model, prompts_file)]
    target = claim_folder(folder, "plot", inputs=inputs, into_melbo=True)  # a new folder, its own, or a run's
    b, src = load_bank(bank, use_random, "melbo plot")
    idx = parse_indices(vectors, len(src))
    effective_window(len(idx), window)  # a bad --window fails before any work
    if str(reference).strip().lower() != "none" and not str(reference).strip().lstrip("-").isdigit():
        raise MelboError(f"bad --reference {reference!r}; allowed: one vector index or none")
    ref = None if str(reference).strip().lower() == "none" else parse_indices(int(reference), len(src))[0]
    prompts = check_prompts(read_prompts(prompt, prompts_file, strict=True) or list(b.meta.get("prompts", [])))
    lm = open_model(model, device, dtype, blocks_path, gguf_file, b)
    src.lm = lm
    rows = idx if ref is None or ref in idx else idx + [ref]
    kl = src.kl(prompts, ref, rows, scale, direction, chat, batch_size)
    cut = len(idx)
    kl.to_unsteered = kl.to_unsteered[:cut]
    if kl.to_reference is not None:
        kl.to_reference = kl.to_reference[:cut]
    files = write_measures(
        target.prepare(), src, kl, idx, ref, scale, window, title=f"{Path(bank).name} ({b.meta.get('model')}): "
    )
    norms = (src.vectors[idx] * scale).double().norm(dim=-1).tolist()
    _print_span("norm", norms)
    if kl.to_reference is not None:
        _print_span(kl_label(direction, str(ref)), kl.to_reference.tolist())
    _print_span(kl_label(direction, "unsteered"), kl.to_unsteered.tolist())
    click.echo(f"wrote {', '.join(str(p) for p in files)}")
