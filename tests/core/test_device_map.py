"""A model spread over two places with accelerate's device_map (half its blocks in CPU memory, half
offloaded to disk and loaded block by block, the only two "devices" of a CPU-only machine) gives
the same steering vectors, adapters, DCT factors and completions as the model on one device."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import char_tokenizer, tiny_model

import melbo
from melbo.cli import main
from melbo.core.errors import MelboError
from melbo.core.models import load_model

SPLIT = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "cpu",
    "model.layers.2": "disk",
    "model.layers.3": "disk",
    "model.norm": "disk",
    "lm_head": "disk",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def test_split_model_matches_one_device(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("MELBO_CACHE", str(tmp_path / "cache"))
    one = load_model(str(folder), "cpu", "float32")
    two = load_model(str(folder), "cpu", "float32", device_map=SPLIT)
    assert two.model.hf_device_map == SPLIT
    assert any(p.device.type == "meta" for p in two.blocks[3].parameters())  # really offloaded
    for method, src in (("melbo", 2), ("dct", 1), ("adapter", 2)):
        kw: dict = dict(num_vectors=2, radius="2", source_layer=src, target_layer=3, evaluate=False)
        if method != "dct":
            kw["steps"] = 4
        a = melbo.train(one, "The cat sat on the mat.", method, show_progress=False, **kw)
        b = melbo.train(two, "The cat sat on the mat.", method, show_progress=False, **kw)
        for key in a.tensors:
            assert torch.allclose(a.tensors[key], b.tensors[key], atol=1e-5), (method, key)
    bank = melbo.train(one, "The cat sat.", num_vectors=2, steps=3, radius="4", evaluate=False, show_progress=False)
    here = bank.generate(["The cat", "A dog"], max_new_tokens=8)
    bank.attach(two)
    assert bank.generate(["The cat", "A dog"], max_new_tokens=8) == here


def test_cli_device_map_and_bad_maps(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MELBO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["train", "--model", str(folder), "--prompt", "The cat sat.", "--num-vectors", "2", "--steps", "2"]
    with pytest.raises(SystemExit) as e:
        main(args + ["--radius", "2", "--device", "cpu", "--device-map", json.dumps(SPLIT), "--out", str(out)])
    assert e.value.code == 0 and (out / "bank.safetensors").is_file()
    for bad, message in (("middle", "device map 'middle' is not allowed"), ("{oops", "is not a JSON object")):
        with pytest.raises(SystemExit) as e:
            main(args + ["--device-map", bad, "--out", str(tmp_path / "bad")])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(MelboError, match=r"device map \[1, 2\] is not allowed"):
        load_model(str(folder), "cpu", "float32", device_map=[1, 2])  # type: ignore[arg-type]
