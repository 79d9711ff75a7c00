"""Δ (melbo.methods.delta, METHOD.md section 5): the mean change of the target layer, batched
over vectors, and its Jacobian products against finite differences and a naive loop."""

import pytest
import torch
from conftest import tiny_loaded

from melbo.core.errors import MelboError
from melbo.core.prompts import encode_prompts
from melbo.core.slice import Slice
from melbo.methods.delta import DeltaMap, FunctionDelta, eager_attention

PROMPTS = ["hello there, friend", "a b"]  # different lengths: the second is padded


@pytest.fixture(scope="module")
def lm64():
    """A tiny random GPT-2 in float64 (finite differences need the precision; Llama's RMSNorm
    computes in float32 whatever the model's dtype)."""
    lm = tiny_loaded("gpt2", seed=1)
    lm.model.double()
    return lm


@pytest.fixture(scope="module")
def delta64(lm64):
    return DeltaMap.from_model(lm64, PROMPTS, 0, 3, positions="last:3")


def naive_delta(slice_: Slice, theta: torch.Tensor) -> torch.Tensor:
    """Δ(θ) for one vector: prompt by prompt, the mean over its counted positions, then the mean."""
    z = slice_(theta[None])[0]
    per_prompt = []
    for i in range(slice_.n):
        rows = [z[i, t] - slice_.z0[i, t] for t in range(z.shape[1]) if slice_.mask[i, t]]
        per_prompt.append(torch.stack(rows).mean(0))
    return torch.stack(per_prompt).mean(0)


