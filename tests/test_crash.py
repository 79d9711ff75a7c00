"""Faults lose nothing: a run SIGKILLed at random moments and resumed gives the same bank as an
uninterrupted one (vectors, adapters, DCT), leaves no temporary file, and a full disk is a clear
error that keeps the last whole bank."""

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_model

import melbo
import melbo.core.io as io_mod
from melbo.bank import Bank
from melbo.core.errors import MelboError
from melbo.core.io import TEMP_PREFIX

PROMPT = "Hello there, world!"
RUNS = {
    "melbo-sequential": ("melbo", dict(num_vectors=6, steps=150, radius="2", batch_vectors=1)),
    "melbo-batched": ("melbo", dict(num_vectors=6, steps=150, radius="2", batch_vectors=2)),
    "adapter": ("adapter", dict(num_vectors=6, steps=100, radius="0.05x", batch=2)),
    "dct": ("dct", dict(num_vectors=4, radius="1", factors=16, iterations=40)),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


def child_code(model_dir, out, method, kw):
    return (
        "import melbo, sys\n"
        f"lm = melbo.load_model({str(model_dir)!r}, device='cpu')\n"
        "print('START', flush=True)\n"
        f"melbo.train(lm, {PROMPT!r}, {method!r}, out={str(out)!r}, evaluate=False, show_progress=False, "
        f"resume={(Path(out) / 'bank.safetensors').exists()!r}, **{kw!r})\n"
    )


@pytest.mark.parametrize("name", sorted(RUNS))
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(name, model_dir, tmp_path):
    method, kw = RUNS[name]
    lm = melbo.load_model(str(model_dir), device="cpu")
    ref = melbo.train(lm, PROMPT, method, out=tmp_path / "ref", evaluate=False, show_progress=False, **kw)
    out = tmp_path / "crash"
    rng = random.Random(f"crash-{name}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kills = 0
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-c", child_code(model_dir, out, method, kw)],
            stdout=subprocess.PIPE,
            env=env,
            cwd=str(tmp_path),
        )
        assert proc.stdout.readline().strip() == b"START"
        time.sleep(rng.uniform(0.05, 0.8))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    resumed = melbo.train(
        lm,
        PROMPT,
        method,
        out=out,
        resume=(out / "bank.safetensors").exists(),
        evaluate=False,
        show_progress=False,
        **kw,
    )
    assert kills >= 1
    assert not [p for p in out.iterdir() if p.name.startswith(TEMP_PREFIX)]
    saved = Bank.load(out)
    assert saved.meta["complete"] is True
    for key in ref.tensors:
        torch.testing.assert_close(resumed.tensors[key], ref.tensors[key], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(saved.tensors[key], ref.tensors[key], atol=1e-6, rtol=1e-5)


def test_ctrl_c_leaves_no_temp_file(model_dir, tmp_path, monkeypatch):
    lm = melbo.load_model(str(model_dir), device="cpu")
    real = io_mod.save_file if hasattr(io_mod, "save_file") else None
    calls = []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(io_mod, "save_file", interrupt)
    with pytest.raises(KeyboardInterrupt):
        melbo.train(
            lm,
            PROMPT,
            out=tmp_path / "run",
            num_vectors=3,
            steps=2,
            radius="2",
            batch_vectors=1,
            evaluate=False,
            show_progress=False,
        )
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert len(Bank.load(tmp_path / "run")) == 1  # the last whole checkpoint


def test_disk_full_keeps_the_last_whole_bank(model_dir, tmp_path, monkeypatch):
    lm = melbo.load_model(str(model_dir), device="cpu")
    real = io_mod.save_file
    calls = []

    def full(data, path, metadata=None):
        calls.append(1)
        if len(calls) >= 2:
            with open(path, "wb") as f:
                f.write(b"partial")  # a half-written temporary file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(data, path, metadata=metadata)

    monkeypatch.setattr(io_mod, "save_file", full)
    with pytest.raises(MelboError, match="no space left on the device"):
        melbo.train(
            lm,
            PROMPT,
            out=tmp_path / "run",
            num_vectors=3,
            steps=2,
            radius="2",
            batch_vectors=1,
            evaluate=False,
            show_progress=False,
        )
    monkeypatch.setattr(io_mod, "save_file", real)
    bank = Bank.load(tmp_path / "run")
    assert len(bank) == 1 and torch.isfinite(bank.vectors).all()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(TEMP_PREFIX)]
