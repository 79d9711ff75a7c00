"""The output rule of every command: melbo never destroys a file it did not write.

- A **folder** output (a run, a sweep, a benchmark, a planted model, the demo, plots) is written
  only when it is new or empty, or holds that command's own earlier output. melbo recognizes its
  own folders by the marker file ``.melbo-run.json`` (``{"command": ...}``) it writes into each,
  and folders written before the marker existed by the files the command always writes (a run's
  ``bank.safetensors``, a benchmark's ``bench.json``, ...: :data:`WRITERS`). Replacing an earlier
  output takes ``overwrite`` (a run continues with ``resume``); then only the names the command
  writes (:data:`WRITERS`) are removed, never another file of the folder.
- A **file** output (an HTML report, an exported vector, a chat transcript, detection scores, a
  calibration) replaces an existing file only with ``overwrite``.
- Never, not even with ``overwrite``, does an output go over one of the command's own inputs
  (the bank, a prompts file, a model folder, a spec): paths are compared resolved (symbolic
  links followed) and with :func:`os.path.samefile` (hard links).

Every check runs before any work and raises :class:`~melbo.core.errors.MelboError` (exit code 2)
naming the path and what is allowed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from melbo._version import __version__
from melbo.core.errors import MelboError
from melbo.core.io import check_writable, make_dir, read_json, remove_stale_temps, write_json

MARKER = ".melbo-run.json"
HIDDEN = ".melbo-"  # melbo's own hidden names: the marker, temporary files, write probes

Inputs = Iterable[tuple[str, str | os.PathLike | None]]
"""A command's inputs as ``(what it is, path)``, e.g. ``("the bank (--bank)", "run/bank.safetensors")``;
paths that are None or do not exist are skipped."""


@dataclass(frozen=True)
class Writer:
    """What a command writes into its output folder.

    Attributes:
        outputs: name patterns (:func:`fnmatch.fnmatch`) of the entries it writes there.
        legacy: sets of glob patterns; a folder without a marker that holds a match of every
            pattern of one set is the command's own (written before the marker existed).
        replace: what writing into an earlier output of the command takes: ``"overwrite"``,
            ``"resume"`` (the caller decides: a run continues or is refused) or ``"always"``
            (the command updates its own folder, e.g. plots).
        whole: the folder is replaced as a whole (built beside it and renamed), so with
            ``overwrite`` every entry in it must be one the command writes.
    """

    outputs: tuple[str, ...]
    legacy: tuple[tuple[str, ...], ...] = ()
    replace: str = "overwrite"
    whole: bool = False


RUN_FILES = (
    "bank.safetensors",
    "completions.jsonl",
    "summary.json",
    "summary.md",
    "report.html",
    "kl.png",
    "norms.png",
    "measures.csv",
    "radius_sweep.json",
    "radius_sweep.png",
    "peft",
    "controls.jsonl",
    "enumeration.png",
    "frontier.png",
)
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
NUMBERED = "[0-9][0-9]"  # one folder per grid setting: 00, 01, ...

WRITERS: dict[str, Writer] = {
    # melbo train, melbo ortho and melbo.train(out=...): a run folder
    "train": Writer(RUN_FILES, (("bank.safetensors",),), "resume"),
    "sweep": Writer(("sweep_plan.json", "sweep.json", "sweep.md", NUMBERED), (("sweep_plan.json",),), "resume"),
    "bench backdoor": Writer(
        ("bench.json", "bench.md", "report.html", "sweep.json", "sweep.md", NUMBERED),
        (("bench.json",), ("sweep.json", f"{NUMBERED}/bench.json")),
    ),
    "bench capability": Writer(("capability.json", "capability.md", "bank.safetensors"), (("capability.json",),)),
    "bench detect": Writer(("detect.json", "detect.md"), (("detect.json",),)),
    "plant": Writer(
        (*MODEL_FILES, "plant_spec.json", "plant_report.json"), (("plant_report.json", "plant_spec.json"),), whole=True
    ),
    "demo": Writer(("real", "planted-*"), (("real/bank.safetensors",), ("planted-*/bench.json",)), "always"),
    "plot": Writer(("kl.png", "norms.png", "measures.csv"), (), "always"),
}


def _writer(command: str) -> Writer:
    if command not in WRITERS:
        raise ValueError(f"no output rule for command {command!r}")  # a programming error, not bad input
    return WRITERS[command]


def _marker(folder: Path) -> dict:
    path = folder / MARKER
    if not path.is_file():
        return {}
    try:
        data = read_json(path, "melbo marker")
    except MelboError:
        return {}
    return data if isinstance(data, dict) else {}


def marker_command(folder: str | os.PathLike) -> str | None:
    """The command named by ``folder``'s marker file, or None (no marker, or an unreadable one)."""
    command = _marker(Path(folder)).get("command")
    return command if isinstance(command, str) else None


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(HIDDEN))


