"""The bad-input catalog for the library: every public function and object, as a notebook user calls it.

Each case must raise :class:`melbo.MelboError` (not a bare TypeError, KeyError or torch error)
whose message matches its pattern, and leave nothing written in the output folder.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import char_tokenizer, tiny_model

import melbo


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    lm = melbo.wrap_model(tiny_model("llama"), char_tokenizer())
    bank = melbo.train(lm, "Hello there.", num_vectors=2, steps=1, radius=2.0, show_progress=False)
    adapters = melbo.train(lm, "Hello there.", "adapter", num_vectors=2, steps=1, radius="0.01x", show_progress=False)
    (root / "afile").write_text("x")
    return {"lm": lm, "bank": bank, "adapters": adapters, "root": root}


P = "Hello there."
CASES: list[tuple[str, Callable[[dict, Any], Any], str]] = []


def case(cid: str, pattern: str):
    def add(fn):
        CASES.append((cid, fn, pattern))
        return fn

    return add


def T(c, out, **kw):
    return melbo.train(c["lm"], kw.pop("prompts", P), kw.pop("method", "melbo"), out=out, show_progress=False, **kw)


for name, kw, pat in (
    ("radius-0", {"radius": 0}, r"radius"),
    ("radius-nan", {"radius": float("nan")}, r"radius"),
    ("radius-text", {"radius": "big"}, r"bad radius 'big'"),
    ("radius-list", {"radius": [1, 2]}, r"radius"),
    ("num-vectors-0", {"num_vectors": 0}, r"number of vectors must be a whole number in 1\.\.100000, got 0"),
    ("num-vectors-float", {"num_vectors": 2.5}, r"number of vectors must be a whole number"),
    ("num-vectors-over-d", {"num_vectors": 33}, r"33 mutually orthogonal vectors do not fit d_model = 32"),
    ("steps-neg", {"steps": -1}, r"steps must be a whole number in 0\.\.1000000, got -1"),
    ("p-0", {"p": 0}, r"p must be a finite number > 0, got 0"),
    ("q-inf", {"q": float("inf")}, r"q must be a finite number > 0, got inf"),
    ("lr-neg", {"lr": -1}, r"learning rate must be a finite number > 0, got -1"),
    ("seed-neg", {"seed": -1}, r"seed must be a whole number in 0\.\.2147483647, got -1"),
    ("seed-big", {"seed": 2**31}, r"seed must be a whole number in 0\.\.2147483647"),
    ("source-layer", {"source_layer": 9}, r"source layer 9"),
    ("target-before-source", {"source_layer": 2, "target_layer": 1}, r"target layer"),
    ("positions", {"positions": "sideways"}, r"bad positions 'sideways'"),
    ("unknown-setting", {"colour": 1}, r"unknown setting 'colour' for method 'melbo'"),
    ("dct-steps", {"method": "dct", "steps": 3}, r"unknown setting 'steps' for method 'dct'"),
    ("dct-factors", {"method": "dct", "factors": 0}, r"number of DCT factors must be"),
    ("adapter-rank", {"method": "adapter", "rank": 0}, r"adapter rank must be"),
    (
        "adapter-rank-over-d",
        {"method": "adapter", "rank": 33},
        r"adapter rank 33 is above d_model = 32; allowed: 1\.\.32",
    ),
    ("dct-factors-over-d", {"method": "dct", "factors": 33}, r"33 factors do not fit QR"),
    ("method", {"method": "sae"}, r"unknown method 'sae'"),
    ("ortho-no-base", {"method": "ortho"}, r"base"),
    ("prompts-empty-list", {"prompts": []}, r"prompt"),
    ("prompts-blank", {"prompts": "   "}, r"prompt"),
    ("prompts-not-text", {"prompts": [1, 2]}, r"prompt"),
    ("orthogonalize", {"orthogonalize": "gram"}, r"unknown orthogonalization 'gram'"),
):
    CASES.append((f"train-{name}", lambda c, out, kw=kw: T(c, out, **kw), pat))


@case("train-out-is-a-file", r"is a file, not a folder")
def _(c, out):
    return T(c, c["root"] / "afile" / "run")


@case("train-lm-not-a-model", r"no such folder or \.gguf file")
def _(c, out):
    return melbo.train("./no/such/model", P, out=out, show_progress=False)


@case("train-resume-without-out", r"resume")
def _(c, out):
    return melbo.train(c["lm"], P, resume=True, show_progress=False)


@case("bank-index", r"vector index 5 is outside the bank, which has 2 vectors")
def _(c, out):
    return c["bank"][5]


@case("bank-index-text", r"bank index must be an integer, got 'zero'")
def _(c, out):
    return c["bank"]["zero"]


@case("bank-generate-vectors", r"vector index 7 is outside the bank")
def _(c, out):
    return c["bank"].generate(P, vectors=[7])


@case("bank-generate-scale", r"scale must be a finite number, got nan")
def _(c, out):
    return c["bank"].generate(P, scale=float("nan"))


@case("bank-kl-reference", r"vector index 9 is outside the bank")
def _(c, out):
    return c["bank"].kl(P, reference=9)


@case("bank-width-vs-metadata", r"bank vectors are 16 wide, but its metadata says hidden_size=32")
def _(c, out):
    bank = melbo.Bank({"vectors": torch.ones(2, 16)}, dict(c["bank"].meta))
    return bank.attach(c["lm"])


@case("bank-attach-other-model", r"gpt2|model")
def _(c, out):
    bank = melbo.Bank({"vectors": torch.ones(2, 32)}, {**c["bank"].meta, "model_type": "gpt2"})
    return bank.attach(c["lm"])


@case("bank-save-into-file", r"is a file, not a folder")
def _(c, out):
    return c["bank"].save(c["root"] / "afile" / "bank.safetensors")


@case("bank-load-missing", r"bank '.*none.safetensors' does not exist")
def _(c, out):
    return melbo.Bank.load(c["root"] / "none.safetensors")


@case("bank-load-not-safetensors", r"is not a readable safetensors file")
def _(c, out):
    return melbo.Bank.load(c["root"] / "afile")


@case("vector-add-widths", r"cannot add steering vectors of widths 32 and 16")
def _(c, out):
    return c["bank"][0] + melbo.SteeringVector(torch.ones(16), layer=c["bank"].layer)


@case("vector-add-layers", r"layer")
def _(c, out):
    v = c["bank"][0]
    return v + melbo.SteeringVector(v.vector, layer=v.layer + 1)


@case("vector-times-nan", r"finite")
def _(c, out):
    return c["bank"][0] * float("nan")


@case("vector-times-text", r"number")
def _(c, out):
    return c["bank"][0] * "two"


@case("vector-rescaled-neg", r"norm")
def _(c, out):
    return c["bank"][0].rescaled(-1)


@case("vector-nan", r"NaN or inf")
def _(c, out):
    return melbo.SteeringVector(torch.full((32,), float("nan")), layer=1)


@case("vector-2d", r"1-D|shape")
def _(c, out):
    return melbo.SteeringVector(torch.ones(2, 32), layer=1)


@case("vector-apply-other-model", r"d_model")
def _(c, out):
    return melbo.SteeringVector(torch.ones(16), layer=1).apply(c["lm"])


@case("vector-apply-positions", r"unknown steering positions 'middle'; allowed: all, prompt, generated")
def _(c, out):
    return c["bank"][0].apply(c["lm"], positions="middle")


@case("vector-load-missing", r"steering vector '.*none.safetensors' does not exist")
def _(c, out):
    return melbo.SteeringVector.load(c["root"] / "none.safetensors")


@case("adapter-plus-vector", r"adapter|vector")
def _(c, out):
    return c["adapters"][0] + c["bank"][0]


@case("ortho-no-prompts", r"MELBO-ortho needs prompts")
def _(c, out):
    return melbo.ortho(melbo.SteeringVector(torch.ones(32), layer=1), lm=c["lm"])


@case("ortho-no-model", r"MELBO-ortho needs the model")
def _(c, out):
    return melbo.ortho(melbo.SteeringVector(torch.ones(32), layer=1), prompts=P)


@case("ortho-zero-vector", r"zero|norm")
def _(c, out):
    return melbo.ortho(melbo.SteeringVector(torch.zeros(32), layer=1), prompts=P, lm=c["lm"], out=out)


@case("calibrate-bracket", r"bracket")
def _(c, out):
    return melbo.calibrate(c["lm"], P, bracket=(5.0, 1.0))


@case("calibrate-lam", r"λ|lam")
def _(c, out):
    return melbo.calibrate(c["lm"], P, lam=-1)


@case("calibrate-layer", r"source layer 9")
def _(c, out):
    return melbo.calibrate(c["lm"], P, source_layer=9)


@case("generation-config", r"max new tokens must be a whole number")
def _(c, out):
    return melbo.train(c["lm"], P, generation=melbo.GenerationConfig(max_new_tokens=0), num_vectors=1, steps=1, out=out)


def test_the_library_catalog_has_at_least_50_cases():
    assert len(CASES) >= 50, len(CASES)
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("cid, fn, pattern", CASES, ids=[c[0] for c in CASES])
def test_library_bad_input_is_a_melbo_error_and_writes_nothing(ctx, tmp_path, cid, fn, pattern):
    before = sorted(p.name for p in ctx["root"].iterdir())
    out = tmp_path / "out"
    with pytest.raises(melbo.MelboError) as e:
        fn(ctx, out)
    assert re.search(pattern, str(e.value)), str(e.value)
    assert not out.exists()
    assert sorted(p.name for p in ctx["root"].iterdir()) == before
