"""MELBO steering vectors (melbo.methods.melbo, METHOD.md section 1): the constraints hold, the
objective rises, the fast path equals the naive one, settings are checked, resume continues."""

import naive
import pytest
import torch
from conftest import tiny_loaded

import melbo
from melbo.core.errors import MelboError
from melbo.core.prompts import encode_prompts
from melbo.core.slice import Slice, melbo_objective
from melbo.core.sphere import max_abs_cos, orthonormal_basis, random_start, random_vectors
from melbo.methods.base import Context, Fit, make_settings
from melbo.methods.melbo import MelboMethod, MelboSettings, plan_batches
from melbo.methods.melbo_train import (
    BETAS,
    batch_step,
    block_starts,
    chunked_objective,
    learning_rate,
    make_optimizer,
    objective_of,
    orthonormal_block,
    train_block,
    train_step,
    train_vector,
)

PROMPTS = ["The cat sat on the mat.", "Hello"]


def make_slice(lm, positions="all", src=0, tgt=2):
    return Slice(lm.model, lm.blocks, encode_prompts(lm.tokenizer, PROMPTS, positions), src, tgt)


def make_method(lm, positions="all", src=0, tgt=2, **overrides):
    """A MelboMethod for one run, built as melbo.train builds it (settings from DEFAULTS)."""
    s = make_settings("melbo", MelboSettings, {"positions": positions, **overrides})
    batch = encode_prompts(lm.tokenizer, PROMPTS, s.positions)
    return MelboMethod(Context(lm, batch, src, tgt, s, show_progress=False))


def test_sphere_orthogonality_and_rising_objective(loaded):
    m = make_method(loaded, radius=3.0, num_vectors=4, steps=30, lr=0.05, seed=1)
    fit = m.fit(None, None)
    V = fit.tensors["vectors"]
    assert V.shape == (4, loaded.d_model) and len(fit) == 4
    assert torch.allclose(V.norm(dim=-1), torch.full((4,), 3.0), atol=1e-5)
    assert max_abs_cos(V) <= 1e-5
    torch.testing.assert_close(fit.tensors["start_vectors"].norm(dim=-1), torch.full((4,), 3.0), atol=1e-5, rtol=0)
    for row in fit.info:
        assert row["objective"] > row["start_objective"] * 1.01  # rises from its random start
        assert row["cosine_start_end"] < 0.9999  # it moved
    # the recorded objective is the method's objective of the saved vector
    assert m.objectives(fit.tensors) == pytest.approx([r["objective"] for r in fit.info], rel=1e-5)


def test_learned_beats_random_at_same_radius():
    lm = tiny_loaded("llama")
    m = make_method(lm, radius=3.0, num_vectors=3, steps=40, lr=0.05)
    fit = m.fit(None, None)
    learned = [r["objective"] for r in fit.info]
    s = make_slice(lm)
    rnd = melbo_objective(s(random_vectors(3, lm.d_model, 3.0, 0)), s.z0, s.mask, 2, 1)
    assert min(learned) > rnd.max().item()
    # the method's baseline is that one, scored with the same objective
    baseline = m.random_baseline(fit)
    torch.testing.assert_close(baseline["random_vectors"], random_vectors(3, lm.d_model, 3.0, 0))
    assert m.objectives(baseline) == pytest.approx(rnd.tolist(), rel=1e-5)


@pytest.mark.parametrize("arch,p,q,positions", [("llama", 2, 1, "all"), ("gpt2", 4, 4, "last:2")])
def test_fast_path_equals_naive_method(arch, p, q, positions):
    lm = tiny_loaded(arch)
    src, tgt, R, steps = 0, 2, 2.0, 12
    m = make_method(lm, positions, src, tgt, radius=R, p=p, q=q, num_vectors=2, steps=steps, seed=3, batch_vectors=1)
    fast = m.fit(None, None).tensors
    lr = learning_rate(None, R, lm.d_model)
    assert m.lr == lr
    batch = encode_prompts(lm.tokenizer, PROMPTS, positions)
    ids = [batch.input_ids[i, :n] for i, n in enumerate(batch.attention_mask.sum(1).tolist())]
    pos = [batch.target_mask[i, : len(x)].nonzero().flatten().tolist() for i, x in enumerate(ids)]
    earlier = None
    for k in range(2):
        start = random_start(k, lm.d_model, R, 3, None if earlier is None else orthonormal_basis(earlier))
        torch.testing.assert_close(start, fast["start_vectors"][k])
        ref = naive.train_vector(lm, ids, pos, src, tgt, start, earlier, R, p, q, steps, lr)
        torch.testing.assert_close(fast["vectors"][k], ref, atol=2e-4, rtol=1e-3)
        earlier = ref[None] if earlier is None else torch.cat([earlier, ref[None]])


