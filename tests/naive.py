"""Naive, obviously-correct MELBO (METHOD.md section 1, literally): one vector and one prompt at a
time, the full model every time, the steering vector applied by a hook. The fast path in melbo
must agree with it from the same start."""

from __future__ import annotations

import torch
from torch.func import functional_call

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


def naive_adapter_objective(lm, mlp, batch, a, b, R, tgt, p, q):
    """Full model, W' = W + R Ω_B Ω_Aᵀ substituted into the weight, Σ_i (Σ_t ‖Z − Z0‖^p)^(1/q)
    with explicit loops."""
    name = mlp.full_name + ".weight"
    W = dict(lm.model.named_parameters())[name]
    delta = R * b @ a.T  # [d_model, d_hidden]
    if mlp.conv1d:
        delta = delta.T
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    z = functional_call(lm.model, {name: W + delta}, args=(), kwargs=inputs).hidden_states[tgt + 1]
    with torch.no_grad():
        z0 = lm.model(**inputs).hidden_states[tgt + 1]
    total = 0.0
    for i in range(z.shape[0]):
        s = 0.0
        for t in range(z.shape[1]):
            if batch.target_mask[i, t]:
                s = s + (z[i, t] - z0[i, t]).norm() ** p
        total = total + s ** (1.0 / q)
    return total
