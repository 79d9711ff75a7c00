"""Banks: round trip, format tag, model checks, indexing, the random baseline, generation, KL."""

import pytest
import torch
from conftest import tiny_loaded
from safetensors.torch import save_file

from melbo.bank import BANK_FILE, Bank
from melbo.core.errors import MelboError
from melbo.core.io import save_tensors
from melbo.vector import SteeringAdapter, SteeringVector


def vector_bank(lm, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    meta = {
        **lm.identity(),
        "method": "melbo",
        "source_layer": 1,
        "target_layer": 3,
        "radius": 2.5,
        "prompts": ["Hello there"],
        "vectors": [{"objective": float(i), "cosine_start_end": 0.5} for i in range(n)],
        "random_objectives": [0.1] * n,
    }
    return Bank(
        {"vectors": torch.randn(n, lm.d_model, generator=g), "random_vectors": torch.randn(n, lm.d_model, generator=g)},
        meta,
        lm,
    )


def test_round_trip_folder_and_file(tmp_path):
    lm = tiny_loaded("llama")
    b = vector_bank(lm)
    path = b.save(tmp_path / "run")
    assert path == tmp_path / "run" / BANK_FILE
    assert [p.name for p in (tmp_path / "run").iterdir()] == [BANK_FILE]  # no temporary file left
    c = Bank.load(tmp_path / "run", lm)
    torch.testing.assert_close(c.vectors, b.vectors)
    torch.testing.assert_close(c.random_vectors, b.random_vectors)
    assert c.meta["format"] == "melbo.bank/1" and c.meta["melbo_version"] and c.meta["rows"] == 3
    assert c.meta["radius"] == 2.5 and c.lm is lm
    d = Bank.load(b.save(tmp_path / "single.safetensors"))
    torch.testing.assert_close(d.vectors, b.vectors)


def test_indexing_gives_steering_vectors_and_arithmetic():
    lm = tiny_loaded("llama")
    b = vector_bank(lm)
    v = b[1]
    assert isinstance(v, SteeringVector) and v.layer == 1 and v.label == "vector 1" and v.model == lm.name
    torch.testing.assert_close(v.vector, b.vectors[1])
    assert v.meta["objective"] == 1.0 and v.meta["target_layer"] == 3
    w = b[0] - 0.5 * b[2]
    torch.testing.assert_close(w.vector, b.vectors[0] - 0.5 * b.vectors[2])
    assert b[-1].label == "vector 2" and len(list(b)) == 3
    with pytest.raises(MelboError, match="vector index 3 is outside the bank, which has 3 vectors"):
        b[3]
    sub = b.subset("0,2")
    assert len(sub) == 2 and sub.info(1) == b.info(2)
    r = b.random
    assert r is not None and len(r) == 3 and r[0].label == "random vector 0"
    torch.testing.assert_close(r.vectors, b.random_vectors)
    rows = b.table()
    assert (
        rows[2]["index"] == 2
        and rows[2]["objective"] == 2.0
        and rows[0]["norm"] == pytest.approx(float(b.vectors[0].norm()))
    )


def test_format_tag_and_not_a_bank(tmp_path):
    with pytest.raises(MelboError, match="does not exist"):
        Bank.load(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(MelboError, match="not a readable safetensors"):
        Bank.load(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(MelboError, match="not a melbo bank .no 'melbo' metadata"):
        Bank.load(tmp_path / "plain.safetensors")
    save_tensors(tmp_path / "other.safetensors", {"vectors": torch.zeros(2, 4)}, {}, "melbo.vector/1")
    with pytest.raises(MelboError, match="has format 'melbo.vector/1', not a melbo bank"):
        Bank.load(tmp_path / "other.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MelboError, match="holds no bank.safetensors"):
        Bank.load(tmp_path / "empty")


def test_bad_shapes_write_nothing(tmp_path):
    with pytest.raises(MelboError, match=r"\[n, d_model\]"):
        Bank({"vectors": torch.randn(4)}, {})
    with pytest.raises(MelboError, match="random_vectors"):
        Bank({"vectors": torch.randn(2, 4), "random_vectors": torch.randn(2, 5)}, {})
    with pytest.raises(MelboError, match="needs a tensor 'vectors'"):
        Bank({}, {})
    with pytest.raises(MelboError, match="kind 'blob' is unknown"):
        Bank({"vectors": torch.randn(2, 4)}, {"kind": "blob"})
    b = Bank({"vectors": torch.tensor([[float("inf"), 0.0]])}, {})
    with pytest.raises(MelboError, match="NaN or inf"):
        b.save(tmp_path / "run")
    assert not (tmp_path / "run" / BANK_FILE).exists()


def test_bank_from_another_model_is_refused(tmp_path):
    lm, other = tiny_loaded("llama"), tiny_loaded("gpt2")
    vector_bank(other).save(tmp_path / "b")
    with pytest.raises(MelboError, match="model_type='gpt2'.*has model_type='llama'"):
        Bank.load(tmp_path / "b", lm)
    meta = lm.identity()
    meta["hidden_size"] = 64
    with pytest.raises(MelboError, match="hidden_size=64"):
        Bank({"vectors": torch.randn(2, 32)}, meta)


def test_generate_labels_and_unsteered_row():
    lm = tiny_loaded("llama")
    b = vector_bank(lm)
    out = b.generate(["Hello", "Hi"], vectors="0,2", max_new_tokens=4)
    assert list(out) == ["unsteered", "vector 0", "vector 2"] and all(len(v) == 2 for v in out.values())
    zero = Bank({"vectors": torch.zeros(1, lm.d_model)}, {**b.meta, "vectors": []}, lm)
    assert zero.generate(["Hello"], max_new_tokens=4)["vector 0"] == out["unsteered"][:1]
    rand = b.generate(["Hello"], vectors=[1], random=True, unsteered=False, max_new_tokens=4)
    assert list(rand) == ["random vector 1"]
    assert b[0].generate(lm, "Hello", max_new_tokens=4) == out["vector 0"][:1]


def test_kl_against_reference_and_unsteered():
    lm = tiny_loaded("llama")
    b = vector_bank(lm)
    kl = b.kl(["Hello there"], reference=0)
    assert kl.to_reference is not None and kl.to_reference[0] == pytest.approx(0.0, abs=1e-6)
    assert (kl.to_unsteered > 0).all() and kl.to_unsteered.shape == (3,)
    sub = b.kl(["Hello there"], reference=0, vectors=[2])
    assert sub.to_unsteered[0] == pytest.approx(float(kl.to_unsteered[2]), rel=1e-5)


def test_adapter_bank_indexing():
    lm = tiny_loaded("llama")
    a, bb = (
        torch.nn.functional.normalize(torch.randn(2, 64, 4), dim=-1),
        torch.nn.functional.normalize(torch.randn(2, 32, 4), dim=-2),
    )
    meta = {
        **lm.identity(),
        "kind": "adapter",
        "method": "adapter",
        "radius": 0.5,
        "source_layer": 1,
        "module_name": "model.layers.1.mlp.down_proj",
    }
    bank = Bank({"omega_a": a, "omega_b": bb}, meta, lm)
    ad = bank[1]
    assert isinstance(ad, SteeringAdapter) and ad.radius == 0.5 and len(bank) == 2
    with pytest.raises(MelboError, match="holds adapters, not vectors"):
        _ = bank.vectors
    with pytest.raises(MelboError, match="cannot be added"):
        ad + ad
    assert (2 * ad).radius == 1.0


def test_empty_banks_wrong_shapes_and_wrong_types_are_refused(tmp_path):
    lm = tiny_loaded("llama")
    empty = Bank({"vectors": torch.zeros(0, lm.d_model)}, {**vector_bank(lm).meta, "vectors": []}, lm)
    with pytest.raises(MelboError, match=r"the bank holds no vectors \(0 rows\); there is nothing to generate with"):
        empty.generate(["Hi"], max_new_tokens=2)  # was: only the unsteered completion, as if it had worked
    with pytest.raises(MelboError, match=r"bank metadata radius is 'big'; expected a finite number"):
        Bank({"vectors": torch.ones(2, 8)}, {"radius": "big"})
    with pytest.raises(MelboError, match=r"bank metadata num_layers is 2.5; expected an integer"):
        Bank({"vectors": torch.ones(2, 8)}, {"num_layers": 2.5})
    a, b = torch.ones(2, 6, 1), torch.ones(2, 8, 1)
    adapters = {"omega_a": a, "omega_b": b, "random_omega_a": torch.ones(2, 12)}
    with pytest.raises(MelboError, match=r"bank tensor 'random_omega_a' has shape \(2, 12\), expected \[k, 6, 1\]"):
        Bank(adapters, {"kind": "adapter", "module_name": "m", "radius": 1.0})
