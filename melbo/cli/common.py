"""Pieces every command shares: option groups, reading prompts, loading the model, printing."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from melbo.bank import Bank
from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig
from melbo.core.hooks import STEER_POSITIONS
from melbo.core.io import read_json, read_text
from melbo.core.models import LoadedModel, load_model
from melbo.eval.labels import counts_text
from melbo.report.summary import share


def read_prompts(prompt: tuple[str, ...], prompts_file: str | None, strict: bool = False) -> list[str]:
    """``--prompt`` values, then the non-empty lines of ``--prompts-file`` (UTF-8).

    Raises:
        MelboError: an unreadable file; with ``strict`` (for commands that fall back to other
            prompts when given none), a ``--prompts-file`` with no prompt in it.
    """
    prompts = [p.replace("\\n", "\n") for p in prompt]
    if prompts_file:
        lines = [line for line in read_text(prompts_file, "--prompts-file").splitlines() if line.strip()]
        if strict and not lines:
            raise MelboError(f"--prompts-file {prompts_file!r} holds no prompt (only blank lines); give one per line")
        prompts += lines
    return prompts


def check_rows(rows: list[dict], table: str) -> None:
    """End a sweep command with an error when any of its settings failed (after its table was
    written and printed), so that a failed setting is never reported with exit code 0.

    Raises:
        MelboError: naming each failed setting (index, label) and why it failed.
    """
    failed = [(k, r) for k, r in enumerate(rows) if "error" in r]
    if failed:
        which = "; ".join(f"[{int(r.get('index', k)):02d}] {r.get('label')}: {r['error']}" for k, r in failed)
        raise MelboError(f"{len(failed)} of {len(rows)} sweep settings failed ({which}); the others are in {table}")


def model_inputs(model: str | None, prompts_file: str | None = None) -> list[tuple[str, str | None]]:
    """The input files of a command that loads ``--model`` and reads ``--prompts-file``, for the
    output rule (:mod:`melbo.core.outputs`; a Hub id is no path and is skipped there)."""
    return [("the model (--model)", model), ("the prompts file (--prompts-file)", prompts_file)]


def options(*opts: Callable) -> Callable:
    """Apply click options to a command, in order."""

    def wrap(f: Callable) -> Callable:
        for o in reversed(opts):
            f = o(f)
        return f

    return wrap


def given(ctx: click.Context, **names: str) -> dict[str, Any]:
    """``{setting: value}`` for the parameters the user set (``names`` maps parameter -> setting)."""
    out = {}
    for param, setting in names.items():
        source = ctx.get_parameter_source(param)
        if source is not None and source != click.core.ParameterSource.DEFAULT:
            out[setting] = ctx.params[param]
    return out


prompt_options = options(
    click.option("--prompt", multiple=True, help="A prompt (repeatable; \\n in it is a newline)."),
    click.option("--prompts-file", type=click.Path(), default=None, help="UTF-8 text file, one prompt per line."),
)

generation_options = options(
    click.option("--max-new-tokens", type=int, default=64, help="Tokens to generate after each prompt."),
    click.option("--temperature", type=float, default=0.0, help="0 = greedy decoding; > 0 samples."),
    click.option("--top-p", type=float, default=1.0, help="Nucleus sampling threshold (with --temperature > 0)."),
    click.option("--chat", is_flag=True, help="Wrap prompts in the tokenizer's chat template (when it has one)."),
)


def _device_map(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Keep ``--device-map`` for :func:`open_model`: a name, or a JSON object module -> device."""
    if value is None:
        return
    text = value.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            raise click.BadParameter(f"{value!r} is not a JSON object ({e.msg}); e.g. auto or a dict") from None
    elif text.endswith(".json"):
        parsed = read_json(text, "--device-map file")
    else:
        parsed = text
    ctx.meta["melbo.device_map"] = parsed


model_options = options(
    click.option(
        "--device-map",
        default=None,
        expose_value=False,
        callback=_device_map,
        help="Spread a model too big for one device with accelerate: auto, balanced, sequential, or a JSON "
        'object (or .json file) module -> device, e.g. {"model.layers.20": 1, ...}.',
    ),
    click.option(
        "--gguf-file",
        default=None,
        help="GGUF file inside the --model folder or Hub repository (quantized weights are dequantized).",
    ),
    click.option("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N."),
    click.option(
        "--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16."
    ),
    click.option(
        "--blocks-path",
        default=None,
        help="Dotted path of the decoder blocks, for architectures melbo does not know (e.g. transformer.h).",
    ),
)


