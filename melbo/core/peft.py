"""Steering adapters as standard PEFT LoRA folders (METHOD.md section 2, "exportable as a
standard PEFT LoRA adapter").

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with ``r = lora_alpha``
(PEFT's scale ``lora_alpha / r = 1``), ``lora_A.weight = Ω_Aᵀ`` ``[r, d_hidden]`` and
``lora_B.weight = R · Ω_B`` ``[d_model, r]``, plus ``melbo_adapter.json``.
``PeftModel.from_pretrained(base, folder)`` gives the same logits as melbo's own hook. The
reference notebook passed its "R = 0.35" as ``lora_alpha`` with ``r = 512``, i.e. an effective
melbo ``R = 0.35 / 512 ≈ 6.8e-4``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file

from melbo._version import __version__
from melbo.core.errors import MelboError
from melbo.core.io import atomic_folder, atomic_write, read_json, write_json
from melbo.core.model_files import check_model_folder

ADAPTER_META = "melbo_adapter.json"


@dataclass
class LoadedAdapter:
    """An adapter read from a PEFT LoRA folder, ready for :class:`AdapterHook`.

    ``omega_a = lora_A.weightᵀ`` ``[d_hidden, r]``, ``omega_b = lora_B.weight`` ``[d_model, r]``,
    ``scale`` PEFT's ``lora_alpha / r`` (or ``/ √r`` with rsLoRA): the module's output gains
    ``scale · omega_b omega_aᵀ x``. ``module_name`` is the target module's path in the model.
    """

    omega_a: torch.Tensor
    omega_b: torch.Tensor
    scale: float
    module_name: str
    meta: dict
    path: str


def save_peft_adapter(
    folder: str | os.PathLike,
    omega_a: torch.Tensor,
    omega_b: torch.Tensor,
    radius: float,
    module_name: str,
    conv1d: bool,
    base_model: str,
    meta: dict | None = None,
) -> Path:
    """Write one adapter as a standard PEFT LoRA folder (module docstring), atomically: the
    folder is built beside the target and renamed into place.

    Args:
        folder: the folder to write (replaced if it exists).
        omega_a: ``[d_hidden, r]``; omega_b: ``[d_model, r]``; radius: R.
        module_name: the target module's dotted path in the model (PEFT's ``target_modules``).
        conv1d: the module is a GPT-2-style ``Conv1D`` (PEFT's ``fan_in_fan_out``).
        base_model: the model's name or path (``base_model_name_or_path``).
        meta: extra JSON metadata for ``melbo_adapter.json``.

    Returns:
        the folder; ``PeftModel.from_pretrained(base_model, folder)`` loads it.
    """
    r = int(omega_a.shape[-1])
    cfg = LoraConfig(
        r=r,
        lora_alpha=r,
        lora_dropout=0.0,
        bias="none",
        target_modules=[module_name],
        fan_in_fan_out=conv1d,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    prefix = f"base_model.model.{module_name}"
    tensors = {
        f"{prefix}.lora_A.weight": omega_a.detach().float().cpu().T.contiguous(),
        f"{prefix}.lora_B.weight": (float(radius) * omega_b.detach().float().cpu()).contiguous(),
    }
    info = {
        "format": "melbo.adapter/1",
        "melbo_version": __version__,
        "module_name": module_name,
        "rank": r,
        "radius": float(radius),
        "peft_scale": 1.0,
        "note": "lora_A.weight = Ω_Aᵀ, lora_B.weight = R·Ω_B, lora_alpha = r",
        **(meta or {}),
    }
    with atomic_folder(folder, overwrite=True) as work:
        cfg.save_pretrained(str(work))
        atomic_write(work / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        write_json(work / ADAPTER_META, info)
    return Path(folder)


def _peft_scale(cfg: dict, cfg_path: Path, rows: int) -> float:
    """PEFT's LoRA scale ``lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``; PEFT's
    ``LoraLayer.update_layer``) from an adapter config whose weights have rank ``rows``.

    Raises:
        MelboError: ``r`` missing, not a whole number ≥ 1, or not the rank of the weights;
            ``lora_alpha`` missing or not a finite number; ``use_rslora`` not true/false (naming the
            file, the key and the value).
    """

    def bad(key: str, allowed: str) -> MelboError:
        got = repr(cfg[key]) if key in cfg else "nothing (the key is missing)"
        return MelboError(f"adapter config {str(cfg_path)!r}: {key!r} must be {allowed}, got {got}")

    r, alpha, rslora = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("use_rslora", False)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise bad("r", "a whole number >= 1 (the LoRA rank)")
    if r != rows:
        raise bad("r", f"the rank of the LoRA weights, {rows}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise bad("lora_alpha", "a finite number")
    if not isinstance(rslora, bool):
        raise bad("use_rslora", "true or false")
    return alpha / math.sqrt(r) if rslora else alpha / r


def load_peft_adapter(folder: str | os.PathLike) -> LoadedAdapter:
    """Read a PEFT LoRA folder with one target module (melbo's, or any such LoRA adapter).

    Returns:
        a :class:`LoadedAdapter` (``omega_a [d_hidden, r]``, ``omega_b [d_model, r]``, PEFT's scale).

    Raises:
        MelboError: no such folder or files, unreadable files, not a LoRA adapter, DoRA, several
            target modules, non-finite weights, a folder that names custom code (``auto_map``), a config
            that is not a JSON object or whose ``r``, ``lora_alpha`` or ``use_rslora`` is missing or
            invalid (:func:`_peft_scale`).
    """
    folder = Path(folder)
    cfg_path, w_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise MelboError(
            f"{str(folder)!r} is not a PEFT adapter folder (needs adapter_config.json and "
            f"adapter_model.safetensors); give a folder written by melbo train --method adapter"
        )
    check_model_folder(folder, "PEFT adapter folder", weights=False)  # its weights are read below
    cfg = read_json(cfg_path, "adapter config")
    if not isinstance(cfg, dict):
        raise MelboError(
            f"adapter config {str(cfg_path)!r} is a JSON {type(cfg).__name__}, not an object; "
            f"give a PEFT adapter_config.json (an object with peft_type, r, lora_alpha)"
        )
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        raise MelboError(
            f"adapter {str(folder)!r} is {cfg.get('peft_type')}{' (DoRA)' if cfg.get('use_dora') else ''}; "
            f"melbo applies plain LoRA adapters only"
        )
    try:
        with safe_open(str(w_path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise MelboError(f"adapter weights {str(w_path)!r} are not a readable safetensors file ({e})") from None
    a_keys = [k for k in tensors if k.endswith(".lora_A.weight")]
    if len(a_keys) != 1:
        raise MelboError(
            f"adapter {str(folder)!r} has {len(a_keys)} LoRA modules; melbo applies adapters of one module"
        )
    name = a_keys[0][: -len(".lora_A.weight")]
    b_key = name + ".lora_B.weight"
    if b_key not in tensors:
        raise MelboError(f"adapter {str(folder)!r} has {a_keys[0]} but no {b_key}")
    a, b = tensors[a_keys[0]].float(), tensors[b_key].float()
    if (
        a.dim() != 2
        or b.dim() != 2
        or a.shape[0] != b.shape[1]
        or not (torch.isfinite(a).all() and torch.isfinite(b).all())
    ):
        raise MelboError(
            f"adapter {str(folder)!r} has LoRA weights of shapes {tuple(a.shape)} and {tuple(b.shape)} "
            f"(or non-finite values); expected finite [r, d_hidden] and [d_model, r]"
        )
    module_name = name[len("base_model.model.") :] if name.startswith("base_model.model.") else name
    scale = _peft_scale(cfg, cfg_path, int(a.shape[0]))
    meta_path = folder / ADAPTER_META
    meta = read_json(meta_path, "adapter metadata") if meta_path.is_file() else {}
    return LoadedAdapter(a.T.contiguous(), b, scale, module_name, meta if isinstance(meta, dict) else {}, str(folder))
