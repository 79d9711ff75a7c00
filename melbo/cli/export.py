"""``melbo export gguf`` and ``melbo export vector``: steering vectors for other tools."""

from __future__ import annotations

from pathlib import Path

import click

from melbo.bank import Bank
from melbo.core.errors import MelboError
from melbo.core.outputs import bank_file, check_output_file
from melbo.core.validate import parse_indices
from melbo.export import export_gguf, vectors_from_gguf
from melbo.vector import SteeringVector


def _check_out(out: str, suffix: str, bank: str, overwrite: bool) -> Path:
    """The output rule for an exported file (:mod:`melbo.core.outputs`): never the bank it reads."""
    return check_output_file(
        out, "--out", inputs=[("the bank (--bank)", bank_file(bank))], overwrite=overwrite, suffix=suffix
    )


@click.group()
def export() -> None:
    """Write steering vectors in formats other tools read (llama.cpp control vectors, safetensors)."""


@export.command("gguf")
@click.option("--bank", required=True, type=click.Path(), help="A run folder or bank.safetensors (steering vectors).")
@click.option("--vectors", required=True, help="Which vectors (summed): indices like 3 or 0,3, or ranges like 0-7.")
@click.option("--scale", type=float, default=1.0, help="Multiply the (summed) vector by this before writing.")
@click.option("--random", "use_random", is_flag=True, help="Export the bank's random baseline vectors instead.")
@click.option("--out", required=True, type=click.Path(), help="The control-vector file to write (F.gguf).")
@click.option("--overwrite", is_flag=True, help="Replace the --out file if it exists (never the bank).")
def export_gguf_cmd(bank: str, vectors: str, scale: float, use_random: bool, out: str, overwrite: bool) -> None:
    """A llama.cpp control vector (`llama-cli --control-vector F.gguf`): tensor direction.<k> for
    the bank's source block k (k >= 1; llama.cpp cannot steer after block 0)."""
    path = _check_out(out, ".gguf", bank, overwrite)
    b = Bank.load(bank)
    written = export_gguf(b, vectors, path, scale, use_random)
    back = vectors_from_gguf(written)
    click.echo(
        f"wrote {written}: direction.{back[0].layer}, {back[0].d_model} floats, norm {back[0].norm:.4g} "
        f"(vectors {vectors} x {scale:g}); use: llama-cli -m MODEL.gguf --control-vector {written}"
    )


@export.command("vector")
@click.option("--bank", required=True, type=click.Path(), help="A run folder or bank.safetensors (steering vectors).")
@click.option("--vector", "index", required=True, type=int, help="The vector to write.")
@click.option("--random", "use_random", is_flag=True, help="Take it from the bank's random baseline.")
@click.option("--out", required=True, type=click.Path(), help="The file to write (F.safetensors).")
@click.option("--overwrite", is_flag=True, help="Replace the --out file if it exists (never the bank).")
def export_vector_cmd(bank: str, index: int, use_random: bool, out: str, overwrite: bool) -> None:
    """One steering vector as safetensors (tensor `vector` [d_model]) with its hook site
    (`blocks.<layer>.hook_resid_post`) and model in the metadata; melbo.SteeringVector.load reads it."""
    path = _check_out(out, ".safetensors", bank, overwrite)
    b = Bank.load(bank)
    if b.kind != "vector":
        raise MelboError("this bank holds adapters; their PEFT folders are in the run folder (peft/)")
    src = b.random if use_random else b
    if src is None:
        raise MelboError("the bank holds no random baseline")
    v = src[parse_indices(index, len(src))[0]]
    assert isinstance(v, SteeringVector)
    if not v.norm > 0:
        raise MelboError(f"vector {index} of {bank!r} is zero; it would steer nothing, so it is not exported")
    written = v.save(path)
    click.echo(f"wrote {written}: {v.label}, layer {v.layer}, norm {v.norm:.4g}")
