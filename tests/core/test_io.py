"""Files: atomic, fsynced, umask-respecting writes; UTF-8 whatever the locale; checked reads."""

import errno
import os
import stat
import subprocess
import sys

import pytest
import torch

from melbo.core.errors import MelboError
from melbo.core.io import (
    TEMP_PREFIX,
    atomic_folder,
    atomic_write,
    load_tensors,
    read_json,
    read_text,
    remove_stale_temps,
    save_tensors,
    write_json,
    write_text,
)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        f = write_text(tmp_path / "a.txt", "x")
        t = save_tensors(tmp_path / "b.safetensors", {"x": torch.zeros(2)}, {}, "melbo.test/1")
        with atomic_folder(tmp_path / "folder") as work:
            write_text(work / "inner.txt", "y")
        plain = tmp_path / "plain.txt"
        plain.write_text("z")
    finally:
        os.umask(old)
    assert mode(f) == mode(t) == mode(plain) == 0o666 & ~umask
    assert mode(tmp_path / "folder") == 0o777 & ~umask


def test_atomic_write_fsyncs_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    write_text(tmp_path / "a.txt", "x")
    assert len(synced) >= 2  # the file, then the folder after the rename


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_disk_full_is_a_clear_error_and_nothing_half_written(tmp_path):
    target = tmp_path / "bank.safetensors"

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(MelboError, match="no space left on the device"):
        atomic_write(target, full)
    assert list(tmp_path.iterdir()) == []


def test_utf8_outputs_under_the_c_locale(tmp_path):
    """θ, ‖, → and a CJK prompt survive a process whose locale encoding is ASCII."""
    text = "θ ‖Z(θ) − Z(0)‖ → 猫"
    code = (
        "import sys; from melbo.core.io import write_text, write_json; "
        f"write_text(sys.argv[1] + '/t.md', {ascii(text)}); write_json(sys.argv[1] + '/t.json', {{'p': {ascii(text)}}})"
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "ascii"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env)
    assert (tmp_path / "t.md").read_text(encoding="utf-8") == text
    assert read_json(tmp_path / "t.json") == {"p": text}


def test_read_text_names_the_bad_byte(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_bytes(b"ok\n\xff\xfe bad")
    with pytest.raises(MelboError, match=r"prompts file .*prompts.txt' is not UTF-8 text \(byte 3 is 0xff\)"):
        read_text(p, "prompts file")
    with pytest.raises(MelboError, match="cannot read"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "bad.json").write_text("{1: 2}")
    with pytest.raises(MelboError, match="not valid JSON .line 1, column 2"):
        read_json(tmp_path / "bad.json")


def test_tensor_files_check_format_tag_and_contents(tmp_path):
    p = save_tensors(tmp_path / "x.safetensors", {"v": torch.ones(2, 3)}, {"a": 1}, "melbo.one/1")
    tensors, meta = load_tensors(p, "melbo.one/1", "thing", ("v",))
    assert meta == {"a": 1, "format": "melbo.one/1"} and tensors["v"].shape == (2, 3)
    with pytest.raises(MelboError, match="has format 'melbo.one/1', not a melbo other"):
        load_tensors(p, "melbo.two/1", "other")
    with pytest.raises(MelboError, match="has no tensor 'w'"):
        load_tensors(p, "melbo.one/1", "thing", ("w",))
    with pytest.raises(MelboError, match="NaN or inf"):
        save_tensors(tmp_path / "nan.safetensors", {"v": torch.tensor([float("nan")])}, {}, "melbo.one/1")
    assert not (tmp_path / "nan.safetensors").exists()
    data = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MelboError, match="not a readable safetensors file"):
        load_tensors(tmp_path / "cut.safetensors", "melbo.one/1", "thing")


def test_atomic_folder_and_stale_temps(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "out") as work:
            write_json(work / "a.json", {})
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / f"{TEMP_PREFIX}bank.safetensors-x.tmp").write_text("left by SIGKILL")
    (tmp_path / "bank.safetensors").write_text("kept")
    assert [p.name for p in remove_stale_temps(tmp_path)] == [f"{TEMP_PREFIX}bank.safetensors-x.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]