def test_train_step_returns_objective_before_the_step():
    lm = tiny_loaded("llama")
    s = make_slice(lm)
    theta = random_start(0, lm.d_model, 2.0, 0, None)[None].clone().requires_grad_(True)
    before = objective_of(s, theta.detach(), 2, 1)
    opt = make_optimizer(theta, 0.05)
    group = opt.param_groups[0]
    assert group["amsgrad"] and group["betas"] == BETAS and group["weight_decay"] == 0.0
    got = train_step(s, theta, opt, 2.0, 2, 1, None)
    torch.testing.assert_close(got, before)
    assert theta.detach().norm().item() == pytest.approx(2.0, rel=1e-6)
    assert objective_of(s, theta.detach(), 2, 1).item() > before.item()
    vec, start, info = train_vector(s, 0, 2.0, 2, 1, 0, 0.05, 0, None)  # no steps: the start itself
    torch.testing.assert_close(vec, start)
    assert info["objective"] == info["start_objective"] and info["cosine_start_end"] == pytest.approx(1.0)


def test_lr_scales_with_radius():
    assert learning_rate(None, 4.0, 2048) == pytest.approx(0.1 * 4 / 2048**0.5)
    assert learning_rate(0.5, 4.0, 2048) == 0.5
    lm = tiny_loaded("llama")
    m = make_method(lm, radius=4.0)
    assert m.meta["lr"] == pytest.approx(0.1 * 4 / lm.d_model**0.5) and m.meta["radius"] == 4.0


def test_relative_radius_uses_the_median_residual_norm():
    lm = tiny_loaded("llama")
    m = make_method(lm, radius="0.5x")
    s = make_slice(lm)
    assert m.residual_norm == pytest.approx(float(s.position_norms().median()))
    assert m.radius == pytest.approx(0.5 * m.residual_norm)


@pytest.mark.parametrize(
    "field,value",
    [
        ("radius", 0),
        ("radius", -1.0),
        ("p", 0),
        ("q", -2),
        ("num_vectors", 0),
        ("radius", float("nan")),
        ("steps", -1),
        ("lr", 0),
    ],
)
def test_bad_hyperparameters(field, value):
    kw = {"radius": 1.0, field: value}
    with pytest.raises(MelboError, match=str(value) if field != "radius" or value == value else "nan"):
        make_settings("melbo", MelboSettings, kw)
    with pytest.raises(MelboError, match=str(value) if field != "radius" or value == value else "nan"):
        melbo.train(tiny_loaded("llama"), PROMPTS, **kw)


def test_unknown_setting_is_refused():
    with pytest.raises(MelboError, match="unknown setting 'rank' for method 'melbo'"):
        make_settings("melbo", MelboSettings, {"rank": 4})


