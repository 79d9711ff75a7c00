"""Rank-1 factor populations (melbo.methods.rank1): the population step against a naive, literal
step (full model, one factor at a time, explicit loops for the penalty), chunked = unchunked,
the constraints, the soft orthogonality doing its job, PEFT export, bad settings."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_loaded
from naive import naive_adapter_objective
from peft import PeftModel

import melbo
from melbo.core.errors import MelboError
from melbo.core.peft import load_peft_adapter
from melbo.core.prompts import encode_prompts
from melbo.methods.adapter import AdapterSlice
from melbo.methods.melbo_train import BETAS
from melbo.methods.rank1 import factor_start, overlap, population_step

PROMPTS = ["Hello there, friend", "The cat sat"]


def starts(mlp, N, seed=0):
    pairs = [factor_start(k, mlp.d_hidden, mlp.d_model, seed) for k in range(N)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def naive_steps(lm, mlp, batch, a0, b0, R, tgt, lam, lr, steps):
    """METHOD.md section 1's objective per factor on the full model (weight substituted), the
    penalty with loops, tangent projection and renormalization per vector."""
    A = [a0[i, :, 0].clone().requires_grad_(True) for i in range(len(a0))]
    B = [b0[i, :, 0].clone().requires_grad_(True) for i in range(len(b0))]
    opt = torch.optim.AdamW(A + B, lr=lr, betas=BETAS, weight_decay=0.0, amsgrad=True)
    N, history = len(A), []
    for _ in range(steps):
        opt.zero_grad()
        objs = [
            naive_adapter_objective(lm, mlp, batch, A[i][:, None], B[i][:, None], R, tgt, 2.0, 1.0) for i in range(N)
        ]
        mean = sum(objs) / N
        pen = 0.0
        for i in range(N):
            for j in range(N):
                if i != j:
                    pen = pen + ((A[i] @ A[j]) * (B[i] @ B[j])) ** 2
        loss = -mean + lam * mean.detach() * pen / (N * (N - 1))
        loss.backward()
        history.append([float(o.detach()) for o in objs])
        with torch.no_grad():
            for v in A + B:
                v.grad -= (v.grad @ v) * v
        opt.step()
        with torch.no_grad():
            for v in A + B:
                v /= v.norm()
    return torch.stack(A)[..., None].detach(), torch.stack(B)[..., None].detach(), history


@pytest.mark.parametrize("chunk", [1, 3])
def test_population_step_matches_naive_and_chunking_changes_nothing(chunk):
    lm = tiny_loaded("llama")
    src, tgt, R, lam, lr = 1, 2, 3.0, 5.0, 0.05
    batch = encode_prompts(lm.tokenizer, PROMPTS, "all")
    aslice = AdapterSlice(lm, batch, src, tgt)
    a0, b0 = starts(aslice.mlp, 3, seed=4)
    a = a0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([a, b], lr=lr, betas=BETAS, weight_decay=0.0, amsgrad=True)
    fast = [population_step(aslice, a, b, opt, R, 2.0, 1.0, lam, chunk)[0].tolist() for _ in range(3)]
    na, nb, slow = naive_steps(lm, aslice.mlp, batch, a0, b0, R, tgt, lam, lr, 3)
    assert torch.allclose(torch.tensor(fast), torch.tensor(slow), rtol=1e-4)
    assert torch.allclose(a.detach(), na, atol=1e-4) and torch.allclose(b.detach(), nb, atol=1e-4)


def test_constraints_and_soft_orthogonality():
    lm = tiny_loaded("llama")
    common = dict(num_vectors=24, steps=30, evaluate=False, show_progress=False, source_layer=1, target_layer=3)
    free = melbo.train(lm, PROMPTS, "rank1", ortho=0.0, **common)
    soft = melbo.train(lm, PROMPTS, "rank1", ortho=50.0, batch=5, **common)
    for bank in (free, soft):
        a, b = bank.tensors["omega_a"], bank.tensors["omega_b"]
        assert a.shape[-1] == 1 and torch.allclose(a.norm(dim=1), torch.ones(24, 1), atol=1e-5)
        assert torch.allclose(b.norm(dim=1), torch.ones(24, 1), atol=1e-5)
        assert bank.meta["rank"] == 1 and bank.kind == "adapter"
    assert torch.equal(free.tensors["start_omega_a"], soft.tensors["start_omega_a"])  # the same starts

    def rms(bank):
        g = overlap(bank.tensors["omega_a"], bank.tensors["omega_b"])
        return float((g**2).sum().div(24 * 23).sqrt())

    assert rms(soft) < 0.5 * rms(free)
    grew = [free.info(i)["objective"] > free.info(i)["start_objective"] for i in range(24)]
    assert all(grew)
    ra = free.random.tensors["omega_a"]
    assert not torch.equal(ra, free.tensors["start_omega_a"]) and torch.allclose(ra.norm(dim=1), torch.ones(24, 1))


def test_peft_export_round_trip(tmp_path):
    lm = tiny_loaded("llama")
    bank = melbo.train(lm, PROMPTS, "rank1", num_vectors=2, steps=2, evaluate=False, show_progress=False)
    folders = bank.export_peft(tmp_path / "peft")
    loaded = load_peft_adapter(folders[1])
    a = bank.tensors["omega_a"][1]
    assert (
        loaded.omega_a.shape == a.shape
        and torch.allclose(loaded.omega_a * loaded.scale, a, atol=1e-6)
        or (torch.allclose(loaded.omega_a, a, atol=1e-6))
    )
    ids = lm.tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad(), bank[1].apply(lm):
        ours = lm.model(**ids).logits
    peft = PeftModel.from_pretrained(lm.model, str(folders[1]))
    with torch.no_grad():
        theirs = peft(**ids).logits
    peft.unload()
    assert torch.allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize(
    "over, message", [({"ortho": -1.0}, "ortho weight"), ({"rank": 2}, "rank-1 factors have rank 1, got rank = 2")]
)
def test_bad_settings(over, message):
    with pytest.raises(MelboError, match=message):
        melbo.train(tiny_loaded("llama"), PROMPTS, "rank1", evaluate=False, **over)
