"""Loading models and finding their decoder blocks (the residual stream's hook points).

Notation (METHOD.md, "Notation"): a decoder-only transformer has ``L`` blocks; ``h_l`` is the
residual stream after block ``l`` -- the output of ``blocks[l]``, equal to Hugging Face's
``hidden_states[l + 1]`` -- of shape ``[batch, seq, d_model]``.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from melbo.core.errors import MelboError
from melbo.core.io import cache_dir
from melbo.core.model_files import load_causal_lm, load_error, load_tokenizer
from melbo.core.sources import gguf_cache_folder, offline_model_path, save_dequantized, split_gguf

# Attribute paths of the decoder-block list, most common first. Llama, Mistral, Qwen2/3, Gemma,
# Gemma2, Phi, Phi-3 and OLMo use ``model.layers``; GPT-2, GPT-J and Falcon ``transformer.h``;
# GPT-NeoX ``gpt_neox.layers``; OPT ``model.decoder.layers``.
BLOCK_PATHS = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "transformer.layers",
    "transformer.blocks",
    "layers",
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _get_attr_path(obj: object, path: str) -> object | None:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def text_config(model: Any) -> Any:
    """The text part of a model's config (multimodal configs nest it)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def num_layers(model: Any) -> int:
    """Number of decoder blocks ``L`` as the config states it."""
    n = getattr(text_config(model), "num_hidden_layers", None)
    if n is None:
        raise MelboError(f"the config of {type(model).__name__} has no num_hidden_layers")
    return int(n)


def hidden_size(model: Any) -> int:
    """Width ``d_model`` of the residual stream."""
    d = getattr(text_config(model), "hidden_size", None)
    if d is None:
        raise MelboError(f"the config of {type(model).__name__} has no hidden_size")
    return int(d)


