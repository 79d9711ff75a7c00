"""Model folders are data: the one place where melbo hands a model's files to transformers.

transformers and sentence-transformers can import Python files that a model folder (or Hub
repository) names in ``auto_map`` (``config.json``, ``tokenizer_config.json``) or in
``modules.json``; asked with ``trust_remote_code`` left unset, transformers even prompts "Do you
wish to run the custom code? [y/N]" on stdin. melbo never runs a model's code: every load here
passes ``trust_remote_code=False``, and a local folder that needs custom code is refused first with
an error naming the entry. The files transformers parses are checked too (JSON objects, whole
safetensors files), so that garbage or an interrupted download ends in a :class:`MelboError`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

from melbo.core.errors import MelboError
from melbo.core.io import read_json

# auto classes melbo loads through, with the model types transformers itself implements for each
_NATIVE: dict[str, Mapping[str, Any]] = {
    "AutoModelForCausalLM": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "AutoModel": MODEL_MAPPING_NAMES,
}
_PREFERRED = ("AutoModelForCausalLM", "AutoModel", "AutoConfig", "AutoTokenizer")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _json_object(path: Path, what: str) -> dict:
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise MelboError(f"{what} {str(path)!r} holds a JSON {type(data).__name__}; expected a JSON object")
    return data


def _refs(value: Any) -> list[str]:
    """Class references ``"module.Class"`` in one ``auto_map`` value (a string, or ``[slow, fast]``)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [v for v in items if isinstance(v, str) and v]


def _native_tokenizer(tokenizer_class: Any, model_type: Any) -> bool:
    if isinstance(model_type, str) and model_type in TOKENIZER_MAPPING_NAMES:
        return True
    if not isinstance(tokenizer_class, str) or not tokenizer_class:
        return False
    base = tokenizer_class.removesuffix("Fast")
    return any(tokenizer_class_from_name(n) is not None for n in (base, base + "Fast"))


def custom_code(folder: str | os.PathLike) -> str | None:
    """What in a local model folder needs custom code that transformers cannot replace by its own,
    e.g. ``"config.json auto_map AutoModelForCausalLM -> evil.EvilModel"``; None when nothing does.

    A ``config.json`` ``auto_map`` entry needs code when ``model_type`` is not one of transformers'
    own, or (for ``AutoModelForCausalLM`` / ``AutoModel``) transformers has no such class for it; a
    ``tokenizer_config.json`` ``AutoTokenizer`` entry when neither ``tokenizer_class`` nor the model
    type names a tokenizer of transformers. (With ``trust_remote_code=False`` transformers loads the
    others natively and ignores their ``auto_map``.)

    Raises:
        MelboError: ``config.json`` or ``tokenizer_config.json`` is not a UTF-8 JSON object.
    """
    root = Path(folder)
    config = _json_object(root / "config.json", "model config") if (root / "config.json").is_file() else {}
    model_type = config.get("model_type")
    native = isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES
    found: list[tuple[str, str]] = []
    auto_map = config.get("auto_map")
    for key, value in auto_map.items() if isinstance(auto_map, dict) else []:
        if not native or (key in _NATIVE and model_type not in _NATIVE[key]):
            found += [(key, f"config.json auto_map {key} -> {ref}") for ref in _refs(value)]
    tok_path = root / "tokenizer_config.json"
    tok = _json_object(tok_path, "tokenizer config") if tok_path.is_file() else {}
    tok_map = tok.get("auto_map")
    tok_refs = _refs(tok_map.get("AutoTokenizer") if isinstance(tok_map, dict) else tok_map)
    if tok_refs and not _native_tokenizer(tok.get("tokenizer_class"), model_type):
        found.append(("AutoTokenizer", f"tokenizer_config.json auto_map AutoTokenizer -> {tok_refs[-1]}"))
    if not found:
        return None
    rank = {k: i for i, k in enumerate(_PREFERRED)}
    return min(found, key=lambda f: rank.get(f[0], len(rank)))[1]