def generation_config(
    max_new_tokens: int, temperature: float, top_p: float, chat: bool, seed: int = 0, steer_positions: str = "all"
) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        chat=chat,
        seed=seed,
        steer_positions=steer_positions,
    )


def load_bank(path: str, use_random: bool = False, vectors_for: str | None = None) -> tuple[Bank, Bank]:
    """``(bank, the bank or its random baseline)`` read from ``--bank``.

    Raises:
        MelboError: the file is not a bank; ``use_random`` and the bank holds no baseline;
            ``vectors_for`` (a command name) and the bank holds adapters; the bank (or its
            baseline) holds no perturbation.
    """
    b = Bank.load(path)
    use = b.random if use_random else b
    if use is None:
        raise MelboError(f"bank {path!r} holds no random baseline")
    if not len(use):
        what = "random baseline" if use_random else "bank"
        raise MelboError(f"the {what} of {path!r} holds no perturbations (0 rows); there is nothing to use")
    if vectors_for and use.kind != "vector":
        raise MelboError(f"{vectors_for} takes a bank of steering vectors (melbo, dct, ortho); {path!r} holds adapters")
    return b, use


def open_model(
    name: str | None, device: str, dtype: str, blocks_path: str | None, gguf_file: str | None, bank: Bank | None = None
) -> LoadedModel:
    """The model named by ``--model``, or the one a bank was made for (checked against the bank),
    spread with the command's ``--device-map`` where one was given.

    Raises:
        MelboError: no model given and the bank names none; a bank from another model.
    """
    name = name or (bank.meta.get("model") if bank is not None else None)
    if not name:
        raise MelboError("no model: the bank does not say which model it was made for; pass --model")
    ctx = click.get_current_context(silent=True)
    device_map = ctx.meta.get("melbo.device_map") if ctx is not None else None
    lm = load_model(str(name), device, dtype, blocks_path, gguf_file=gguf_file, device_map=device_map)
    if bank is not None:
        bank.attach(lm)
    return lm


def print_completions(prompts: list[str], comps: dict[str, list[str]]) -> None:
    """Each prompt, then every labelled completion of it."""
    for i, p in enumerate(prompts):
        click.echo(f"=== prompt: {p}")
        for label, c in comps.items():
            click.echo(f"--- {label}: {c[i]}")


def print_run(bank: Bank) -> None:
    """The learned-versus-random comparison of a run and where its files are."""
    ev = getattr(bank, "evaluation", None) or {}
    m = bank.meta
    sweep = m.get("radius_sweep")
    if sweep:
        ch = sweep["chosen"]
        click.echo(
            f"R chosen by the diversity sweep: {ch['radius']:.4g} ({ch['relative']:.3g}x the median residual "
            f"norm {sweep['residual_norm']:.4g}); rule: {sweep['rule']}"
        )
    click.echo(
        f"{m.get('method')}: R = {m.get('radius', float('nan')):.4g} (median residual norm at source "
        f"{m.get('residual_norm', float('nan')):.4g}), layers {m.get('source_layer')} -> {m.get('target_layer')}, "
        f"{len(bank)} {'adapters' if bank.kind == 'adapter' else 'vectors'}"
    )
    if ev:
        L, R = ev["learned"], ev["random"]
        for name, x in (("learned", L), ("random ", R)):
            labels = x.get("labels_train")
            judged = f"judge (training completions): {counts_text(labels)}; " if labels else ""
            click.echo(
                f"{name}: {judged}{x['changed_train']}/{x['n']} change the greedy completion; coherent "
                f"{share(x.get('coherent_train'))}, coherent and different from unsteered "
                f"{share(x.get('coherent_and_different_train'))}; mean objective {x['mean_objective']:.4g}"
            )
        if ev.get("seconds_per_step"):
            click.echo(
                f"{ev['seconds_per_step'] * 1000:.2f} ms per optimizer step, "
                f"{ev['seconds_per_vector']:.2f} s per perturbation"
            )
        if ev.get("out"):
            click.echo(f"results: {ev['out']}/summary.md (and report.html, bank.safetensors, completions.jsonl)")


steer_option = click.option(
    "--steer",
    "steer_positions",
    type=click.Choice(STEER_POSITIONS),
    default="all",
    help="Where the vector is added: every position of each pass, only the prompt, or only generated tokens.",
)
