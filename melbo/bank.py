"""A bank: the perturbations a run found, their random baseline at the same R, and how they were
found. What :func:`melbo.train` returns, and what a run folder holds (``bank.safetensors``).

The file is safetensors: the learned perturbations (``vectors [N, d_model]`` float32, or for
adapters ``omega_a [N, d_hidden, r]`` and ``omega_b [N, d_model, r]``), the random baseline
(``random_vectors`` / ``random_omega_*``), the starts and any method extras, and one JSON
metadata entry ``"melbo"`` (format tag, melbo version, the model's identity, method, layers, R,
every setting, and one info dict per perturbation). Nothing is ever unpickled.

Example:
    >>> import melbo                                                     # doctest: +SKIP
    >>> bank = melbo.train(lm, ["Once upon a time"], radius="0.2x")       # doctest: +SKIP
    >>> bank.generate(["The dog ran"], vectors=[0, 3])                   # doctest: +SKIP
    >>> with (bank[3] - 0.5 * bank[7]).apply(lm):                         # doctest: +SKIP
    ...     ...
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from melbo._version import __version__
from melbo.bank_format import BANK_FILE, FORMAT, LEARNED, PEFT_DIR, check_contents, export_peft
from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig, generate_rows
from melbo.core.hooks import steer
from melbo.core.io import load_tensors, make_dir, remove_stale_temps, save_tensors
from melbo.core.lora import apply_adapter, module_by_name
from melbo.core.models import LoadedModel, load_model, resolve_layer
from melbo.core.validate import check_number, parse_indices
from melbo.measure import KLCurves, kl_of
from melbo.vector import SteeringAdapter, SteeringVector


class Bank:
    """Perturbations of one model with metadata; ``len(bank)``, ``bank[i]``, ``bank.random``.

    Args:
        tensors: named tensors (module docstring); for kind ``vector`` at least ``vectors [N, d]``.
        meta: JSON-able metadata; ``meta["kind"]`` is ``vector`` (default) or ``adapter``.
        lm: the loaded model the bank is used with (not saved); when None, methods that need a
            model load ``meta["model"]`` on first use.

    Raises:
        MelboError: a malformed bank (missing tensors, wrong shapes, an unknown kind).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict, lm: LoadedModel | None = None):
        self.tensors = {k: v.detach().float().cpu() for k, v in tensors.items()}
        self.meta = dict(meta)
        self.meta.setdefault("kind", "vector")
        self.lm = lm
        self.evaluation: dict | None = None  # set by melbo.train when it generated completions
        check_contents(self.tensors, self.meta)

    # ------------------------------------------------------------ shape and identity

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "vector"))

    @property
    def method(self) -> str:
        return str(self.meta.get("method", "melbo"))

    @property
    def layer(self) -> int:
        """The source layer: the block after which vectors are added (adapters: whose MLP they change)."""
        return int(self.meta.get("source_layer", 0))

    @property
    def d_model(self) -> int:
        return int(self.tensors["vectors"].shape[1] if self.kind == "vector" else self.tensors["omega_b"].shape[1])

    @property
    def vectors(self) -> torch.Tensor:
        """``[N, d_model]`` the learned steering vectors (vector banks only)."""
        if self.kind != "vector":
            raise MelboError("an adapter bank holds adapters, not vectors; index it (bank[i]) for a SteeringAdapter")
        return self.tensors["vectors"]

    @property
    def random_vectors(self) -> torch.Tensor | None:
        return self.tensors.get("random_vectors")

    def __len__(self) -> int:
        return int(self.tensors[LEARNED[self.kind][0]].shape[0])

    def info(self, i: int) -> dict:
        rows = self.meta.get("vectors") or []
        return rows[i] if i < len(rows) else {}

    def __getitem__(self, i: int) -> SteeringVector | SteeringAdapter:
        """Perturbation ``i`` as a :class:`SteeringVector` (or :class:`SteeringAdapter`).

        Raises:
            MelboError: an index outside the bank.
        """
        if isinstance(i, bool) or not isinstance(i, int):
            raise MelboError(f"bank index must be an integer, got {i!r}; use bank.subset([...]) for several")
        j = parse_indices(i if i >= 0 else len(self) + i, len(self), self._noun())[0]
        label = f"{'random ' if self.meta.get('baseline') else ''}{self._noun()} {j}"
        meta = {
            "target_layer": self.meta.get("target_layer"),
            "method": self.method,
            "prompts": list(self.meta.get("prompts", [])),
            **self.info(j),
        }
        if self.kind == "vector":
            return SteeringVector(self.tensors["vectors"][j], self.layer, self.meta.get("model"), label, meta)
        return SteeringAdapter(
            self.tensors["omega_a"][j],
            self.tensors["omega_b"][j],
            float(self.meta["radius"]),
            str(self.meta["module_name"]),
            self.layer,
            self.meta.get("model"),
            label,
            meta,
        )

    def __iter__(self) -> Iterator[SteeringVector | SteeringAdapter]:
        return (self[i] for i in range(len(self)))

    def _noun(self) -> str:
        return "adapter" if self.kind == "adapter" else "vector"

    def subset(self, indices: Any) -> Bank:
        """A bank of the perturbations ``indices`` (``"0-3,7"``, a list, ...) and their baseline rows."""
        idx = parse_indices(indices, len(self), self._noun())
        per_row = {"vectors", "start_vectors", "u_directions", "omega_a", "omega_b", "start_omega_a", "start_omega_b"}
        tensors = {k: (v[idx] if k in per_row else v) for k, v in self.tensors.items()}
        meta = {**self.meta, "vectors": [self.info(i) for i in idx], "subset_of": idx}
        return Bank(tensors, meta, self.lm)

    @property
    def random(self) -> Bank | None:
        """The random baseline at the same R, as a bank of the same kind (None when absent)."""
        names = {
            "vector": {"random_vectors": "vectors"},
            "adapter": {"random_omega_a": "omega_a", "random_omega_b": "omega_b"},
        }[self.kind]
        if not all(k in self.tensors for k in names):
            return None
        tensors = {new: self.tensors[old] for old, new in names.items()}
        objs = self.meta.get("random_objectives") or []
        rows = [{"objective": o} for o in objs] if len(objs) == len(tensors[next(iter(names.values()))]) else []
        return Bank(tensors, {**self.meta, "baseline": True, "vectors": rows}, self.lm)

    def table(self) -> list[dict]:
        """One row per perturbation: index, norm (vectors) and its recorded info (objective,
        cosine between start and end, α for DCT, ...). Ready for ``pandas.DataFrame``."""
        rows = []
        for i in range(len(self)):
            row: dict[str, Any] = {"index": i}
            if self.kind == "vector":
                row["norm"] = float(self.tensors["vectors"][i].double().norm())
            row.update({k: v for k, v in self.info(i).items() if k != "index"})
            rows.append(row)
        return rows

    def __repr__(self) -> str:
        return (
            f"Bank({len(self)} {self._noun()}s, method={self.method!r}, model={self.meta.get('model')!r}, "
            f"layers {self.meta.get('source_layer')} -> {self.meta.get('target_layer')}, "
            f"R={self.meta.get('radius', float('nan')):.4g}{', random baseline' if self.random else ''})"
        )

    # ------------------------------------------------------------ the model

    def check_model(self, lm: LoadedModel) -> None:
        """Refuse a model the bank was not made for.

        Raises:
            MelboError: model type, hidden size or number of layers differ, or (adapters) the
                target module is missing.
        """
        want = lm.identity()
        for key in ("hidden_size", "num_layers", "model_type"):
            if key in self.meta and self.meta[key] != want[key]:
                raise MelboError(
                    f"bank was made for model {self.meta.get('model')!r} with {key}={self.meta[key]!r}, "
                    f"but model {lm.name!r} has {key}={want[key]!r}; use the model the bank was trained on"
                )
        if self.d_model != lm.d_model:
            raise MelboError(f"bank vectors are {self.d_model} wide, model {lm.name!r} has d_model={lm.d_model}")
        if self.kind == "adapter":
            module_by_name(lm, str(self.meta.get("module_name")))

    def attach(self, lm: LoadedModel) -> Bank:
        """Use ``lm`` for generation and KL from now on (checked). Returns the bank."""
        self.check_model(lm)
        self.lm = lm
        return self

    def model(self) -> LoadedModel:
        """The attached model, loading ``meta["model"]`` the first time when none is attached."""
        if self.lm is None:
            name = self.meta.get("model")
            if not name:
                raise MelboError("the bank does not say which model it was made for; attach one with bank.attach(lm)")
            self.attach(load_model(str(name)))
        assert self.lm is not None
        return self.lm

    def perturb(self, scale: float = 1.0, include_unsteered: bool = False, positions: str = "all") -> tuple[int, Any]:
        """``(count, perturb)``: ``perturb(rows)`` is a context manager under which batch row ``j``
        carries perturbation ``rows[j]`` (row 0 is unsteered with ``include_unsteered``)."""
        lm = self.model()
        scale = check_number("scale", scale)
        off = 1 if include_unsteered else 0
        if self.kind == "vector":
            vecs = self.tensors["vectors"]
            if off:
                vecs = torch.cat([torch.zeros(1, vecs.shape[1]), vecs])
            layer = resolve_layer(self.layer, lm.num_layers, "layer")
            return len(vecs), lambda rows: steer(lm.blocks, layer, vecs[rows].to(lm.device), scale, positions)
        module = module_by_name(lm, str(self.meta["module_name"]))
        a, b = self.tensors["omega_a"], self.tensors["omega_b"]
        r = torch.full((len(a),), float(self.meta["radius"]) * scale)
        if off:
            a, b, r = torch.cat([a[:1], a]), torch.cat([b[:1], b]), torch.cat([torch.zeros(1), r])

        def apply(rows: list[int]) -> AbstractContextManager:
            if positions != "all":
                raise MelboError("adapters change the model at every position; steering positions apply to vectors")
            return apply_adapter(module, a[rows], b[rows], r[rows]) if rows else nullcontext()

        return len(a), apply

    # ------------------------------------------------------------ looking at what was found

    def generate(
        self,
        prompts: list[str] | str,
        vectors: Any = None,
        scale: float = 1.0,
        unsteered: bool = True,
        random: bool = False,
        **generation: Any,
    ) -> dict[str, list[str]]:
        """Completions of ``prompts`` under the chosen perturbations, batched.

        Args:
            prompts: one prompt or several.
            vectors: which perturbations (None: all; ``"0-3,7"``; a list of indices).
            scale: multiplies every vector (adapters: their R).
            unsteered: also return the unsteered completions (key ``"unsteered"``).
            random: use the random baseline instead of the learned perturbations.
            generation: :class:`melbo.core.generate.GenerationConfig` fields (``max_new_tokens``,
                ``temperature``, ``chat``, ``steer_positions`` = ``all``/``prompt``/``generated``).

        Returns:
            ``{label: [completion of each prompt]}``, labels ``"unsteered"``, ``"vector 3"``, ...

        Raises:
            MelboError: bad indices, prompts or generation settings; no random baseline; no
                perturbation chosen (an empty bank).
        """
        src = self.random if random else self
        if src is None:
            raise MelboError("this bank holds no random baseline")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cfg = GenerationConfig(**generation)
        if not len(src):  # choosing nothing would return only the unsteered text, as if it had worked
            raise MelboError(f"the bank holds no {self._noun()}s (0 rows); there is nothing to generate with")
        sub = src.subset(vectors) if vectors is not None else src
        count, perturb = sub.perturb(scale, unsteered, cfg.steer_positions)
        comps = generate_rows(sub.model(), prompts, count, perturb, cfg)
        idx = sub.meta.get("subset_of", list(range(len(sub))))
        labels = (["unsteered"] if unsteered else []) + [
            f"{'random ' if random else ''}{self._noun()} {i}" for i in idx
        ]
        return dict(zip(labels, comps))

    def generate_beside_random(
        self, prompts: list[str], count: int | None = None, **generation: Any
    ) -> tuple[list[str], list[list[str]], list[list[str]]]:
        """The unsteered completions, the first ``count`` perturbations' (default all) and as many
        random ones', all rows of one batched ``generate`` (a perturbation per row): what
        ``generate(vectors=range(count))`` and ``generate(..., random=True, unsteered=False)``
        give, with the model's weights read once per token instead of once per call.

        Returns:
            ``(unsteered[i], learned[v][i], random[v][i])`` (no random rows without a baseline).

        Raises:
            MelboError: as :meth:`generate`.
        """
        cfg = GenerationConfig(**generation)
        if not len(self):
            raise MelboError(f"the bank holds no {self._noun()}s (0 rows); there is nothing to generate with")
        k = len(self) if count is None else min(count, len(self))
        rand = self.random
        kr = min(k, len(rand)) if rand is not None else 0
        parts = [self] + ([rand] if rand is not None and kr else [])
        tensors = {n: torch.cat([b.tensors[n][: (k if b is self else kr)] for b in parts]) for n in LEARNED[self.kind]}
        both = Bank(tensors, {key: v for key, v in self.meta.items() if key != "vectors"}, self.model())
        rows, perturb = both.perturb(1.0, True, cfg.steer_positions)
        comps = generate_rows(both.model(), prompts, rows, perturb, cfg)
        return comps[0], comps[1 : 1 + k], comps[1 + k :]

    def kl(
        self,
        prompts: list[str] | str | None = None,
        reference: int | None = None,
        vectors: Any = None,
        scale: float = 1.0,
        direction: str = "k||ref",
        chat: bool | None = None,
        batch_size: int = 64,
    ) -> KLCurves:
        """KL divergence (nats) of the next-token distribution at the last prompt position under
        each perturbation, against perturbation ``reference`` and against the unsteered model
        (METHOD.md section 3; direction as in :mod:`melbo.measure`). Prompts default to the
        bank's training prompts."""
        prompts = list(self.meta.get("prompts", [])) if prompts is None else prompts
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        sub = self.subset(vectors) if vectors is not None else self
        if sub.kind == "vector" and not (sub.vectors.abs().sum(-1) > 0).any():
            raise MelboError("every chosen vector is zero: the KL divergence would be 0 everywhere")
        ref = None
        if reference is not None:
            idx = sub.meta.get("subset_of", list(range(len(sub))))
            parse_indices(reference, len(self), self._noun())
            if reference not in idx:
                sub, idx = self.subset(list(idx) + [reference]), list(idx) + [reference]
            ref = idx.index(reference)
        count, perturb = sub.perturb(scale)
        use_chat = bool(self.meta.get("chat", False)) if chat is None else chat
        out = kl_of(sub.model(), prompts, count, perturb, ref, use_chat, batch_size, direction)
        return out

    # ------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank: ``path`` is a run folder (gets ``bank.safetensors``, and for adapters
        one PEFT LoRA folder per adapter in ``peft/adapter_NNN``) or a ``.safetensors`` file.
        Atomic: a bank on disk is always whole. Returns the file written."""
        p = Path(path)
        file = p if p.suffix == ".safetensors" else p / BANK_FILE
        make_dir(file.parent, "bank folder")
        meta = {**self.meta, "melbo_version": __version__, "rows": len(self)}
        save_tensors(file, self.tensors, meta, FORMAT)
        if self.kind == "adapter" and p.suffix != ".safetensors":
            self.export_peft(p / PEFT_DIR)
        return file

    def export_peft(self, folder: str | os.PathLike, skip_existing: bool = True) -> list[Path]:
        """One PEFT LoRA folder per adapter, ``folder/adapter_NNN`` (adapter banks only)."""
        return export_peft(self.tensors, self.meta, folder, skip_existing)

    @classmethod
    def load(cls, path: str | os.PathLike, lm: LoadedModel | None = None) -> Bank:
        """Read a bank from a run folder or a ``.safetensors`` file; with ``lm``, check that it was
        made for that model and attach it.

        Raises:
            MelboError: no bank there, not a melbo bank (format tag), a corrupt or truncated file,
                malformed metadata, a bank of another model.
        """
        p = Path(path)
        file = p / BANK_FILE if p.is_dir() else p
        if p.is_dir() and not file.is_file():
            raise MelboError(f"{str(p)!r} holds no {BANK_FILE}; give a melbo run folder or a bank file")
        if p.is_dir():
            remove_stale_temps(p)
        tensors, meta = load_tensors(file, FORMAT, "bank")
        bank = cls(tensors, meta)
        if lm is not None:
            bank.attach(lm)
        return bank
