"""The real ``melbo`` process fed what a shell can feed it: argv bytes that are not UTF-8, and
``melbo chat`` with stdin at EOF or closed. Each ends without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import char_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[2]
MELBO = [sys.executable, "-c", "from melbo.cli import main; main()"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny model on disk and a MELBO run folder made for it."""
    root = tmp_path_factory.mktemp("stdin")
    model = root / "model"
    tiny_model("llama").save_pretrained(model)
    char_tokenizer().save_pretrained(model)
    argv = ["train", "--model", str(model), "--prompt", "Hello there.", "--num-vectors", "2", "--steps", "1"]
    argv += ["--radius", "2", "--max-new-tokens", "2", "--out", str(root / "run")]
    done = subprocess.run(MELBO + argv, capture_output=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return root / "run"


def test_a_prompt_that_is_not_utf8_bytes_is_refused_by_name(tmp_path):
    out = tmp_path / "out"
    argv = [b"train", b"--model", b"nowhere/model", b"--prompt", b"\xff\xfe", b"--out", os.fsencode(out)]
    done = subprocess.run(MELBO + argv, capture_output=True, env=ENV, timeout=600)
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "error: the value of --prompt ('\ufffd\ufffd') is not UTF-8 text (byte 0xff); "
        "give command-line arguments (prompts, paths, names) as UTF-8"
    )
    assert not out.exists()


@pytest.mark.parametrize("stdin", ["eof", "closed"])
def test_chat_with_no_input_ends_cleanly_and_writes_nothing(run_dir, tmp_path, stdin):
    transcript = tmp_path / "chat.jsonl"
    argv = ["chat", "--bank", str(run_dir), "--max-new-tokens", "2", "--transcript", str(transcript)]
    how = {"stdin": subprocess.DEVNULL} if stdin == "eof" else {"stdin": None, "preexec_fn": lambda: os.close(0)}
    done = subprocess.run(MELBO + argv, capture_output=True, env=ENV, timeout=600, **how)
    text = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, text[-2000:]
    assert "Traceback" not in text and "Error" not in text, text[-2000:]
    if stdin == "closed":
        assert "stdin is closed" in done.stderr.decode(), text[-2000:]
    else:
        assert "you> " in done.stdout.decode()  # it asked, read EOF, and ended
    assert not transcript.exists()  # nothing was said: no transcript