def test_delta_of_zero_is_zero(delta64):
    out = delta64(torch.zeros(3, delta64.d_model))
    assert out.shape == (3, delta64.d_model) and out.dtype == torch.float64
    assert out.abs().max() < 1e-6
    assert delta64.source_layer == 0 and delta64.target_layer == 3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_delta_batched_equals_single_and_ignores_padding(arch):
    lm = tiny_loaded(arch)
    delta = DeltaMap.from_model(lm, PROMPTS, 0, 2, positions="last:3", chunk_size=3)  # 3 chunks for 7 vectors
    assert delta.slice.mask[1].sum() == 3 and not delta.slice.mask[1, 3:].any()  # padding not counted
    theta = torch.randn(7, delta.d_model, generator=torch.Generator().manual_seed(0))
    batched = delta(theta)
    single = torch.cat([delta(theta[i : i + 1]) for i in range(7)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    with eager_attention(lm.model):
        naive = torch.stack([naive_delta(delta.slice, theta[i]) for i in range(7)]).float()
    torch.testing.assert_close(batched, naive, atol=1e-5, rtol=1e-5)
    # the mean over prompts of each prompt's own Δ (run alone, no padding at all)
    alone = [DeltaMap.from_model(lm, [p], 0, 2, positions="last:3")(theta) for p in PROMPTS]
    torch.testing.assert_close(batched, (alone[0] + alone[1]) / 2, atol=1e-5, rtol=1e-4)


def test_writes_only_subtracts_theta(lm64, delta64):
    wo = DeltaMap.from_model(lm64, PROMPTS, 0, 3, positions="last:3", writes_only=True)
    assert wo.writes_only and not delta64.writes_only
    theta = torch.randn(4, wo.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(wo(theta), delta64(theta) - theta, atol=1e-5, rtol=1e-5)


def test_jvp_and_vjp_agree_with_finite_differences(delta64):
    g = torch.Generator().manual_seed(2)
    d = delta64.d_model
    theta = torch.randn(3, d, generator=g, dtype=torch.float64) * 0.5  # float64 model and inputs
    t = torch.randn(3, d, generator=g, dtype=torch.float64)
    c = torch.randn(3, d, generator=g, dtype=torch.float64)
    val, jv = delta64.jvp(theta, t)
    torch.testing.assert_close(val, delta64(theta))
    eps = 1e-5
    fd = (delta64(theta + eps * t).double() - delta64(theta - eps * t).double()) / (2 * eps)
    assert (jv - fd).norm() / fd.norm() < 1e-6
    val2, jtc = delta64.vjp(theta, c)
    torch.testing.assert_close(val2, val)
    # ⟨c, J t⟩ = ⟨Jᵀc, t⟩, and it matches the finite difference of ⟨c, Δ(θ + εt)⟩
    lhs = (c.double() * fd).sum(-1)
    rhs = (jtc.double() * t.double()).sum(-1)
    torch.testing.assert_close(rhs, lhs, atol=1e-4 * lhs.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "opt"])
def test_jvp_and_vjp_on_float32_models(arch):
    lm = tiny_loaded(arch)
    delta = DeltaMap.from_model(lm, PROMPTS, 1, 3)
    g = torch.Generator().manual_seed(9)
    theta, t, c = (torch.randn(2, delta.d_model, generator=g) for _ in range(3))
    _, jv = delta.jvp(theta, t)
    _, jtc = delta.vjp(theta, c)
    dual = (c * jv).sum(-1), (jtc * t).sum(-1)  # ⟨c, J t⟩ = ⟨Jᵀc, t⟩
    torch.testing.assert_close(dual[0], dual[1], atol=1e-4 * dual[0].abs().max().item(), rtol=1e-4)
    eps = 1e-2
    fd = (delta(theta + eps * t) - delta(theta - eps * t)) / (2 * eps)
    assert (jv - fd).norm() / fd.norm() < 2e-2


def test_second_derivatives_agree_with_finite_differences(delta64):
    g = torch.Generator().manual_seed(3)
    d = delta64.d_model
    w = torch.randn(2, d, generator=g, dtype=torch.float64)
    u = torch.randn(2, d, generator=g, dtype=torch.float64)
    zero = torch.zeros(2, d, dtype=torch.float64)
    h = delta64.second_derivative(zero, w).double()
    eps = 1e-4
    fd = (delta64(eps * w).double() - 2 * delta64(zero).double() + delta64(-eps * w).double()) / eps**2
    assert (h - fd).norm() / fd.norm() < 1e-3
    s = delta64.second_vjp(zero, w, u).double()  # ∇_x ⟨u, J(x) w⟩ at 0
    x = torch.randn(2, d, generator=g, dtype=torch.float64)
    djv = delta64.jvp(eps * x, w)[1].double() - delta64.jvp(-eps * x, w)[1].double()
    fd2 = (djv * u.double()).sum(-1) / (2 * eps)
    torch.testing.assert_close((s * x.double()).sum(-1), fd2, atol=1e-4 * fd2.abs().max().item(), rtol=1e-3)


def test_function_delta_products_of_a_known_map():
    g = torch.Generator().manual_seed(12)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    delta = FunctionDelta(lambda th: torch.tanh(th @ A.T) + (th**2), 5, chunk_size=2, dtype=torch.float64)
    theta, t = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    J = [torch.autograd.functional.jacobian(lambda x: torch.tanh(x @ A.T) + x**2, theta[i]) for i in range(3)]
    _, jv = delta.jvp(theta, t)
    _, jtc = delta.vjp(theta, t)
    torch.testing.assert_close(jv, torch.stack([J[i] @ t[i] for i in range(3)]))
    torch.testing.assert_close(jtc, torch.stack([J[i].T @ t[i] for i in range(3)]))
    linear = FunctionDelta(lambda th: th @ A.T, 5, dtype=torch.float64)  # D²Δ of a linear map is 0
    assert linear.second_derivative(theta, t).abs().max() == 0
    assert linear.second_vjp(theta, t, t).abs().max() == 0


def test_sdpa_model_is_switched_to_eager_and_back():
    lm = tiny_loaded("llama")
    assert lm.model.config._attn_implementation == "sdpa"
    delta = DeltaMap.from_model(lm, ["hello"], 0, 2)
    _, jv = delta.jvp(torch.zeros(2, delta.d_model), torch.randn(2, delta.d_model))
    assert torch.isfinite(jv).all() and jv.abs().sum() > 0
    assert lm.model.config._attn_implementation == "sdpa"
    # a slice built and run under SDPA cannot do forward-mode AD: a clear error, not a crash
    batch = encode_prompts(lm.tokenizer, ["hello"], "last:3")
    raw = DeltaMap(Slice(lm.model, lm.blocks, batch, 0, 2))
    with pytest.raises(MelboError, match="eager attention"):
        raw.jvp(torch.zeros(1, raw.d_model), torch.ones(1, raw.d_model))


def test_bad_input_is_refused(lm64, delta64):
    with pytest.raises(MelboError, match="shape"):
        delta64(torch.zeros(2, 3))
    with pytest.raises(MelboError, match="layer"):
        DeltaMap.from_model(lm64, PROMPTS, 3, 1)
    with pytest.raises(MelboError, match="position"):
        DeltaMap.from_model(lm64, PROMPTS, 0, 2, positions="last:0")
