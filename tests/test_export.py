"""llama.cpp control vectors (write, read back as llama.cpp reads them, refuse what it refuses) and
``melbo export``. The proof in llama.cpp itself is benchmarks/llama_cpp_check.py (opt-in)."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter

import melbo
from melbo.bank import Bank
from melbo.cli import main
from melbo.core.control_vector import ControlVector, read_control_vector, write_control_vector
from melbo.core.errors import MelboError


def vector_bank(layer=2, n=4, d=8, num_layers=4):
    torch.manual_seed(0)
    meta = {
        "method": "melbo",
        "source_layer": layer,
        "target_layer": num_layers - 1,
        "radius": 3.0,
        "model": "tiny",
        "model_type": "gemma3_text",
        "num_layers": num_layers,
        "hidden_size": d,
    }
    return Bank({"vectors": torch.randn(n, d), "random_vectors": torch.randn(n, d)}, meta)


def test_round_trip_and_the_fields_llama_cpp_reads(tmp_path):
    bank = vector_bank()
    path = melbo.export_gguf(bank, [1, 3], tmp_path / "cv.gguf", scale=-0.5)
    reader = GGUFReader(str(path))
    f = reader.fields["general.architecture"]
    assert bytes(f.parts[f.data[0]]).decode() == "controlvector"
    hint = reader.fields["controlvector.model_hint"]
    assert bytes(hint.parts[hint.data[0]]).decode() == "gemma3"  # llama.cpp's name for gemma3_text
    assert int(reader.fields["controlvector.layer_count"].parts[-1][0]) == 1
    (t,) = reader.tensors
    assert t.name == "direction.2" and t.tensor_type.name == "F32" and np.asarray(t.data).shape == (8,)
    want = -0.5 * (bank.vectors[1] + bank.vectors[3])
    assert torch.allclose(torch.from_numpy(np.asarray(t.data).copy()), want)
    (back,) = melbo.vectors_from_gguf(path, model="tiny")
    assert back.layer == 2 and torch.allclose(back.vector, want)
    # steering with the read-back vector is steering with the sum
    assert torch.allclose((-0.5 * (bank[1] + bank[3])).vector, back.vector)


def test_layer_zero_and_bad_directions_are_refused(tmp_path):
    with pytest.raises(MelboError, match="after block 0, which llama.cpp control vectors cannot steer"):
        melbo.export_gguf(vector_bank(layer=0), [0], tmp_path / "a.gguf")
    with pytest.raises(MelboError, match="rejects k = 0"):
        write_control_vector(tmp_path / "b.gguf", ControlVector({0: torch.ones(4)}))
    with pytest.raises(MelboError, match="same width"):
        write_control_vector(tmp_path / "c.gguf", ControlVector({1: torch.ones(4), 2: torch.ones(5)}))
    with pytest.raises(MelboError, match="NaN or inf"):
        write_control_vector(tmp_path / "d.gguf", ControlVector({1: torch.tensor([1.0, float("nan")])}))
    with pytest.raises(MelboError, match="vector index 9 is outside"):
        melbo.export_gguf(vector_bank(), [9], tmp_path / "e.gguf")
    assert not list(tmp_path.iterdir())  # nothing half written


def test_negative_source_layer_resolves_and_random_rows_export(tmp_path):
    bank = vector_bank(layer=-1)
    (v,) = melbo.vectors_from_gguf(melbo.export_gguf(bank, "0", tmp_path / "r.gguf", random=True))
    assert v.layer == 3 and torch.allclose(v.vector, bank.random_vectors[0])


def write_raw(path, arch="controlvector", tensors=None):
    w = GGUFWriter(str(path), arch)
    for name, arr in (tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "arch, tensors, message",
    [
        ("llama", {"direction.1": np.ones(4, np.float32)}, "architecture 'llama', not a control vector"),
        ("controlvector", {"direction.0": np.ones(4, np.float32)}, "expected direction.<k> with k >= 1"),
        ("controlvector", {"token_embd": np.ones(4, np.float32)}, "holds tensor 'token_embd'"),
        ("controlvector", {"direction.1": np.ones(4, np.float16)}, "is F16, expected F32"),
        ("controlvector", {"direction.1": np.ones((2, 4), np.float32)}, "expected 1-D"),
        (
            "controlvector",
            {"direction.1": np.ones(4, np.float32), "direction.2": np.ones(3, np.float32)},
            "different widths",
        ),
        ("controlvector", {}, "holds no direction"),
    ],
)
def test_reading_checks_like_llama_cpp(tmp_path, arch, tensors, message):
    with pytest.raises(MelboError, match=message):
        read_control_vector(write_raw(tmp_path / "x.gguf", arch, tensors))


def test_not_gguf_and_missing(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(MelboError, match="not a readable GGUF file"):
        read_control_vector(tmp_path / "x.gguf")
    with pytest.raises(MelboError, match="does not exist"):
        read_control_vector(tmp_path / "nope.gguf")


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_export_gguf_and_vector(tmp_path, capsys):
    bank = vector_bank()
    bank.save(tmp_path / "run")
    code, out, err = run(
        ["export", "gguf", "--bank", str(tmp_path / "run"), "--vectors", "2", "--out", str(tmp_path / "v.gguf")],
        capsys,
    )
    assert code == 0, err
    assert "direction.2, 8 floats" in out
    (v,) = melbo.vectors_from_gguf(tmp_path / "v.gguf")
    assert torch.allclose(v.vector, bank.vectors[2])
    argv = ["export", "vector", "--bank", str(tmp_path / "run"), "--vector", "1"]
    code, out, err = run([*argv, "--out", str(tmp_path / "v.safetensors")], capsys)
    assert code == 0, err
    sv = melbo.SteeringVector.load(tmp_path / "v.safetensors")
    assert sv.layer == 2 and torch.allclose(sv.vector, bank.vectors[1])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vectors", "7"], "vector index 7 is outside the bank"),
        (["--vectors", "x"], "bad vector choice 'x'"),
        (["--vectors", "0", "--scale", "nan"], "scale"),
        (["--vectors", "0", "--out", "{tmp}/v.txt"], "should end in .gguf"),
        (["--vectors", "0", "--out", "{tmp}/none/v.gguf"], "does not exist"),
        (["--vectors", "0", "--bank", "{tmp}/empty"], "holds no bank.safetensors"),
        (["--vectors", "0", "--bank", "{tmp}/layer0"], "after block 0"),
    ],
)
def test_cli_export_bad_inputs(tmp_path, capsys, args, message):
    vector_bank().save(tmp_path / "run")
    vector_bank(layer=0).save(tmp_path / "layer0")
    (tmp_path / "empty").mkdir()
    argv = ["export", "gguf", "--bank", str(tmp_path / "run"), "--out", str(tmp_path / "v.gguf")]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, _, err = run(argv, capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "v.gguf").exists()


def test_a_zero_control_vector_is_refused(tmp_path):
    bank = vector_bank()
    v = bank.vectors[0]
    cancel = Bank({**bank.tensors, "vectors": torch.stack([v, -v])}, bank.meta)
    for b, rows, scale in ((bank, [0], 0.0), (cancel, [0, 1], 1.0)):  # was: a zero vector written, exit code 0
        with pytest.raises(MelboError, match=r"the control vector for block 2 is zero .*it would steer nothing"):
            melbo.export_gguf(b, rows, tmp_path / "z.gguf", scale)
    assert not list(tmp_path.iterdir())