def _legacy(folder: Path, writer: Writer) -> bool:
    return any(all(next(folder.glob(g), None) is not None for g in group) for group in writer.legacy)


def folder_owner(folder: str | os.PathLike) -> str | None:
    """Which command wrote ``folder`` (its marker, else the files of :data:`WRITERS` ``legacy``), or None."""
    p = Path(folder)
    if not p.is_dir():
        return None
    command = marker_command(p)
    if command is not None:
        return command
    # the run folder's mark (a bank) is the least specific: a capability folder holds one too
    return next((c for c in sorted(WRITERS, key=lambda c: c == "train") if _legacy(p, WRITERS[c])), None)


def _resolved(p: str | os.PathLike) -> Path:
    return Path(os.path.abspath(p)).resolve()


def _same(a: Path, b: Path) -> bool:
    if _resolved(a) == _resolved(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _existing_inputs(inputs: Inputs) -> list[tuple[str, Path]]:
    return [(what, Path(p)) for what, p in inputs if isinstance(p, (str, os.PathLike)) and str(p) and Path(p).exists()]


def _input_error(what: str, out: Path, hit: Path, label: str) -> MelboError:
    return MelboError(
        f"{what} {str(out)!r} would write over {str(hit)!r}, {label} of this command; melbo never writes over "
        f"its own input, not even with --overwrite; choose another {what}"
    )


def _check_folder_inputs(p: Path, writer: Writer, inputs: Inputs, what: str) -> None:
    root = _resolved(p)
    mine = [e for e in (_entries(p) if p.is_dir() else []) if any(fnmatch(e.name, g) for g in writer.outputs)]
    for label, i in _existing_inputs(inputs):
        r = _resolved(i)
        if r == root or root in r.parents:
            rel = r.relative_to(root).parts
            if writer.whole or not rel or any(fnmatch(rel[0], g) for g in writer.outputs):
                raise _input_error(what, p, i, label)
        if i.is_file() and any(e.is_file() and _same(e, i) for e in mine):
            raise _input_error(what, p, i, label)


@dataclass
class OutputFolder:
    """A checked output folder (:func:`claim_folder`); :meth:`prepare` it right before the first write.

    Attributes:
        state: ``"new"`` (absent or empty), ``"own"`` (an earlier output of the command) or
            ``"melbo"`` (another melbo command's folder, for commands that add to it).
    """

    path: Path
    command: str
    state: str
    overwrite: bool = False
    _prepared: bool = False

    @property
    def own(self) -> bool:
        return self.state == "own"

    def prepare(self) -> Path:
        """Create the folder and, the first time: remove melbo's temporary files that a killed write
        left there (:func:`melbo.core.io.remove_stale_temps`); with ``overwrite`` over an earlier
        output of the command, remove the entries the command writes (no other file); write the
        marker. Neither temporary files nor the marker are touched in another command's folder.
        Returns the path.

        Raises:
            MelboError: the folder cannot be created or written.
        """
        make_dir(self.path, "output folder")
        if self._prepared:
            return self.path
        if self.state != "melbo":  # another command's folder may be in use by that command
            remove_stale_temps(self.path)  # a killed earlier write (of the marker too) leaves only these
        writer = _writer(self.command)
        if self.own and self.overwrite and not writer.whole:
            for e in _entries(self.path):
                if any(fnmatch(e.name, g) for g in writer.outputs):
                    shutil.rmtree(e) if e.is_dir() and not e.is_symlink() else e.unlink()
        if self.state != "melbo":
            write_marker(self.path, self.command)
        self._prepared = True
        return self.path


def write_marker(folder: str | os.PathLike, command: str, files: list[str] | None = None) -> Path:
    """Write ``folder``'s marker: ``{"command", "melbo_version"}`` (and the ``files`` the command wrote)."""
    data: dict = {"command": command, "melbo_version": __version__}
    if files is not None:
        data["files"] = sorted(files)
    return write_json(Path(folder) / MARKER, data)


def _names(entries: list[Path], n: int = 3) -> str:
    shown = ", ".join(repr(e.name) for e in entries[:n])
    return shown + (f" and {len(entries) - n} more" if len(entries) > n else "")


def claim_folder(
    path: str | os.PathLike,
    command: str,
    *,
    inputs: Inputs = (),
    overwrite: bool = False,
    into_melbo: bool = False,
    what: str = "--out",
) -> OutputFolder:
    """Check, before any work, that ``command`` may write the output folder ``path`` (module docstring).

    Args:
        command: a key of :data:`WRITERS` (``"train"`` for every run folder).
        inputs: the command's inputs; none may lie where the command writes.
        overwrite: replace an earlier output of the command (its own entries only).
        into_melbo: also accept another melbo command's folder (plots added to a run folder).
        what: the option, for messages.

    Returns:
        the checked folder; call :meth:`OutputFolder.prepare` before writing into it.

    Raises:
        MelboError: ``path`` is a file or cannot be written; it holds files of the user's (or,
            without ``into_melbo``, another command's output); it holds an earlier output of the
            command and the command needs ``overwrite`` to replace it; with ``overwrite`` over a
            folder replaced as a whole, the folder holds entries the command does not write; an
            input lies where the command writes.
    """
    writer = _writer(command)
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise MelboError(f"{what} {str(p)!r} is a file, not a folder")
    check_writable(p, what)
    _check_folder_inputs(p, writer, inputs, what)
    if not p.is_dir() or not _entries(p):
        return OutputFolder(p, command, "new", overwrite)
    owner = folder_owner(p)
    entries = _entries(p)
    if owner == command:
        if writer.replace == "overwrite" and not overwrite:
            raise MelboError(
                f"{what} {str(p)!r} exists and is not an empty folder: it holds an earlier `melbo {command}` "
                f"output; pass --overwrite to replace it, or choose another {what}"
            )
        listed = _marker(p).get("files")
        listed = set(listed) if isinstance(listed, list) else set()
        foreign = [e for e in entries if e.name not in listed and not any(fnmatch(e.name, g) for g in writer.outputs)]
        if overwrite and writer.whole and foreign:
            raise MelboError(
                f"{what} {str(p)!r} holds {_names(foreign)}, which `melbo {command}` did not write; --overwrite "
                f"replaces only a folder of its own files; move them away or choose another {what}"
            )
        return OutputFolder(p, command, "own", overwrite)
    if owner is not None and into_melbo:
        return OutputFolder(p, command, "melbo", overwrite)
    held = f"an output of `melbo {owner}`" if owner else _names(entries)
    raise MelboError(
        f"{what} {str(p)!r} exists and is not an empty folder, and holds no earlier `melbo {command}` output "
        f"(it holds {held}); melbo {command} writes only into a new or empty folder or one of its own earlier "
        f"outputs, so that no file it did not write is replaced; choose another {what}"
    )


def check_output_file(
    path: str | os.PathLike,
    what: str = "--out",
    *,
    inputs: Inputs = (),
    overwrite: bool = False,
    suffix: str | None = None,
) -> Path:
    """Check, before any work, that a command may write the file ``path`` (module docstring).

    Args:
        inputs: the command's inputs; the file may be none of them, nor an existing file inside
            an input folder.
        overwrite: replace an existing file (never an input).
        suffix: the file name's required ending (``".gguf"``), compared case-insensitively.

    Returns:
        the path.

    Raises:
        MelboError: ``path`` is a folder or has another suffix; its folder does not exist or
            cannot be written; it is an input; it exists and ``overwrite`` is not set.
    """
    p = Path(path)
    ending = f" ending in {suffix}" if suffix else ""
    if p.is_dir():
        raise MelboError(f"{what} {str(p)!r} is a folder; give a file name{ending}")
    if suffix and p.suffix.lower() != suffix:
        raise MelboError(f"{what} {str(p)!r} should end in {suffix}")
    check_writable(p.parent, f"{what} folder")
    if not p.parent.is_dir():
        raise MelboError(f"{what} {str(p)!r}: folder {str(p.parent)!r} does not exist")
    for label, i in _existing_inputs(inputs):
        inside = i.is_dir() and p.exists() and _resolved(i) in _resolved(p).parents
        if _same(p, i) or inside:
            raise _input_error(what, p, p if inside else i, label if not inside else f"part of {label}")
    if p.exists() and not overwrite:
        raise MelboError(f"{what} {str(p)!r} already exists; pass --overwrite to replace it, or choose another file")
    return p


def bank_file(path: str | os.PathLike | None) -> Path | None:
    """The bank file a ``--bank`` value names (a run folder's ``bank.safetensors``, or the file)."""
    if path is None:
        return None
    p = Path(path)
    return p / "bank.safetensors" if p.is_dir() else p
