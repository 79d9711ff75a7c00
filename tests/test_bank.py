"""Vector bank files: round trip, atomic writes, model checks, vector choice."""


import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_loaded
from melbo.bank import Bank, check_bank, load_bank, model_meta, save_bank, select_vectors
from melbo.errors import MelboError


def test_round_trip(tmp_path):
    lm = tiny_loaded("llama")
    v, r = torch.randn(3, 32), torch.randn(3, 32)
    meta = {**model_meta(lm), "source_layer": 1, "target_layer": 3, "radius": 2.5, "p": 2.0, "q": 1.0,
            "positions": "all", "prompts": ["a"], "vectors": [{"objective": 1.0}] * 3}
    path = save_bank(tmp_path / "b" / "bank.safetensors", Bank(v, meta, {"random_vectors": r}))
    b = load_bank(path)
    torch.testing.assert_close(b.vectors, v)
    torch.testing.assert_close(b.random_vectors, r)
    assert b.vectors.dtype == torch.float32
    assert b.meta["radius"] == 2.5 and b.meta["num_vectors"] == 3 and b.meta["format"] == "melbo.bank/1"
    assert b.meta["melbo_version"]
    assert list(tmp_path.joinpath("b").iterdir()) == [path]  # no temporary file left
    check_bank(b, lm)


def test_bank_from_another_model_is_refused(tmp_path):
    lm = tiny_loaded("llama")
    other = tiny_loaded("gpt2")
    path = save_bank(tmp_path / "bank.safetensors", Bank(torch.randn(2, 32), model_meta(other)))
    with pytest.raises(MelboError, match="model_type='gpt2'.*has model_type='llama'"):
        check_bank(load_bank(path), lm)
    meta = model_meta(lm)
    meta["hidden_size"] = 64
    path = save_bank(tmp_path / "bank2.safetensors", Bank(torch.randn(2, 64), meta))
    with pytest.raises(MelboError, match="hidden_size=64"):
        check_bank(load_bank(path), lm)


def test_not_a_bank(tmp_path):
    with pytest.raises(MelboError, match="does not exist"):
        load_bank(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(MelboError, match="not a readable safetensors"):
        load_bank(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(MelboError, match="not a melbo bank"):
        load_bank(tmp_path / "plain.safetensors")


def test_bad_shapes_write_nothing(tmp_path):
    with pytest.raises(MelboError, match=r"\[n, d_model\]"):
        save_bank(tmp_path / "b.safetensors", Bank(torch.randn(4), {}))
    with pytest.raises(MelboError, match="random_vectors"):
        save_bank(tmp_path / "b.safetensors", Bank(torch.randn(2, 4), {}, {"random_vectors": torch.randn(2, 5)}))
    assert list(tmp_path.iterdir()) == []


def test_select_vectors():
    b = Bank(torch.zeros(8, 4), {})
    assert select_vectors(b, None) == list(range(8))
    assert select_vectors(b, "0,3") == [0, 3]
    assert select_vectors(b, "2-4,7") == [2, 3, 4, 7]
    with pytest.raises(MelboError, match="vector index 8 is outside the bank, which has 8"):
        select_vectors(b, "8")
    with pytest.raises(MelboError, match="bad vector choice"):
        select_vectors(b, "x")
