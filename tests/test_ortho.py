"""MELBO-ortho (METHOD.md section 3): orthogonality, the loss falls, stopping rules, a run."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from conftest import tiny_loaded
from melbo.bank import load_bank
from melbo.errors import MelboError
from melbo.objective import Slice
from melbo.ortho import (OrthoConfig, max_abs_cosine, ortho_loss, ortho_target, read_vector_file, run_ortho,
                         train_ortho)
from melbo.prompts import encode_prompts


@functools.lru_cache(maxsize=None)
def loud_model(arch: str):
    """A tiny random model whose blocks write much more than their random init does (weights
    x10), so that, as in real models, what the blocks write can stand in for θ₀ itself."""
    lm = tiny_loaded(arch)
    with torch.no_grad():
        for block in lm.blocks:
            for p in block.parameters():
                if p.dim() == 2:
                    p.mul_(10)
    return lm


def _setup(arch="llama"):
    lm = loud_model(arch)
    s = Slice(lm.model, lm.blocks, encode_prompts(lm.tokenizer, ["Hello there, friend"]), 0, 3)
    base = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    return lm, s, base / base.norm() * s.mean_norm()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ortho_vectors_orthogonal_and_loss_falls(arch):
    lm, s, base = _setup(arch)
    res = train_ortho(s, base, OrthoConfig(num_vectors=3, steps=100, lr=0.2, min_norm=0), show_progress=False)
    assert res.stop_reason == "num_vectors" and res.vectors.shape == (4, lm.d_model)
    assert torch.equal(res.vectors[0], base)
    assert max_abs_cosine(res.vectors) <= 1e-5
    target = ortho_target(s, base)
    for r in res.results:
        assert r.loss < 0.5 * r.start_loss  # falls well below its start
        assert r.start_loss == pytest.approx(ortho_loss(s, torch.zeros(1, lm.d_model), target).item(), rel=1e-5)
    # the loss at θ₀ itself is 0
    assert ortho_loss(s, base[None], target).item() < 1e-4


def test_ortho_stops_on_min_norm_and_bad_input():
    lm, s, base = _setup()
    res = train_ortho(s, base, OrthoConfig(num_vectors=3, steps=5, lr=0.2, min_norm=1e6), show_progress=False)
    assert res.stop_reason == "min_norm" and len(res.vectors) == 1 and res.rejected_norm < 1e6
    with pytest.raises(MelboError, match="zero"):
        train_ortho(s, torch.zeros(lm.d_model), OrthoConfig(num_vectors=1, steps=1), show_progress=False)
    with pytest.raises(MelboError, match="minimum norm"):
        OrthoConfig(min_norm=-1)


def test_ortho_more_than_room_stops_cleanly():
    """Asking for more vectors than the complement has room for stops (empty complement, or
    vectors shrunk to float noise) with orthogonal rows, never with noise directions."""
    lm, s, base = _setup()
    d = lm.d_model
    res = train_ortho(s, base, OrthoConfig(num_vectors=d + 3, steps=10, lr=0.2, min_norm=0), show_progress=False)
    assert res.stop_reason in ("full_basis", "min_norm") and 2 <= len(res.vectors) <= d
    assert max_abs_cosine(res.vectors) <= 1e-5


def test_run_ortho_writes_bank_and_plots(tmp_path):
    lm, s, base = _setup()
    out = tmp_path / "ortho"
    summary = run_ortho(lm, str(out), base, ["Hello there, friend"], 0, 3,
                        OrthoConfig(num_vectors=3, steps=20, lr=0.2, min_norm=0), base_info={"vector": 7},
                        window=2, show_progress=False)
    bank = load_bank(out / "bank.safetensors")
    assert len(bank) == 4 and bank.meta["method"] == "melbo-ortho" and bank.meta["source_layer"] == 0
    assert bank.meta["requested_vectors"] == 3 and bank.meta["base"] == {"vector": 7}
    for f in ("kl.png", "norms.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (out / "measures.csv").read_text().splitlines()
    assert rows[0] == "index,norm,kl_to_base,kl_to_unsteered" and len(rows) == 5
    assert summary["kl_to_base"][0] < 1e-6 and summary["norms"][0] == pytest.approx(float(base.norm()), rel=1e-5)
    assert json.loads((out / "summary.json").read_text())["num_vectors"] == 3
    assert "KL(P_k ‖ P_0)" in (out / "summary.md").read_text()
    with pytest.raises(MelboError, match="already holds a bank"):
        run_ortho(lm, str(out), base, ["Hello"], 0, 3, OrthoConfig(num_vectors=1, steps=1), show_progress=False)


def test_read_vector_file(tmp_path):
    from safetensors.torch import save_file

    v = torch.arange(6, dtype=torch.float32)
    np.save(tmp_path / "v.npy", v.numpy())
    save_file({"vector": v}, str(tmp_path / "v.safetensors"))
    save_file({"a": v, "b": v.clone()}, str(tmp_path / "two.safetensors"))
    assert torch.equal(read_vector_file(str(tmp_path / "v.npy")), v[None])
    assert torch.equal(read_vector_file(str(tmp_path / "v.safetensors")), v[None])
    with pytest.raises(MelboError, match="name one"):
        read_vector_file(str(tmp_path / "two.safetensors"))
    with pytest.raises(MelboError, match="does not exist"):
        read_vector_file(str(tmp_path / "nope.npy"))


# ------------------------------------------------------------ the CLI

def test_cli_ortho_and_plot(tmp_path, capsys):
    from conftest import char_tokenizer, tiny_model
    from melbo.bank import Bank, model_meta, save_bank
    from melbo.cli import main
    from melbo.models import wrap_model

    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    lm = wrap_model(tiny_model("llama"), char_tokenizer(), name=str(model_dir))
    vecs = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    save_bank(tmp_path / "b" / "bank.safetensors",
              Bank(vecs, {**model_meta(lm), "source_layer": 0, "target_layer": 2, "prompts": ["Hello there"]}))

    def run(argv):
        with pytest.raises(SystemExit) as e:
            main(argv)
        out = capsys.readouterr()
        return e.value.code, out.out, out.err

    code, out, err = run(["ortho", "--bank", str(tmp_path / "b" / "bank.safetensors"), "--vector", "1",
                          "--num-vectors", "2", "--steps", "5", "--min-norm", "0", "--out", str(tmp_path / "o"),
                          "--device", "cpu"])
    assert code == 0, err
    assert "MELBO-ortho: 2 vectors orthogonal" in out and "KL(P_k ‖ P_0)" in out
    bank = load_bank(tmp_path / "o" / "bank.safetensors")
    assert torch.equal(bank.vectors[0], vecs[1]) and bank.meta["source_layer"] == 0
    code, out, err = run(["plot", "--bank", str(tmp_path / "b" / "bank.safetensors"), "--reference", "2",
                          "--direction", "ref||k", "--out", str(tmp_path / "p"), "--device", "cpu"])
    assert code == 0, err
    assert "KL(P_2 ‖ P_k)" in out and (tmp_path / "p" / "kl.png").is_file()
    rows = (tmp_path / "p" / "measures.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[3].split(",")[2] == "0"
    code, _, err = run(["plot", "--bank", str(tmp_path / "b" / "bank.safetensors"), "--reference", "7"])
    assert code == 2 and "outside the bank" in err
    code, _, err = run(["ortho", "--out", str(tmp_path / "x")])
    assert code == 2 and "exactly one of --bank" in err
