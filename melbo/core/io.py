"""Files: every write is whole or absent, every read is checked.

- :func:`atomic_write` writes a temporary file beside the target, flushes and fsyncs it, gives it
  the mode the process umask asks for (``0o666 & ~umask``, as ``open()`` would), renames it over
  the target and fsyncs the folder; on any error (also Ctrl-C) the temporary file is removed.
- :func:`write_text` / :func:`write_json` are UTF-8 (outputs hold θ, ‖, → and prompts in any
  script, whatever the locale).
- :func:`read_text` / :func:`read_json` decode UTF-8 and say which file and byte is bad.
- :func:`save_tensors` / :func:`load_tensors`: safetensors files with one JSON metadata entry
  whose ``format`` tag is checked on load; tensors are checked to be finite. Nothing is ever
  unpickled.
- :func:`atomic_folder`: build a folder in a hidden sibling and rename it into place.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from melbo.core.errors import MelboError

TEMP_PREFIX = ".melbo-tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _os_error(e: OSError, path: Path) -> MelboError:
    why = {
        errno.ENOSPC: "no space left on the device",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EDQUOT: "disk quota exceeded",
    }.get(e.errno or 0, e.strerror or str(e))
    return MelboError(f"cannot write {str(path)!r}: {why}; nothing was written there")


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries to disk (after a rename into it). No-op where unsupported."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write ``path`` whole or not at all (see the module docstring).

    Args:
        path: the file to write; its folder must exist.
        write: fills the temporary file whose name it is given.

    Returns:
        the path.

    Raises:
        MelboError: the folder does not exist, is read-only, or the disk is full (the target is
            left as it was and no temporary file remains).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise MelboError(f"cannot write {str(path)!r}: its folder does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}-", suffix=".tmp")
    except OSError as e:
        raise _os_error(e, path) from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _os_error(e, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, UTF-8 encoded."""

    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    return atomic_write(path, write)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON (UTF-8, non-ASCII kept as is) atomically."""
    return write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write one JSON object per line atomically (UTF-8)."""
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of ``path``.

    Raises:
        MelboError: missing, unreadable, or not UTF-8 (naming the byte offset).
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise MelboError(f"cannot read {what} {str(p)!r}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MelboError(
            f"{what} {str(p)!r} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x}); save it as UTF-8"
        ) from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parsed JSON of ``path`` (UTF-8).

    Raises:
        MelboError: unreadable, not UTF-8, or not JSON (with line and column).
    """
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MelboError(
            f"{what} {str(path)!r} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict, fmt: str) -> Path:
    """Write float32 CPU copies of ``tensors`` to a safetensors file atomically, with ``meta``
    (plus ``"format": fmt``) as the JSON value of metadata key ``"melbo"``.

    Raises:
        MelboError: a tensor is not finite (nothing is written), or the write fails.
    """
    data = {}
    for name, t in tensors.items():
        t = t.detach().float().cpu().contiguous()
        if not torch.isfinite(t).all():
            raise MelboError(f"tensor {name!r} holds NaN or inf values; nothing was written to {str(path)!r}")
        data[name] = t
    meta = {**meta, "format": fmt}
    text = json.dumps(meta, ensure_ascii=False)
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata={"melbo": text}))


def load_tensors(
    path: str | os.PathLike, fmt: str, what: str, required: tuple[str, ...] = ()
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_tensors`: ``(tensors as float32, metadata)``.

    Args:
        fmt: the expected format tag (e.g. ``"melbo.bank/1"``); files of another format are refused.
        what: what the file is, for messages (``"bank"``).
        required: tensor names that must be present.

    Raises:
        MelboError: missing or unreadable file, not safetensors (corrupt or truncated), no or
            malformed melbo metadata, another format, a missing tensor, non-finite values.
    """
    p = Path(path)
    if not p.is_file():
        raise MelboError(f"{what} {str(p)!r} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get("melbo")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise MelboError(f"{what} {str(p)!r} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if raw is None:
        raise MelboError(f"{str(p)!r} is a safetensors file but not a melbo {what} (no 'melbo' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise MelboError(f"{what} {str(p)!r} has malformed metadata (not JSON)") from None
    if not isinstance(meta, dict):
        raise MelboError(f"{what} {str(p)!r} has metadata of type {type(meta).__name__}; expected a JSON object")
    if meta.get("format") != fmt:
        raise MelboError(f"{str(p)!r} has format {meta.get('format')!r}, not a melbo {what} ({fmt!r})")
    for name in required:
        if name not in tensors:
            raise MelboError(f"{what} {str(p)!r} has no tensor {name!r}")
    out = {}
    for k, t in tensors.items():
        if not t.is_floating_point():
            raise MelboError(f"{what} {str(p)!r}: tensor {k!r} is {t.dtype}, expected floating point")
        t = t.float()
        if not torch.isfinite(t).all():
            raise MelboError(f"{what} {str(p)!r}: tensor {k!r} holds NaN or inf values")
        out[k] = t
    return out, meta


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder in a hidden sibling and rename it to ``path`` when the block succeeds; on
    an error (also Ctrl-C) the sibling is removed and ``path`` is left as it was.

    Raises:
        MelboError: ``path`` exists and is not an empty folder (unless ``overwrite``).
    """
    out = Path(path)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise MelboError(f"{str(out)!r} exists and is not an empty folder; choose another path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{TEMP_PREFIX}{out.name}-"))
        os.chmod(work, 0o777 & ~_umask())
    except OSError as e:
        raise _os_error(e, out) from None
    try:
        yield work
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(work, out)
        fsync_dir(out.parent)
    except OSError as e:
        shutil.rmtree(work, ignore_errors=True)
        raise _os_error(e, out) from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def check_writable(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Check, before any work, that the folder ``path`` can be created or written to.

    Raises:
        MelboError: ``path`` or a parent is a file, or the nearest existing folder is not writable.
    """
    p = Path(path)
    for parent in (p, *p.parents):
        if parent.exists():
            if not parent.is_dir():
                raise MelboError(f"{what} {str(p)!r}: {str(parent)!r} is a file, not a folder")
            _probe_write(p, parent, what)
            break
    return p


def _probe_write(p: Path, folder: Path, what: str) -> None:
    """Create and remove an empty file in ``folder``: the permission bits do not tell the truth
    for root, read-only mounts or immutable folders, a real write does."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MelboError(f"{what} {str(p)!r} cannot be written: {str(folder)!r} is read-only for this user")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".melbo-probe-")
    except OSError as e:
        raise MelboError(
            f"{what} {str(p)!r} cannot be written: {str(folder)!r} is read-only for this user ({e.strerror})"
        ) from None
    os.close(fd)
    os.unlink(probe)


def make_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create the folder ``path`` (and its parents) if needed.

    Raises:
        MelboError: ``path`` (or a parent) is a file, or it cannot be created (read-only file
            system, permission denied, disk full).
    """
    p = Path(path)
    for parent in (p, *p.parents):
        if parent.exists() and not parent.is_dir():
            raise MelboError(f"{what} {str(p)!r}: {str(parent)!r} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MelboError(f"cannot create {what} {str(p)!r}: {e.strerror or e}") from None
    return p


def cache_dir() -> Path:
    """Where melbo caches what it builds once (embedding models, converted models, planted models):
    ``$MELBO_CACHE`` or ``~/.cache/melbo``."""
    return Path(os.environ.get("MELBO_CACHE") or Path.home() / ".cache" / "melbo")


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files melbo left in ``folder`` when a process was killed mid-write
    (SIGKILL leaves no chance to clean up). Returns what was removed."""
    removed: list[Path] = []
    d = Path(folder)
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        if p.name.startswith(TEMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed
