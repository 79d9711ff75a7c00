"""Δ, the map deep causal transcoding and the radius calibration work on (METHOD.md section 5).

The slice ``f`` maps ``h_src`` to ``h_tgt`` (blocks ``src+1..tgt``). For prompts ``x_i`` with
cached ``y_i = f(x_i)`` and positions ``I_i`` (padding never counts),

    Δ(θ) = mean_i mean_{t∈I_i} [f(x_i + θ) − y_i]_t                      (one d_model vector)

with θ added at every position (``writes_only``: ``Δ(θ) − θ``, only what the blocks write).
Everything works on rows: Δ is evaluated for a batch of ``V`` vectors at once, and its Jacobian
products too: ``jvp`` (forward mode, ``torch.func.jvp``) and ``vjp`` (reverse mode).

Forward-mode AD does not go through SDPA/flash attention kernels: :meth:`DeltaMap.from_batch`
builds the slice with eager attention and runs every evaluation under it (the model is switched
back afterwards), so a model loaded with the default ``sdpa`` works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from melbo.core.errors import MelboError
from melbo.core.models import LoadedModel, check_layers, default_layers
from melbo.core.prompts import PromptBatch, encode_prompts, parse_positions
from melbo.core.slice import Slice

DEFAULT_POSITIONS = "last:3"


# ---------------------------------------------------------------- attention for forward-mode AD


@contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Run ``model`` with eager attention inside the block; restore its implementation after.

    Forward-mode AD (JVPs) is not implemented for the SDPA / flash attention kernels. Models that
    cannot switch (no ``set_attn_implementation``) are left as they are.
    """
    cfg = getattr(model, "config", None)
    old = getattr(cfg, "_attn_implementation", None)
    switch = old not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        try:
            model.set_attn_implementation("eager")
        except Exception as e:  # noqa: BLE001 -- transformers raises several types
            raise MelboError(
                f"cannot switch {type(model).__name__} to eager attention ({e}); "
                f"load it with attn_implementation='eager'"
            ) from e
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(old)


def _forward_ad_error(e: Exception) -> MelboError:
    return MelboError(
        f"forward-mode AD (a JVP) failed: {str(e).splitlines()[0]}. JVPs need eager attention: build Δ with "
        f"DeltaMap.from_model / DeltaMap.from_batch (they switch to eager attention), or load the model "
        f"with attn_implementation='eager'"
    )


# ---------------------------------------------------------------- Δ and its derivatives


class FunctionDelta:
    """A row-wise map ``Δ: [V, d] -> [V, d]`` with the products DCT needs.

    Row ``v`` of the output depends only on row ``v`` of the input, so one batched call
    evaluates Δ at many points, and the JVP/VJP of the batch are the per-row JVPs/VJPs.

    Args:
        fn: a differentiable torch function of ``theta [V, d]`` returning ``[V, d]``.
        d_model: d.
        chunk_size: vectors per call of ``fn`` (None: all at once).
        device: where ``fn`` wants its input (default cpu).
        dtype: the float type inputs are cast to and results returned in (float32; float64 for
            checks that need the precision).
    """

    writes_only = False

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        d_model: int,
        chunk_size: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.fn = fn
        self._d = int(d_model)
        self.chunk_size = chunk_size
        self._device = torch.device(device)
        self.dtype = dtype

    @property
    def d_model(self) -> int:
        return self._d

    @property
    def device(self) -> torch.device:
        return self._device

    def _eval(self, theta: torch.Tensor) -> torch.Tensor:
        return self.fn(theta)

    def _context(self) -> AbstractContextManager:
        return nullcontext()

    def _chunks(self, *xs: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
        n = xs[0].shape[0]
        step = self.chunk_size or max(1, n)
        for s in range(0, max(n, 1), step):
            yield tuple(x[s : s + step].to(self.device, self.dtype) for x in xs)

    def _check(self, theta: torch.Tensor) -> None:
        if theta.dim() != 2 or theta.shape[1] != self.d_model:
            raise MelboError(f"Δ takes vectors of shape [V, {self.d_model}], got {tuple(theta.shape)}")

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        """``Δ(θ_v)`` for each row. ``theta [V, d]`` -> ``[V, d]`` in ``dtype`` (activation units)."""
        self._check(theta)
        with torch.no_grad(), self._context():
            return torch.cat([self._eval(t).to(self.dtype) for (t,) in self._chunks(theta)])

    def jvp(self, theta: torch.Tensor, tangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward mode: ``(Δ(θ_v), J(θ_v) t_v)`` for each row (``torch.func.jvp``). Both ``[V, d]``.

        Raises:
            MelboError: the model's attention kernel has no forward-mode AD (use eager).
        """
        self._check(theta)
        vals, jvs = [], []
        with torch.no_grad(), self._context():
            for t, tg in self._chunks(theta, tangent):
                try:
                    v, jv = torch.func.jvp(self._eval, (t,), (tg,))  # type: ignore[misc]
                except NotImplementedError as e:
                    raise _forward_ad_error(e) from e
                vals.append(v.to(self.dtype))
                jvs.append(jv.to(self.dtype))
        return torch.cat(vals), torch.cat(jvs)

    def vjp(self, theta: torch.Tensor, cotangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse mode: ``(Δ(θ_v), J(θ_v)ᵀ c_v)`` for each row. Both ``[V, d]``."""
        self._check(theta)
        vals, grads = [], []
        with torch.enable_grad(), self._context():
            for t, c in self._chunks(theta, cotangent):
                t = t.detach().requires_grad_(True)
                out = self._eval(t).to(self.dtype)
                (g,) = torch.autograd.grad(out, t, grad_outputs=c)
                vals.append(out.detach())
                grads.append(g.to(self.dtype))
        return torch.cat(vals), torch.cat(grads)

    def second_derivative(self, theta: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """``D²Δ(θ_v)[w_v, w_v]`` for each row. ``[V, d]``.

        Reverse mode only (third-order autograd: ``∇_c ⟨w, ∇_x ⟨w, ∇_x ⟨c, Δ(x)⟩⟩⟩``, linear in
        the dummy cotangent ``c``): nested forward mode is not reliable (torch 2.x's forward-AD
        formula of ``layer_norm`` is wrong at second order, and ``silu``'s is missing).
        """
        self._check(theta)
        out = []
        with torch.enable_grad(), self._context():
            for t, w in self._chunks(theta, direction):
                t = t.detach().requires_grad_(True)
                y = self._eval(t).to(self.dtype)
                c = torch.zeros_like(y, requires_grad=True)
                (g,) = torch.autograd.grad(y, t, grad_outputs=c, create_graph=True)
                h = (
                    torch.autograd.grad(g, t, grad_outputs=w, create_graph=True, allow_unused=True)[0]
                    if g.requires_grad
                    else None
                )
                if h is None or not h.requires_grad:  # Δ is linear: D²Δ = 0
                    out.append(torch.zeros_like(w))
                    continue
                (r,) = torch.autograd.grad(h, c, grad_outputs=w, allow_unused=True)
                out.append(torch.zeros_like(w) if r is None else r.to(self.dtype))
        return torch.cat(out)

    def second_vjp(self, theta: torch.Tensor, direction: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
        """``∇_x ⟨c_v, J(x) w_v⟩`` at ``x = θ_v`` = ``D²Δ(θ_v)[c_v; w_v, ·]``: the Hessian of
        ``⟨c_v, Δ⟩`` times ``w_v`` (double backward). ``[V, d]``."""
        self._check(theta)
        out = []
        with torch.enable_grad(), self._context():
            for t, w, c in self._chunks(theta, direction, cotangent):
                t = t.detach().requires_grad_(True)
                y = self._eval(t).to(self.dtype)
                (g,) = torch.autograd.grad(y, t, grad_outputs=c, create_graph=True)
                h = torch.autograd.grad(g, t, grad_outputs=w, allow_unused=True)[0] if g.requires_grad else None
                out.append(torch.zeros_like(w) if h is None else h.to(self.dtype))
        return torch.cat(out)


class DeltaMap(FunctionDelta):
    """``Δ(θ) = mean_i mean_{t∈I_i} [f(x_i + θ) − y_i]_t`` on a :class:`melbo.core.slice.Slice`
    (METHOD.md section 5), batched over vectors.

    Build it with :meth:`from_model` or :meth:`from_batch` (eager attention, for JVPs). Wrapping
    an existing ``Slice`` directly works for Δ and VJPs; its JVPs need the slice to have been
    built with eager attention.

    Args:
        slice_: the truncated pass; its ``writes_only`` decides whether Δ includes θ itself.
        model: when given, every evaluation runs under :func:`eager_attention` of it.
        chunk_size: vectors per batched call (None: ``max(1, 256 // n_prompts)``).

    Attributes:
        weights: ``[n, T]``, ``1 / (n·|I_i|)`` on counted positions, 0 elsewhere (padding).
        dtype: float32 (float64 for a float64 model); Δ and its products come in it.
    """

    def __init__(self, slice_: Slice, model: Any = None, chunk_size: int | None = None):
        self.slice = slice_
        self.model = model
        mask = slice_.mask
        counts = mask.sum(dim=1).clamp(min=1).float()
        self.weights = mask.float() / (counts[:, None] * mask.shape[0])
        dtype = torch.float64 if slice_.h_src.dtype == torch.float64 else torch.float32
        self.weights = self.weights.to(dtype)
        self._z0 = slice_.z0.to(dtype)
        super().__init__(self._delta, slice_.d_model, chunk_size or max(1, 256 // slice_.n), slice_.h_src.device, dtype)

    @classmethod
    def from_batch(
        cls,
        model: Any,
        blocks: Any,
        batch: PromptBatch,
        source_layer: int,
        target_layer: int,
        writes_only: bool = False,
        chunk_size: int | None = None,
    ) -> DeltaMap:
        """Δ on an encoded prompt batch (its ``target_mask`` are the positions ``I_i``), blocks
        ``source_layer+1..target_layer`` (both resolved, ``0 <= src < tgt < L``)."""
        with eager_attention(model):
            s = Slice(model, blocks, batch, source_layer, target_layer, writes_only=writes_only)
        return cls(s, model, chunk_size)

    @classmethod
    def from_model(
        cls,
        lm: LoadedModel,
        prompts: list[str],
        source_layer: int | None = None,
        target_layer: int | None = None,
        positions: str = DEFAULT_POSITIONS,
        writes_only: bool = False,
        chat: bool = False,
        chunk_size: int | None = None,
    ) -> DeltaMap:
        """Δ of a :class:`melbo.core.models.LoadedModel` on ``prompts`` (last 3 tokens by default).

        Layers default to :func:`melbo.core.models.default_layers`; negative ones count from the end.

        Raises:
            MelboError: bad prompts, positions or layers.
        """
        L = lm.num_layers
        d_src, d_tgt = default_layers(L)
        src, tgt = check_layers(
            d_src if source_layer is None else source_layer, d_tgt if target_layer is None else target_layer, L
        )
        batch = encode_prompts(
            lm.tokenizer, prompts, parse_positions(positions) if isinstance(positions, str) else positions, chat
        )
        return cls.from_batch(lm.model, lm.blocks, batch, src, tgt, writes_only, chunk_size)

    @property
    def writes_only(self) -> bool:  # type: ignore[override]
        return self.slice.writes_only

    @property
    def source_layer(self) -> int:
        return self.slice.src

    @property
    def target_layer(self) -> int:
        return self.slice.tgt

    def _context(self) -> AbstractContextManager:
        return eager_attention(self.model) if self.model is not None else nullcontext()

    def _delta(self, theta: torch.Tensor) -> torch.Tensor:
        z = self.slice(theta).to(self.dtype)  # [V, n, T, d]
        return torch.einsum("vntd,nt->vd", z - self._z0[None], self.weights)

    def residual_norm(self) -> float:
        """Median ‖h_src‖₂ over the counted positions (the residual scale at the source)."""
        return self.slice.residual_norm()