def test_resume_continues_from_done_vectors():
    lm = tiny_loaded("qwen2")
    full = make_method(lm, radius=2.0, num_vectors=3, steps=8, batch_vectors=1).fit(None, None)
    part = make_method(lm, radius=2.0, num_vectors=2, steps=8, batch_vectors=1).fit(None, None)
    calls = []
    rest = make_method(lm, radius=2.0, num_vectors=3, steps=8, batch_vectors=1).fit(
        Fit(part.tensors, part.info), lambda f: calls.append(len(f))
    )
    assert calls == [3] and len(rest) == 3
    torch.testing.assert_close(rest.tensors["vectors"][:2], part.tensors["vectors"])
    torch.testing.assert_close(rest.tensors["vectors"][2], full.tensors["vectors"][2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rest.tensors["start_vectors"], full.tensors["start_vectors"])


def test_resume_through_train(tmp_path):
    lm = tiny_loaded("qwen2")
    kw = dict(radius=2.0, steps=8, source_layer=0, target_layer=2, show_progress=False, batch_vectors=1)
    full = melbo.train(lm, PROMPTS, num_vectors=3, **kw)
    out = tmp_path / "run"
    melbo.train(lm, PROMPTS, num_vectors=2, out=out, evaluate=False, **kw)
    bank = melbo.train(lm, PROMPTS, num_vectors=3, out=out, resume=True, evaluate=False, **kw)
    assert len(bank) == 3 and bank.meta["complete"]
    torch.testing.assert_close(bank.vectors, full.vectors, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(melbo.Bank.load(out).vectors, bank.vectors)
    with pytest.raises(MelboError, match="p=2.0"):
        melbo.train(lm, PROMPTS, num_vectors=4, out=out, resume=True, evaluate=False, p=4.0, **kw)


# ---------------------------------------------------------------- batched vectors


def test_batched_step_equals_sequential_step_for_one_vector():
    lm = tiny_loaded("llama")
    s = make_slice(lm)
    earlier = random_vectors(2, lm.d_model, 2.0, 5)
    basis = orthonormal_basis(earlier)
    start = block_starts([2], lm.d_model, 2.0, 0, basis)
    torch.testing.assert_close(start[0], random_start(2, lm.d_model, 2.0, 0, basis), rtol=0, atol=0)
    a = start.clone().requires_grad_(True)
    b = start.clone().requires_grad_(True)
    opt_a, opt_b = make_optimizer(a, 0.05), make_optimizer(b, 0.05)
    for _ in range(5):
        oa = train_step(s, a, opt_a, 2.0, 2, 1, basis)
        ob = batch_step(s, b, opt_b, 2.0, 2, 1, basis)
        torch.testing.assert_close(oa, ob, rtol=0, atol=0)
    torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("how", ["symmetric", "qr"])
def test_a_block_from_the_same_starts_keeps_the_constraints(how):
    lm = tiny_loaded("gpt2")
    s = make_slice(lm)
    earlier = random_vectors(3, lm.d_model, 1.5, 9)
    vecs, starts, infos = train_block(s, [3, 4, 5, 6], 1.5, 2, 1, 15, 0.05, 0, earlier, how)
    again, starts2, _ = train_block(s, [3, 4, 5, 6], 1.5, 2, 1, 15, 0.05, 0, earlier, how)
    torch.testing.assert_close(starts, starts2, rtol=0, atol=0)  # same starts, same result
    torch.testing.assert_close(vecs, again, rtol=0, atol=0)
    torch.testing.assert_close(
        vecs.double().norm(dim=-1), torch.full((4,), 1.5, dtype=torch.float64), rtol=1e-6, atol=0
    )
    allv = torch.cat([earlier, vecs]).double()
    cos = (allv @ allv.T) / 1.5**2
    assert (cos - torch.eye(7, dtype=torch.float64)).abs().max() <= 1e-5
    assert all(i["objective"] > i["start_objective"] for i in infos)
    assert orthonormal_block(torch.randn(3, 8), 2.0, "none").norm(dim=-1).allclose(torch.full((3,), 2.0))


def test_chunked_evaluation_equals_unchunked():
    lm = tiny_loaded("bloom")
    s = Slice(lm.model, lm.blocks, encode_prompts(lm.tokenizer, PROMPTS + ["A third prompt"], "all"), 0, 2)
    theta = random_vectors(5, lm.d_model, 2.0, 1)
    full = chunked_objective(s, theta, 2, 1, 5, 3, False)
    torch.testing.assert_close(full, objective_of(s, theta, 2, 1))
    for v, p in ((1, 1), (2, 2), (5, 1), (3, 3)):
        torch.testing.assert_close(chunked_objective(s, theta, 2, 1, v, p, False), full, rtol=1e-5, atol=0)
    a = theta.clone().requires_grad_(True)
    b = theta.clone().requires_grad_(True)
    oa, ob = make_optimizer(a, 0.05), make_optimizer(b, 0.05)
    for _ in range(3):
        batch_step(s, a, oa, 2.0, 2, 1, None)
        batch_step(s, b, ob, 2.0, 2, 1, None, vectors_per_chunk=2, prompts_per_chunk=1)
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-4, atol=1e-5)


def test_effect_penalty_decorrelates_the_effects():
    from melbo.methods.melbo_train import effect_cosines

    lm = tiny_loaded("llama")
    s = make_slice(lm)

    def mean_cos2(vecs):
        c = effect_cosines(s(vecs), s.z0, s.mask)
        return float((c.pow(2).sum() - c.diagonal().pow(2).sum()) / (len(c) * (len(c) - 1)))

    plain, _, _ = train_block(s, [0, 1, 2, 3], 2.0, 2, 1, 40, 0.05, 0, None, "symmetric", 0.0)
    soft, _, _ = train_block(s, [0, 1, 2, 3], 2.0, 2, 1, 40, 0.05, 0, None, "symmetric", 20.0)
    assert mean_cos2(soft) < mean_cos2(plain)


def test_plan_batches_fits_the_budget():
    assert plan_batches(16, 2, per_row=100, budget=10_000, batch_vectors=None) == (16, 16, 2)
    assert plan_batches(16, 2, per_row=100, budget=1_000, batch_vectors=None) == (5, 5, 2)
    assert plan_batches(16, 4, per_row=100, budget=200, batch_vectors=None) == (1, 1, 2)
    assert plan_batches(16, 2, per_row=100, budget=10_000, batch_vectors=3) == (3, 3, 2)
    bank = melbo.train(
        tiny_loaded("llama"), PROMPTS, num_vectors=4, steps=3, radius="2", memory_gb=1e-4, show_progress=False
    )
    assert bank.meta["batch_vectors_used"] >= 1 and len(bank) == 4
