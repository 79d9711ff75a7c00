"""The radius sweep's fast path (melbo.methods.sweep_batch): radii trained as one stacked block give
the vectors each radius's own fit gives, batched per-row generation gives the one-at-a-time
completions, and a whole sweep chooses the same R with the same curve as the radius-by-radius one."""

import dataclasses

import pytest
import torch
from conftest import fake_embed, tiny_loaded

import melbo.methods.radius_sweep as rs
from melbo.core.generate import GenerationConfig, generate
from melbo.core.prompts import encode_prompts
from melbo.core.slice import Slice
from melbo.methods import sweep_batch
from melbo.methods.base import Context, make_settings
from melbo.methods.melbo import MelboMethod, MelboSettings
from melbo.methods.sweep_batch import stacks, train_stacked

PROMPTS = ["The cat sat on the mat.", "Hello"]
RELATIVE = [0.05, 0.2, 0.8]


def settings(**overrides):
    return make_settings("melbo", MelboSettings, {"num_vectors": 3, "steps": 6, **overrides})


def per_radius(lm, s, rel):
    """The naive path: the method's own fit at one R, as the sweep ran it radius by radius."""
    one = dataclasses.replace(s, radius=f"{rel:.6g}x")
    m = MelboMethod(Context(lm, encode_prompts(lm.tokenizer, PROMPTS, one.positions), 0, 2, one, False))
    fit = m.fit(None, None)
    return m.radius, fit, m.random_baseline(fit)["random_vectors"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("how", ["symmetric", "qr"])
def test_stacked_radii_equal_each_radius_trained_alone(arch, how):
    lm = tiny_loaded(arch)
    s = settings(orthogonalize=how)
    sl = Slice(lm.model, lm.blocks, encode_prompts(lm.tokenizer, PROMPTS, s.positions), 0, 2)
    radii = [rel * sl.residual_norm() for rel in RELATIVE]
    stacked = train_stacked(sl, radii, 3, s)
    for rel, r, (vecs, starts, infos) in zip(RELATIVE, radii, stacked):
        radius, fit, _ = per_radius(lm, s, rel)
        assert r == pytest.approx(radius, rel=1e-12)
        torch.testing.assert_close(starts, fit.tensors["start_vectors"], atol=0, rtol=0)
        torch.testing.assert_close(vecs, fit.tensors["vectors"], atol=1e-5 * r, rtol=1e-5)
        assert (vecs - starts).norm() > 0.05 * r  # training moved them: the comparison is not vacuous
        for a, b in zip(infos, fit.info):
            assert a["objective"] == pytest.approx(b["objective"], rel=1e-5)
            assert a["start_objective"] == pytest.approx(b["start_objective"], rel=1e-5)
            assert a["cosine_start_end"] == pytest.approx(b["cosine_start_end"], abs=1e-5)
        # each radius's own constraints: its sphere and its own orthonormal block
        torch.testing.assert_close(vecs.double() @ vecs.double().T, r**2 * torch.eye(3, dtype=torch.float64))


def test_chunked_stack_equals_one_pass():
    lm = tiny_loaded("llama")
    s = settings()
    sl = Slice(lm.model, lm.blocks, encode_prompts(lm.tokenizer, PROMPTS, s.positions), 0, 2)
    radii = [rel * sl.residual_norm() for rel in RELATIVE]
    whole = train_stacked(sl, radii, 3, s)
    chunked = train_stacked(sl, radii, 3, s, vectors_per_chunk=2, prompts_per_chunk=1)
    for (a, _, ia), (b, _, ib) in zip(whole, chunked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert [x["objective"] for x in ia] == pytest.approx([x["objective"] for x in ib], rel=1e-5)


def test_batched_per_row_generation_equals_one_at_a_time():
    lm = tiny_loaded("llama")
    vecs = torch.randn(5, lm.d_model)
    cfg = GenerationConfig(max_new_tokens=8)
    batched = generate(lm, PROMPTS, vecs, 1, cfg=cfg)
    alone = [generate(lm, PROMPTS, v[None], 1, cfg=cfg)[0] for v in vecs]
    assert batched == alone
    assert len({c[0] for c in batched}) > 1  # the vectors do steer (the comparison is not vacuous)


def test_which_settings_stack():
    lm = tiny_loaded("llama")

    def check(method="melbo", **overrides):
        s = settings(**overrides)
        batch = encode_prompts(lm.tokenizer, PROMPTS, s.positions)
        return stacks(method, Context(lm, batch, 0, 2, s, False), Slice(lm.model, lm.blocks, batch, 0, 2))

    assert check() and check(batch_vectors=3)
    assert not check(batch_vectors=1)  # one after another: the sweep keeps that
    assert not check(batch_vectors=2)  # two blocks per R
    assert not check(memory_gb=1e-9)  # the method would split the vectors of one R for want of memory
    assert not check(effect_penalty=0.5)  # couples a block's vectors
    assert not check("adapter")


def test_stacked_sweep_equals_radius_by_radius(monkeypatch):
    monkeypatch.setattr(rs, "embed", fake_embed)
    lm = tiny_loaded("llama")
    s = settings(radius="auto", steps=4)
    kw = dict(grid=(0.05, 0.2, 0.8, 3.2, 6.4), per_radius=2, max_new_tokens=6, stack=2)
    stacked = []
    monkeypatch.setattr(rs, "stacked_trials", lambda *a, **k: stacked.append(1) or sweep_batch.stacked_trials(*a, **k))
    fast = rs.sweep_radius(lm, PROMPTS, "melbo", s, 0, 2, GenerationConfig(), **kw)
    monkeypatch.setattr(rs, "stacks", lambda *a: False)
    slow = rs.sweep_radius(lm, PROMPTS, "melbo", s, 0, 2, GenerationConfig(), **kw)
    assert stacked == [1]  # the first sweep took the fast path, the second did not
    assert fast["chosen"] == slow["chosen"] and fast["completions"] == slow["completions"]
    assert fast["unsteered"] == slow["unsteered"]
    assert len(fast["rows"]) == len(slow["rows"])
    for a, b in zip(fast["rows"], slow["rows"]):
        assert (a["radius"], a["relative"], a["score"]) == pytest.approx((b["radius"], b["relative"], b["score"]))
        assert a["learned"] == pytest.approx(b["learned"]) and a["random"] == pytest.approx(b["random"])


def test_a_sweep_that_stops_early_trains_no_further_stack(monkeypatch):
    lm = tiny_loaded("llama")
    calls = []
    real = sweep_batch.train_stacked
    monkeypatch.setattr(
        sweep_batch, "train_stacked", lambda sl, radii, *a: calls.append(len(radii)) or real(sl, radii, *a)
    )
    # scores: the best at the first R, then incoherent learned completions: the rule stops after the third R
    curve = iter([(1.0, 1.0), (0.0, 0.1), (0.0, 0.1), (0.0, 0.1), (0.0, 0.1), (0.0, 0.1)])

    def fake_scores(*args):
        score, coherent = next(curve)
        one = {"score": score, "coherent": coherent, "different": 0.0, "diversity": score, "changed": 0.0}
        return {"learned": one, "random": {**one, "score": 0.0}}

    monkeypatch.setattr(rs, "score_completions", fake_scores)
    s = settings(radius="auto", steps=2)
    grid = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
    out = rs.sweep_radius(lm, PROMPTS, "melbo", s, 0, 2, GenerationConfig(), grid=grid, per_radius=2, stack=2)
    assert [r["relative"] for r in out["rows"]] == [0.05, 0.1, 0.2]
    assert calls == [2, 2]  # the third stack (0.8x, 1.6x) was never trained
    assert out["chosen"]["relative"] == 0.05