def find_blocks(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """Return the ``ModuleList`` of decoder blocks of ``model``.

    Args:
        model: a Hugging Face causal LM (or any ``nn.Module`` with a config).
        path: dotted attribute path that overrides the search (e.g. ``"transformer.h"``).

    Looks at the known attribute paths (:data:`BLOCK_PATHS`) and then for the one
    ``ModuleList`` whose length equals the config's number of hidden layers.

    Raises:
        MelboError: the override path does not name a ``ModuleList``, or no list of blocks
            was found (then pass ``path``).
    """
    if path is not None:
        blocks = _get_attr_path(model, path)
        if not isinstance(blocks, nn.ModuleList):
            raise MelboError(
                f"--blocks-path {path!r} does not name a torch.nn.ModuleList in "
                f"{type(model).__name__}; give the dotted path of its decoder blocks"
            )
        return blocks
    n = num_layers(model)
    for p in BLOCK_PATHS:
        blocks = _get_attr_path(model, p)
        if isinstance(blocks, nn.ModuleList) and len(blocks) == n:
            return blocks
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(candidates) == 1:
        return candidates[0][1]
    names = ", ".join(name for name, _ in candidates) or "none"
    raise MelboError(
        f"cannot tell which ModuleList holds the {n} decoder blocks of {type(model).__name__} "
        f"(ModuleLists of that length: {names}); pass its dotted path with --blocks-path"
    )


def resolve_layer(index: int, n_layers: int, what: str = "layer") -> int:
    """Turn a possibly negative block index into ``0..n_layers-1``.

    Raises:
        MelboError: the index is outside ``-n_layers..n_layers-1``.
    """
    if not isinstance(index, int) or isinstance(index, bool):
        raise MelboError(f"{what} must be an integer, got {index!r}")
    if not -n_layers <= index < n_layers:
        raise MelboError(
            f"{what} {index} is out of range: the model has {n_layers} blocks, "
            f"allowed are 0..{n_layers - 1} or -{n_layers}..-1"
        )
    return index % n_layers


def default_layers(n_layers: int) -> tuple[int, int]:
    """Default source and target blocks.

    The post (METHOD.md section 1) uses ``src = 8``, ``tgt = L - 8`` on 24-block models. Models
    under 20 blocks get ``src = L // 4`` and ``tgt = src + L // 2`` (at least ``src + 1``,
    at most ``L - 1``). A 1-block model has no valid pair.

    Raises:
        MelboError: ``n_layers < 2``.
    """
    if n_layers < 2:
        raise MelboError(f"a model needs at least 2 blocks for a source and a target layer, it has {n_layers}")
    if n_layers >= 20:
        return 8, n_layers - 8
    src = n_layers // 4
    return src, min(n_layers - 1, src + max(1, n_layers // 2))


def check_layers(src: int, tgt: int, n_layers: int) -> tuple[int, int]:
    """Resolve negative indices and check ``0 <= src < tgt < L``.

    Raises:
        MelboError: a layer is out of range, or ``src >= tgt``.
    """
    s = resolve_layer(src, n_layers, "source layer")
    t = resolve_layer(tgt, n_layers, "target layer")
    if s >= t:
        raise MelboError(
            f"source layer {src} (block {s}) must come before target layer {tgt} (block {t}); "
            f"allowed: 0 <= source < target <= {n_layers - 1}"
        )
    return s, t


def pick_device(device: str = "auto") -> torch.device:
    """``"auto"`` gives ``cuda`` when available, else ``cpu``.

    Raises:
        MelboError: not a torch device, ``meta`` (it holds no values), or CUDA / MPS asked for
            but not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise MelboError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "meta":  # tensors without values: every result would be made up
        raise MelboError(f"device {device!r} cannot run a model here (it holds no values); use auto, cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MelboError(f"device {device!r} asked for, but CUDA is not available here; use cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise MelboError(f"device {device!r} asked for, but MPS is not available here; use cpu or auto")
    return dev


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` gives bfloat16 on CUDA (where it supports it) and float32 elsewhere."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise MelboError(f"unknown dtype {dtype!r}; allowed: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and where it came from.

    Attributes:
        model: the ``PreTrainedModel``, in eval mode, parameters frozen.
        tokenizer: its tokenizer; ``pad_token`` is set (to EOS or UNK when the model has none).
        name: the Hub id or local path it was loaded from.
        blocks: the decoder blocks (see :func:`find_blocks`).
    """

    model: Any
    tokenizer: Any
    name: str
    blocks: nn.ModuleList
    gguf_file: str | None = None

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return hidden_size(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def model_type(self) -> str:
        return str(getattr(text_config(self.model), "model_type", type(self.model).__name__))

    def identity(self) -> dict:
        """What a bank records about the model it was made for (checked when it is used again)."""
        return {
            "model": self.name,
            "model_type": self.model_type,
            "hidden_size": self.d_model,
            "num_layers": self.num_layers,
        }


def load_model(
    name_or_path: str,
    device: str = "auto",
    dtype: str = "auto",
    blocks_path: str | None = None,
    attn_implementation: str | None = None,
    gguf_file: str | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer by Hub id, local folder or GGUF file.

    Weights are read from safetensors or GGUF files only: a model stored as pickle
    (``pytorch_model.bin``, ``.pt``) is refused, since unpickling runs arbitrary code.

    Args:
        name_or_path: a Hub id (``"Qwen/Qwen1.5-1.8B-Chat"``), a folder written by
            ``save_pretrained``, or a ``.gguf`` file (quantized weights are dequantized by
            transformers to ``dtype``).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        dtype: ``auto`` (bf16 on CUDA, float32 on CPU), ``float32``, ``bfloat16``, ``float16``.
        blocks_path: dotted path of the decoder blocks, for architectures melbo does not know.
        attn_implementation: e.g. ``"eager"`` (forward-mode AD needs it).
        gguf_file: the GGUF file's name inside the folder (or Hub repository) ``name_or_path``.
        device_map: spread the model over several devices with accelerate (``"auto"``,
            ``"balanced"``, ``"sequential"`` or a dict module name -> device, ``"cpu"`` or
            ``"disk"``); ``device`` then only picks the dtype. Inputs go to the first block's
            device; each block keeps its own (melbo's hooks move vectors to the hidden states).

    Raises:
        MelboError: no model at that path or id, pickle weights only, a model that needs custom
            code (``auto_map``; melbo never runs a model's code, :mod:`melbo.core.model_files`),
            broken files (a cut or garbage safetensors file, a config that is not JSON), or it
            cannot be loaded as a causal LM.
    """
    name_or_path = offline_model_path(name_or_path) or name_or_path
    source, gguf = split_gguf(name_or_path, gguf_file)
    local = os.path.isdir(source)
    if not local and (not _HUB_ID.match(source) or source.startswith((".", "/", "~"))):
        raise MelboError(f"model {name_or_path!r}: no such folder or .gguf file, and not a Hub id of the form org/name")
    if local and gguf is None:
        names = {p.name for p in Path(source).iterdir()}
        if not any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
            pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
            if pickles:
                raise MelboError(
                    f"model folder {source!r} holds pickle weights only ({', '.join(pickles)}); melbo "
                    f"never unpickles files: convert them to safetensors (model.save_pretrained(folder, "
                    f"safe_serialization=True)) or give a .gguf file"
                )
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    cached = None
    if gguf and local and os.environ.get("MELBO_GGUF_CACHE", "1") != "0":
        cached = gguf_cache_folder(source, gguf)
        if (cached / "config.json").is_file() and (cached / "model.safetensors").is_file():
            lm = load_model(str(cached), device, dtype, blocks_path, attn_implementation, device_map=device_map)
            lm.name, lm.gguf_file = str(Path(source) / gguf), gguf
            return lm
    kwargs: dict = {"dtype": dt}
    if device_map is not None:
        kwargs.update(device_map_kwargs(device_map))
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    extra: dict = {"gguf_file": gguf} if gguf else {"use_safetensors": True}
    try:  # never the folder's code (trust_remote_code=False); a folder that needs it is refused first
        tokenizer = load_tokenizer(source, **({"gguf_file": gguf} if gguf else {}))
        model: Any = load_causal_lm(source, **kwargs, **extra)
    except MelboError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, tokenizers, JSON, a cut GGUF header: the files are bad
        where = "GGUF file" if gguf else "folder" if local else "Hub id (offline, or no such repository?)"
        raise load_error(e, f"model {name_or_path!r}", where, source if local and not gguf else None) from None
    if cached is not None:
        try:
            save_dequantized(model, tokenizer, cached)
        except MelboError as e:  # no space or a read-only cache: load again next time
            warnings.warn(f"could not cache the dequantized model in {cached}: {e}", stacklevel=2)
        else:  # the cached copy is a plain model (save_pretrained works on it, e.g. after planting)
            assert gguf is not None  # a cache folder exists only for GGUF files
            del model
            lm = load_model(str(cached), device, dtype, blocks_path, attn_implementation, device_map=device_map)
            lm.name, lm.gguf_file = str(Path(source) / gguf), gguf
            return lm
    if device_map is None:
        model.to(dev)
    model.eval().requires_grad_(False)
    prepare_tokenizer(tokenizer, model)
    name = str(Path(source) / gguf) if gguf and local else name_or_path
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=name, blocks=find_blocks(model, blocks_path), gguf_file=gguf
    )


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def device_map_kwargs(device_map: str | dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for a device map (accelerate): the map, and an
    offload folder in melbo's cache where a dict sends modules to ``"disk"``.

    Raises:
        MelboError: an unknown map name, a map that is not a dict of strings / ints, or
            accelerate is not installed.
    """
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise MelboError("--device-map needs accelerate: pip install accelerate") from None
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAPS:
            raise MelboError(f"device map {device_map!r} is not allowed; allowed: {', '.join(DEVICE_MAPS)} or a dict")
        return {"device_map": device_map}
    if not isinstance(device_map, dict) or not all(isinstance(k, str) for k in device_map):
        raise MelboError(f"device map {device_map!r} is not allowed; allowed: {', '.join(DEVICE_MAPS)} or a dict")
    out: dict[str, Any] = {"device_map": dict(device_map)}
    if "disk" in device_map.values():
        out["offload_folder"] = str(cache_dir() / "offload")
    return out


def prepare_tokenizer(tokenizer: Any, model: Any = None) -> None:
    """Give the tokenizer a pad token (EOS, else UNK) so that prompts can be batched, and, with
    ``model``, set its ``model_max_length`` to the positions the model reads (its config's
    ``max_position_embeddings``, where it has one): :mod:`melbo.core.prompts` and
    :mod:`melbo.core.generate` refuse longer inputs instead of running past them.
    """
    limit = getattr(text_config(model), "max_position_embeddings", None) if model is not None else None
    if isinstance(limit, int) and limit > 0:
        tokenizer.model_max_length = limit
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise MelboError("the tokenizer has no pad, EOS or UNK token to pad batches with")


def wrap_model(
    model: nn.Module, tokenizer: Any, name: str = "<in-memory>", blocks_path: str | None = None
) -> LoadedModel:
    """Wrap an already loaded model (tests, notebooks) like :func:`load_model` does."""
    model.eval().requires_grad_(False)
    prepare_tokenizer(tokenizer, model)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, blocks=find_blocks(model, blocks_path))