def check_weights(folder: str | os.PathLike, what: str = "model folder") -> None:
    """Every ``*.safetensors`` file at the top of ``folder`` has a whole, readable header and
    covers its data, and every shard a ``*.safetensors.index.json`` names is there.

    Raises:
        MelboError: a file cut short (an interrupted download), garbage, or a missing shard.
    """
    root = Path(folder)
    for path in sorted(root.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise MelboError(
                f"{what} {str(root)!r}: weights file {path.name!r} is not a readable safetensors file "
                f"({first_line(e)}); an interrupted download leaves such a file: download it again"
            ) from None
    for index in sorted(root.glob("*.safetensors.index.json")):
        weight_map = _json_object(index, "weights index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise MelboError(f"weights index {str(index)!r} has no weight_map object")
        missing = sorted({str(v) for v in weight_map.values()} - {p.name for p in root.iterdir()})
        if missing:
            raise MelboError(
                f"{what} {str(root)!r} lacks weight shard(s) {', '.join(missing)} named in {index.name}; "
                f"download them again"
            )


def bad_json_file(folder: str | os.PathLike) -> str | None:
    """Why the first ``*.json`` file at the top of a local ``folder`` is not UTF-8 JSON (a
    :class:`MelboError` message naming it), or None: for a clear error after a load failed."""
    if not os.path.isdir(folder):
        return None
    for path in sorted(Path(folder).glob("*.json")):
        try:
            read_json(path, "file")
        except MelboError as e:
            return str(e)
    return None


def load_error(e: Exception, what: str, where: str, folder: str | os.PathLike | None = None) -> MelboError:
    """The :class:`MelboError` for a failed load of ``what`` (e.g. ``"model 'x'"``) as a ``where``
    (``"folder"``, ``"Hub id"``, ...): custom code a Hub repository asked for, the first ``*.json``
    file of ``folder`` that is not JSON (:func:`bad_json_file`), or the first line of ``e``."""
    if "trust_remote_code" in str(e):
        return MelboError(
            f"{what} needs custom code ({first_line(e)}); melbo never runs a model's code: "
            f"give a model of an architecture transformers implements itself"
        )
    why = (bad_json_file(folder) if folder is not None else None) or first_line(e)
    return MelboError(f"cannot load {what} as a {where}: {why}")


def check_model_folder(source: str | os.PathLike, what: str = "model folder", weights: bool = True) -> None:
    """Refuse a local folder that needs custom code (:func:`custom_code`) or holds broken files
    (:func:`check_weights`); Hub ids and GGUF files pass (transformers refuses their code itself,
    told ``trust_remote_code=False``).

    Raises:
        MelboError: custom code, a config that is not a JSON object, unreadable weights.
    """
    if not os.path.isdir(source):
        return
    code = custom_code(source)
    if code is not None:
        raise MelboError(
            f"{what} {str(source)!r} needs custom code ({code}); melbo never runs a model's code: "
            f"give a model of an architecture transformers implements itself"
        )
    if weights:
        check_weights(source, what)


def load_config(source: str | os.PathLike, **kwargs: Any) -> Any:
    """``AutoConfig.from_pretrained`` without custom code (the folder checked first).

    Raises:
        MelboError: see :func:`check_model_folder`; transformers' own errors pass through.
    """
    check_model_folder(source, weights=False)
    return AutoConfig.from_pretrained(str(source), trust_remote_code=False, **kwargs)


def load_tokenizer(source: str | os.PathLike, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained`` without custom code (the folder checked first).

    Raises:
        MelboError: see :func:`check_model_folder`; transformers' own errors pass through.
    """
    check_model_folder(source, weights=False)
    return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False, **kwargs)


def load_causal_lm(source: str | os.PathLike, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` without custom code (the folder and its weights
    checked first).

    Raises:
        MelboError: see :func:`check_model_folder`; transformers' own errors pass through.
    """
    check_model_folder(source)
    return AutoModelForCausalLM.from_pretrained(str(source), trust_remote_code=False, **kwargs)


def load_sentence_transformer(path: str) -> Any:
    """A sentence-transformers model on the CPU, without custom code: a local folder's
    ``modules.json`` may name only ``sentence_transformers`` classes, and the folder and each
    module folder are checked like a model folder.

    Raises:
        MelboError: sentence-transformers is not installed, custom code, broken files;
            transformers' and sentence-transformers' own errors pass through.
    """
    what = "sentence-embedding model folder"
    root = Path(path)
    modules = read_json(root / "modules.json", "modules list") if (root / "modules.json").is_file() else []
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise MelboError(f"modules list {str(root / 'modules.json')!r} must be a JSON list of objects")
    for m in modules:
        kind = str(m.get("type", ""))
        if not kind.startswith("sentence_transformers."):
            raise MelboError(
                f"{what} {path!r} needs custom code (modules.json type {kind}); melbo never runs a model's "
                f"code: give a model made of sentence_transformers modules"
            )
        sub = root / str(m.get("path", ""))
        if sub != root:
            check_model_folder(sub, what)
    check_model_folder(path, what)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise MelboError("sentence-transformers is not installed: pip install 'melbo[real]'") from None
    return SentenceTransformer(path, device="cpu", trust_remote_code=False)
