"""Naive, obviously-correct MELBO (METHOD.md section 1, literally): one vector and one prompt at a
time, the full model every time, the steering vector applied by a hook. The fast path in melbo
must agree with it from the same start."""

from __future__ import annotations

import torch

from melbo.core.hooks import block_output, steer


def target_activations(lm, prompt_ids: torch.Tensor, src: int, tgt: int, theta: torch.Tensor | None):
    """h_tgt ``[T, d]`` of one unpadded prompt ``[T]``, with θ added after block src (full model)."""
    got = {}
    h = lm.blocks[tgt].register_forward_hook(lambda m, a, o: got.__setitem__("z", block_output(o)))
    try:
        with steer(lm.blocks, src, theta):
            lm.model(input_ids=prompt_ids[None])
    finally:
        h.remove()
    return got["z"][0]


def objective(lm, prompts: list[torch.Tensor], positions: list[list[int]], src, tgt, theta, p, q):
    """Σ_i (Σ_{t∈I_i} ‖Z_i,t(θ) − Z_i,t(0)‖^p)^(1/q), one prompt at a time."""
    total = 0.0
    for ids, pos in zip(prompts, positions):
        with torch.no_grad():
            z0 = target_activations(lm, ids, src, tgt, None)
        z = target_activations(lm, ids, src, tgt, theta)
        s = sum((z[t] - z0[t]).norm() ** p for t in pos)
        total = total + s ** (1.0 / q)
    return total


def train_vector(lm, prompts, positions, src, tgt, start, earlier, R, p, q, steps, lr):
    """The METHOD.md steps: project the gradient onto the tangent space and the complement of
    the earlier vectors, AdamW (AMSGrad, betas 0.9/0.98) step on −objective, project θ onto the
    complement, rescale to R."""
    theta = start.clone().requires_grad_(True)
    opt = torch.optim.AdamW([theta], lr=lr, betas=(0.9, 0.98), weight_decay=0.0, amsgrad=True)
    Q = None
    if earlier is not None and len(earlier):
        Q, _ = torch.linalg.qr(earlier.double().T)  # columns: orthonormal basis of earlier vectors
    for _ in range(steps):
        opt.zero_grad()
        (-objective(lm, prompts, positions, src, tgt, theta, p, q)).backward()
        with torch.no_grad():
            g = theta.grad.double()
            if Q is not None:
                g = g - Q @ (Q.T @ g)
            u = theta.double() / theta.double().norm()
            g = g - (g @ u) * u
            theta.grad.copy_(g.float())
        opt.step()
        with torch.no_grad():
            t = theta.double()
            if Q is not None:
                t = t - Q @ (Q.T @ t)
            theta.copy_((t * R / t.norm()).float())
    return theta.detach()
