"""llama.cpp control vectors: the GGUF file that ``llama-cli --control-vector F.gguf`` reads.

The format, as llama.cpp's loader (``common_control_vector_load``) reads it:

- GGUF with ``general.architecture = "controlvector"``;
- one tensor per steered layer, named ``direction.<k>``, float32, 1-D of ``n_embd`` values;
- ``k`` is the 0-based block whose *output* gets the vector added (llama.cpp adds
  ``direction.<k>`` to ``l_out`` of layer ``k``, at every position) — the same site as melbo's
  ``blocks.{k}.hook_resid_post``. ``k = 0`` is rejected by llama.cpp (its buffer has no slot for
  layer 0), so a vector at source layer 0 cannot be exported;
- metadata ``controlvector.model_hint`` (the model's architecture) and
  ``controlvector.layer_count`` (here: the number of ``direction`` tensors).

llama.cpp's ``--control-vector-scaled F S`` multiplies every direction by ``S``; a file written
here already holds ``scale · θ``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from melbo.core.errors import MelboError
from melbo.core.io import atomic_write

ARCH = "controlvector"
HINT_KEY = "controlvector.model_hint"
COUNT_KEY = "controlvector.layer_count"
_NAME = re.compile(r"direction\.(\d+)")


@dataclass(frozen=True)
class ControlVector:
    """The contents of a llama.cpp control-vector file.

    Attributes:
        directions: block index ``k`` (0-based, ≥ 1) → ``[n_embd]`` float32 vector added to
            that block's output.
        model_hint: the architecture it was made for (``llama``, ``gemma3``, ...), or "".
    """

    directions: dict[int, torch.Tensor]
    model_hint: str = ""

    @property
    def n_embd(self) -> int:
        return int(next(iter(self.directions.values())).shape[0])


def write_control_vector(path: str | os.PathLike, cv: ControlVector) -> Path:
    """Write ``cv`` as a llama.cpp control-vector GGUF, atomically.

    Raises:
        MelboError: no direction, a layer index below 1 (llama.cpp rejects layer 0), widths that
            differ, a tensor that is not 1-D or not finite, or the write fails (nothing is left).
    """
    from gguf import GGUFWriter  # a declared dependency; imported here to keep `import melbo` light

    if not cv.directions:
        raise MelboError("a control vector needs at least one direction")
    widths = set()
    for k, t in cv.directions.items():
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise MelboError(
                f"control-vector layer {k!r} cannot be written: llama.cpp reads direction.<k> for blocks "
                f"k = 1 ... n_layer - 1 and rejects k = 0; steer after block 1 or later"
            )
        if t.dim() != 1:
            raise MelboError(f"direction.{k} must be 1-D [n_embd], got shape {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise MelboError(f"direction.{k} holds NaN or inf values; nothing was written")
        widths.add(int(t.shape[0]))
    if len(widths) != 1:
        raise MelboError(f"every direction must have the same width n_embd, got widths {sorted(widths)}")

    def write(tmp: str) -> None:
        w = GGUFWriter(tmp, ARCH)
        w.add_string(HINT_KEY, cv.model_hint)
        w.add_uint32(COUNT_KEY, len(cv.directions))
        for k in sorted(cv.directions):
            w.add_tensor(f"direction.{k}", cv.directions[k].detach().float().cpu().numpy().astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return atomic_write(path, write)


def read_control_vector(path: str | os.PathLike) -> ControlVector:
    """Read a control-vector GGUF (melbo's, llama.cpp's ``cvector-generator``'s or repeng's),
    checking it as llama.cpp's loader does.

    Raises:
        MelboError: missing or unreadable file, not GGUF, another architecture, a tensor name
            other than ``direction.<k>`` with ``k ≥ 1``, a tensor that is not 1-D float32, widths
            that differ, non-finite values, or no direction at all.
    """
    from gguf import GGMLQuantizationType, GGUFReader

    p = Path(path)
    if not p.is_file():
        raise MelboError(f"control vector {str(p)!r} does not exist")
    try:
        reader = GGUFReader(str(p))
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError, struct.error, ... on bad files
        why = str(e).splitlines()[0] if str(e) else repr(e)
        raise MelboError(f"{str(p)!r} is not a readable GGUF file ({why})") from None

    def field_str(key: str) -> str | None:
        f = reader.fields.get(key)
        if f is None or not f.data:
            return None
        return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")

    arch = field_str("general.architecture")
    if arch != ARCH:
        raise MelboError(f"{str(p)!r} is a GGUF of architecture {arch!r}, not a control vector ({ARCH!r})")
    directions: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        m = _NAME.fullmatch(t.name)
        if m is None or int(m.group(1)) < 1:
            raise MelboError(f"control vector {str(p)!r} holds tensor {t.name!r}; expected direction.<k> with k >= 1")
        if t.tensor_type != GGMLQuantizationType.F32:
            raise MelboError(f"control vector {str(p)!r}: {t.name} is {t.tensor_type.name}, expected F32")
        data = np.asarray(t.data, dtype=np.float32)
        if data.ndim != 1:
            raise MelboError(f"control vector {str(p)!r}: {t.name} has shape {data.shape}, expected 1-D [n_embd]")
        vec = torch.from_numpy(data.copy())
        if not torch.isfinite(vec).all():
            raise MelboError(f"control vector {str(p)!r}: {t.name} holds NaN or inf values")
        directions[int(m.group(1))] = vec
    if not directions:
        raise MelboError(f"control vector {str(p)!r} holds no direction.<k> tensor")
    widths = sorted({int(v.shape[0]) for v in directions.values()})
    if len(widths) != 1:
        raise MelboError(f"control vector {str(p)!r} has directions of different widths {widths}")
    return ControlVector(directions, field_str(HINT_KEY) or "")
