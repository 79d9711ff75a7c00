"""Sweeps of :func:`melbo.train` over a grid of settings (prompts × R × layers × methods ...), each
setting as one Ray task (one GPU each where the cluster has GPUs, one CPU otherwise), or all in
this process.

Layout of a sweep folder ``OUT``: ``sweep_plan.json`` (the grid; a rerun with another grid is
refused), one run folder ``OUT/NN/`` per setting (the bank, summary, report of
:func:`melbo.train`) whose ``row.json`` marks it finished, and ``sweep.json`` / ``sweep.md``, the
table. Rerunning the same command resumes: finished settings are read back, the others run
(a setting's half-written folder is cleared and the setting rerun from its start: every setting
is seeded, so it gives the same bank). A Ray worker that dies mid-setting (killed, out of
memory) is retried by Ray (``max_retries``); its setting then starts over in the same way.

Each setting runs on one CPU thread (as a Ray task with ``num_cpus=1`` does), so a sweep gives
the same table under Ray and in-process.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig
from melbo.core.grid import parse_grid_text, read_grid_file
from melbo.core.io import make_dir, read_json, write_json, write_text
from melbo.core.models import load_model, pick_device
from melbo.core.outputs import HIDDEN, claim_folder
from melbo.methods.base import make_settings
from melbo.methods.registry import get_method
from melbo.planted.bench_config import BENCH_METHODS, SWEEP_KEYS, parse_sweep
from melbo.run import train

PLAN, TABLE_JSON, TABLE_MD, ROW = "sweep_plan.json", "sweep.json", "sweep.md", "row.json"


GRID_KEYS = ("prompts", *SWEEP_KEYS)


def read_grid(path: str | os.PathLike) -> dict[str, list]:
    """A grid file (JSON or TOML: ``prompts`` -> a list of prompt sets, each a list of strings; the
    other keys -> lists of values), e.g. ``{"prompts": [["Hello, world", "The cat"]], "radius":
    ["0.1x", "0.2x"]}``, as ``{key: [values]}`` for :func:`parse_grid` and :func:`run_sweep`.

    Raises:
        MelboError: see :func:`melbo.core.grid.read_grid_file`.
    """
    return read_grid_file(path, GRID_KEYS, "prompts")


def parse_grid(text: str | dict[str, list]) -> list[dict[str, Any]]:
    """A grid like ``prompts=Once upon a time|The cat,radius=0.1x,0.2x,method=melbo,dct`` (or the
    ``{key: [values]}`` of :func:`read_grid`) -> its settings (the cartesian product, prompt sets
    slowest, then the other keys in order), each a dict of :func:`melbo.train` keyword arguments
    plus ``method`` and ``prompts`` (a list). ``prompts`` values are prompt sets, ``|`` between
    the prompts of one set; a prompt holding commas goes in double quotes
    (``prompts="Hello, world"|The cat``); the other keys are those of ``melbo bench backdoor
    --sweep`` (:data:`melbo.planted.bench_config.SWEEP_KEYS`).

    Raises:
        MelboError: an empty grid, an empty prompt, an ambiguous comma in a prompt set, and every
            error of the bench grid's parser.
    """
    grid = dict(text) if isinstance(text, dict) else parse_grid_text(str(text or ""), GRID_KEYS, "prompts")
    prompt_sets: list[list[str]] = grid.pop("prompts", [])
    others = parse_sweep(grid) if grid else [{}]
    sets: list[list[str] | None] = list(prompt_sets) or [None]
    out = []
    for ps, o in itertools.product(sets, others):
        out.append({**({"prompts": ps} if ps is not None else {}), **o})
    return out


def method_settings(setting: dict[str, Any], base: dict[str, Any]) -> tuple[str, dict[str, Any], list[str]]:
    """``(method, the melbo.train settings, keys not used by that method)`` of one grid setting
    over the ``base`` settings (keys a method does not have, e.g. ``steps`` for DCT, are left out).

    Raises:
        MelboError: an unknown method, a bad value (the method's own checks).
    """
    merged = {**base, **{k: v for k, v in setting.items() if k != "prompts"}}
    method = str(merged.pop("method", "melbo"))
    if method not in BENCH_METHODS:
        raise MelboError(f"unknown method {method!r}; allowed: {', '.join(BENCH_METHODS)}")
    fields = {f.name for f in dataclasses.fields(get_method(method).settings_class)}
    used = {k: v for k, v in merged.items() if k in fields}
    make_settings(method, get_method(method).settings_class, used)  # a bad value fails here, before any work
    return method, used, sorted(k for k in merged if k not in fields)


def label(setting: dict[str, Any]) -> str:
    """A short name of a grid setting, for tables (a prompt holding ``,``, ``|`` or ``"`` quoted as
    the grid writes it)."""
    parts = []
    for k, v in setting.items():
        ps = (
            [json.dumps(p, ensure_ascii=False) if any(c in p for c in ',|"') else p for p in v]
            if k == "prompts"
            else []
        )
        parts.append(f"prompts={'|'.join(ps)}" if k == "prompts" else f"{k}={v}")
    return " ".join(parts) or "defaults"


def run_setting(
    model: str, index: int, setting: dict, base: dict, prompts: list[str], out: str, max_new_tokens: int, device: str
) -> dict:
    """Train one grid setting into ``out/NN/`` (one thread) and return (and write) its table row:
    R, layers, learned and random (the behavior judge's label counts over the training completions,
    changed the completion, coherent and different from the unsteered one, mean objective), the
    settings not used by the method, seconds, the worker's pid.

    Raises:
        MelboError: every error of :func:`melbo.train` for this setting.
    """
    folder = Path(out) / f"{index:02d}"
    if folder.exists():  # a killed attempt: start this setting over (only a folder this sweep wrote)
        if not (folder / "worker.pid").is_file() and any(not p.name.startswith(HIDDEN) for p in folder.iterdir()):
            raise MelboError(
                f"{str(folder)!r} was not written by this sweep (it has no worker.pid); move it away or choose "
                "another --out"
            )
        shutil.rmtree(folder)
    make_dir(folder)
    write_text(folder / "worker.pid", f"{os.getpid()}\n")
    method, settings, unused = method_settings(setting, base)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        lm = load_model(model, device)
        bank = train(
            lm,
            setting.get("prompts", prompts),
            method,
            out=folder / "run",
            show_progress=False,
            generation=GenerationConfig(max_new_tokens=max_new_tokens),
            **settings,
        )
    finally:
        torch.set_num_threads(threads)
    ev = bank.evaluation or {}
    m = bank.meta

    def stats(x: dict) -> dict:
        return {
            "labels": x.get("labels_train"),
            "changed": f"{x.get('changed_train')}/{x.get('n')}",
            "coherent_and_different": x.get("coherent_and_different_train"),
            "mean_objective": round(float(x.get("mean_objective", float("nan"))), 4),
        }

    row = {
        "index": index,
        "label": label(setting),
        "method": method,
        "radius": round(float(m["radius"]), 4),
        "source_layer": m["source_layer"],
        "target_layer": m["target_layer"],
        "learned": stats(ev.get("learned", {})),
        "random": stats(ev.get("random", {})),
        "unused": unused,
        "seconds": round(time.perf_counter() - t0, 1),
        "pid": os.getpid(),
    }
    write_json(folder / ROW, row)
    return row


def _check_plan(folder: Path, plan: dict) -> None:
    """Write the sweep's plan, or check that a resumed folder's plan is the same.

    Raises:
        MelboError: the folder holds a sweep of another grid, model or settings.
    """
    path = folder / PLAN
    if path.is_file():
        old = read_json(path, "sweep plan")
        if old != plan:
            raise MelboError(
                f"{str(folder)!r} holds a sweep of another grid or settings ({PLAN}); rerun the same command "
                "to resume it, or choose another --out"
            )
        return
    write_json(path, plan)


def _ray(address: str | None):
    """The ``ray`` module, connected (a local Ray when no address and none is running), or None when
    Ray is not installed and no address was asked for.

    Raises:
        MelboError: an address given but Ray is not installed.
    """
    try:
        import ray
    except ImportError:
        if address:
            raise MelboError("--ray-address needs Ray: pip install 'melbo[sweep]' (or run with --local)") from None
        return None
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
    return ray


def run_sweep(
    model: str,
    grid: str | dict[str, list],
    out: str | os.PathLike,
    prompts: list[str] | None = None,
    base: dict[str, Any] | None = None,
    max_new_tokens: int = 32,
    device: str = "cpu",
    ray_address: str | None = None,
    local: bool = False,
    max_retries: int = 2,
    echo=print,
) -> list[dict]:
    """Run every setting of ``grid`` (:func:`parse_grid`: inline text, or a file's :func:`read_grid`)
    on ``model`` (a path or Hub id, loaded by each task) into ``out`` (module docstring), as Ray
    tasks or, with ``local`` (or without Ray), one after the other here. ``base`` settings apply to
    every setting (the grid overrides them).

    Returns:
        the table rows in grid order (a failed setting's row has ``"error"``).

    Raises:
        MelboError: a bad grid, no prompts, a folder holding another sweep or files melbo did not
            write, Ray asked for by address but not installed.
    """
    settings = parse_grid(grid)
    base = dict(base or {})
    if not prompts and any("prompts" not in s for s in settings):
        raise MelboError("no prompts: give --prompt, or a prompts=... key in the grid")
    for s in settings:
        method_settings(s, base)  # unknown methods and bad values fail before any work
    GenerationConfig(max_new_tokens=max_new_tokens)
    pick_device(device)
    folder = claim_folder(out, "sweep").prepare()  # new, empty or a sweep's (melbo.core.outputs)
    _check_plan(folder, {"model": model, "grid": grid, "prompts": prompts, "base": base, "tokens": max_new_tokens})
    done = {i for i in range(len(settings)) if (folder / f"{i:02d}" / ROW).is_file()}
    todo = [i for i in range(len(settings)) if i not in done]
    if done:
        echo(f"resuming: {len(done)} of {len(settings)} settings already finished")
    errors: dict[int, str] = {}
    ray = None if local else _ray(ray_address)
    args = {i: (model, i, settings[i], base, prompts or [], str(folder), max_new_tokens) for i in todo}
    if ray is None:
        for i in todo:
            try:
                r = run_setting(*args[i], device)
                echo(f"[{i:02d}] {r['label']}: done in {r['seconds']:.1f} s")
            except MelboError as e:
                errors[i] = str(e)
                echo(f"[{i:02d}] {label(settings[i])}: error: {e}")
    else:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=max_retries)(run_setting)
        pending = {task.remote(*args[i], "cuda" if gpus else device): i for i in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                r = ray.get(ready[0])
                echo(f"[{i:02d}] {r['label']}: done in {r['seconds']:.1f} s (worker {r['pid']})")
            except Exception as e:  # a setting's own error, or a worker that died past its retries
                cause = getattr(e, "cause", None) or e
                errors[i] = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
                echo(f"[{i:02d}] {label(settings[i])}: error: {errors[i]}")
    rows = []
    for i, s in enumerate(settings):
        path = folder / f"{i:02d}" / ROW
        failed = {"index": i, "label": label(s), "error": errors.get(i, "not run")}
        rows.append(read_json(path, "sweep row") if path.is_file() else failed)
    write_json(folder / TABLE_JSON, rows)
    write_text(folder / TABLE_MD, sweep_markdown(rows, model))
    return rows


def sweep_markdown(rows: list[dict], model: str = "") -> str:
    """The sweep table in Markdown: per setting R, layers, and learned vs random (the behavior
    judge's ``new`` and ``degenerate`` counts over the training completions, completions changed,
    share coherent and different from the unsteered one, mean objective)."""
    lines = [
        f"# melbo sweep{' on ' + model if model else ''}",
        "",
        "| # | setting | R | layers | learned new | learned degenerate | learned changed "
        "| learned coherent & different | learned objective | random new | random degenerate | random changed "
        "| random coherent & different | random objective | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(text: str) -> str:  # a | of a prompt set would split the table's cell
        return str(text).replace("|", "\\|").replace("\n", " ")

    def share(x: Any) -> str:
        return "-" if x is None else f"{100 * float(x):.0f}%"

    def count(x: dict, label: str) -> str:  # of all training completions (vectors × prompts)
        c = x.get("labels")
        return "-" if not c else f"{c.get(label, 0)}/{sum(c.values())}"

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['index']} | {cell(r['label'])} | error: {cell(r['error'])} |" + " |" * 12)
            continue
        L, R = r["learned"], r["random"]
        lines.append(
            f"| {r['index']} | {cell(r['label'])} | {r['radius']:.4g} | {r['source_layer']}->{r['target_layer']} | "
            f"{count(L, 'new')} | {count(L, 'degenerate')} | "
            f"{L['changed']} | {share(L['coherent_and_different'])} | {L['mean_objective']:.4g} | "
            f"{count(R, 'new')} | {count(R, 'degenerate')} | "
            f"{R['changed']} | {share(R['coherent_and_different'])} | {R['mean_objective']:.4g} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"
