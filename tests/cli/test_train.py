"""The CLI end to end on a tiny model saved to disk: run folder, errors (exit 2, nothing
written), resume, generate from a bank."""

import json
import re

import pytest
import torch
from conftest import char_tokenizer, tiny_model

import melbo.methods.melbo as melbo_method
from melbo.bank import Bank
from melbo.cli import main


def saved_tiny(arch, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"tiny-{arch}")
    tiny_model(arch).save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_tiny("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    return saved_tiny("gpt2", tmp_path_factory)


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def train_args(model_dir, out, *extra):
    return [
        "train",
        "--model",
        model_dir,
        "--prompt",
        "The cat sat.",
        "--num-vectors",
        "2",
        "--batch-vectors",
        "1",
        "--steps",
        "5",
        "--radius",
        "2",
        "--max-new-tokens",
        "8",
        "--out",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]


def test_train_writes_run_folder(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(train_args(model_dir, out, "--heldout-prompt", "A dog."), capsys)
    assert code == 0
    assert f"results: {out}/summary.md" in stdout
    assert {p.name for p in out.iterdir()} >= {"bank.safetensors", "completions.jsonl", "summary.md"}
    bank = Bank.load(out)
    assert bank.vectors.shape == (2, 32) and bank.random_vectors.shape == (2, 32)
    m = bank.meta
    for key in (
        "model",
        "model_type",
        "hidden_size",
        "num_layers",
        "source_layer",
        "target_layer",
        "radius",
        "p",
        "q",
        "positions",
        "prompts",
        "steps",
        "lr",
        "seed",
        "melbo_version",
    ):
        assert key in m, key
    assert m["source_layer"] == 1 and m["target_layer"] == 3  # defaults for 4 blocks
    assert len(m["vectors"]) == 2 and all("objective" in v and "cosine_start_end" in v for v in m["vectors"])
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    kinds = {(r["kind"], r["split"]) for r in rows}
    assert kinds == {(k, s) for k in ("unsteered", "learned", "random") for s in ("train", "heldout")}
    assert len(rows) == 2 * (1 + 2 + 2)
    summary = (out / "summary.md").read_text()
    assert "Unsteered" in summary and "random (same R)" in summary


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--source-layer", "3", "--target-layer", "1"], "source layer 3 .* must come before target layer 1"),
        (["--source-layer", "2", "--target-layer", "2"], "must come before"),
        (["--source-layer", "0", "--target-layer", "9"], "target layer 9 is out of range"),
        (["--source-layer", "-9"], "source layer -9 is out of range"),
        (["--radius", "0"], "bad radius '0': R must be finite and > 0"),
        (["--radius", "-1"], "bad radius '-1'"),
        (["--radius", "big"], "bad radius 'big'"),
        (["--p", "0"], "p must be a finite number > 0, got 0"),
        (["--q", "-1"], "q must be a finite number > 0"),
        (["--num-vectors", "0"], "number of vectors must be a whole number in 1..100000, got 0"),
        (["--positions", "last:40"], "positions last:40 go beyond prompt"),
        (["--positions", "50"], "token position 50 is beyond prompt"),
        (["--positions", "sideways"], "bad positions 'sideways'"),
        (["--prompt", ""], "prompt 1 is empty"),
    ],
)
def test_bad_input_exit_2_and_nothing_written(model_dir, tmp_path, capsys, extra, message):
    import re

    out = tmp_path / "run"
    code, _, err = run(train_args(model_dir, out, *extra), capsys)
    assert code == 2
    assert re.search(message, err), err
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert not out.exists()


def test_unknown_model_path(tmp_path, capsys):
    code, _, err = run(train_args(str(tmp_path / "no-model"), tmp_path / "run"), capsys)
    assert code == 2 and "no-model" in err and "no such folder" in err
    assert not (tmp_path / "run").exists()


def test_generate_with_bank_and_refuse_other_model(model_dir, other_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_args(model_dir, out), capsys)[0] == 0
    code, stdout, _ = run(
        [
            "generate",
            "--bank",
            str(out / "bank.safetensors"),
            "--prompt",
            "Hi there",
            "--vectors",
            "1",
            "--scale",
            "-1",
            "--max-new-tokens",
            "5",
        ],
        capsys,
    )
    assert code == 0
    assert "--- unsteered:" in stdout and re.search(r"--- vector 1\b.* x -1:", stdout)
    code, _, err = run(
        ["generate", "--bank", str(out / "bank.safetensors"), "--prompt", "Hi", "--model", other_model_dir], capsys
    )
    assert code == 2 and "bank was made for model" in err
    code, _, err = run(
        ["generate", "--bank", str(out / "bank.safetensors"), "--prompt", "Hi", "--vectors", "5"], capsys
    )
    assert code == 2 and "vector index 5 is outside the bank" in err


def test_existing_run_needs_resume(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_args(model_dir, out), capsys)[0] == 0
    code, _, err = run(train_args(model_dir, out), capsys)
    assert code == 2 and "--resume" in err
    code, _, err = run(train_args(model_dir, tmp_path / "fresh", "--resume"), capsys)
    assert code == 2 and "no bank.safetensors" in err
    code, _, err = run(train_args(model_dir, out, "--resume", "--p", "4"), capsys)
    assert code == 2 and "p=2.0" in err


def test_stopped_run_keeps_its_vectors_and_resume_finishes_it(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = melbo_method.train_vector
    calls = []

    def stop_after_one(slice_, index, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(index)
        return real(slice_, index, *args, **kwargs)

    monkeypatch.setattr(melbo_method, "train_vector", stop_after_one)
    code, _, err = run(train_args(model_dir, out), capsys)  # Ctrl-C: click aborts with 130
    assert code == 130 and "aborted" in err
    first = Bank.load(out)
    assert len(first) == 1 and first.meta["complete"] is False  # saved after every vector
    assert not [p for p in out.iterdir() if p.name.startswith(".melbo-tmp")]  # Ctrl-C leaves no temp file

    monkeypatch.setattr(melbo_method, "train_vector", lambda s, i, *a, **k: (calls.append(i), real(s, i, *a, **k))[1])
    code, _, _ = run(train_args(model_dir, out, "--resume", "--num-vectors", "3"), capsys)
    assert code == 0
    assert calls == [0, 1, 2]  # vector 0 was not trained again
    bank = Bank.load(out)
    assert len(bank) == 3 and bank.meta["complete"] is True
    torch.testing.assert_close(bank.vectors[0], first.vectors[0], rtol=0, atol=0)
    # the resumed run equals an uninterrupted one
    assert run(train_args(model_dir, tmp_path / "full", "--num-vectors", "3"), capsys)[0] == 0
    torch.testing.assert_close(Bank.load(tmp_path / "full").vectors, bank.vectors, atol=1e-5, rtol=1e-4)


def test_help_shows_defaults(capsys):
    code, stdout, _ = run(["train", "--help"], capsys)
    assert code == 0
    for text in (
        "--radius",
        "radius: 'auto'",
        "--p",
        "p: 2.0",
        "--positions",
        "positions: 'all'",
        "--steps",
        "steps: 300",
        "[dct]",
        "positions: 'last:3'",
        "[adapter]",
        "--num-vectors",
        "--source-layer",
        "--resume",
        "--chat",
    ):
        assert text in stdout, text
