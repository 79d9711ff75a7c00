"""MELBO training: constraints hold, the objective rises, the fast path equals the naive one."""


import pytest
import torch

import naive
from conftest import tiny_loaded
from melbo.errors import MelboError
from melbo.objective import Slice
from melbo.prompts import encode_prompts
from melbo.train import TrainConfig, random_start, random_vectors, train_vectors

PROMPTS = ["The cat sat on the mat.", "Hello"]


def make_slice(lm, positions="all", src=0, tgt=2):
    return Slice(lm.model, lm.blocks, encode_prompts(lm.tokenizer, PROMPTS, positions), src, tgt)


def max_abs_cos(v):
    u = v.double() / v.double().norm(dim=-1, keepdim=True)
    c = u @ u.T
    return (c - torch.eye(len(v), dtype=c.dtype)).abs().max().item()


def test_sphere_orthogonality_and_rising_objective(loaded):
    s = make_slice(loaded)
    cfg = TrainConfig(radius=3.0, num_vectors=4, steps=30, lr=0.05, seed=1)
    res = train_vectors(s, cfg, show_progress=False)
    V = torch.stack([r.vector for r in res])
    assert torch.allclose(V.norm(dim=-1), torch.full((4,), 3.0), atol=1e-5)
    assert max_abs_cos(V) <= 1e-5
    for r in res:
        assert r.objective > r.start_objective * 1.01  # rises from its random start
        assert r.cosine_start_end < 0.9999  # it moved


def test_learned_beats_random_at_same_radius():
    lm = tiny_loaded("llama")
    s = make_slice(lm)
    cfg = TrainConfig(radius=3.0, num_vectors=3, steps=40, lr=0.05)
    learned = [r.objective for r in train_vectors(s, cfg, show_progress=False)]
    from melbo.objective import melbo_objective
    rnd = melbo_objective(s(random_vectors(3, lm.d_model, 3.0, 0)), s.z0, s.mask, 2, 1)
    assert min(learned) > rnd.max().item()


@pytest.mark.parametrize("arch,p,q,positions", [("llama", 2, 1, "all"), ("gpt2", 4, 4, "last:2")])
def test_fast_path_equals_naive_method(arch, p, q, positions):
    lm = tiny_loaded(arch)
    src, tgt, R, steps = 0, 2, 2.0, 12
    s = make_slice(lm, positions, src, tgt)
    cfg = TrainConfig(radius=R, p=p, q=q, num_vectors=2, steps=steps, seed=3)
    fast = train_vectors(s, cfg, show_progress=False)
    batch = encode_prompts(lm.tokenizer, PROMPTS, positions)
    ids = [batch.input_ids[i, :n] for i, n in enumerate(batch.attention_mask.sum(1).tolist())]
    pos = [batch.target_mask[i, :len(x)].nonzero().flatten().tolist() for i, x in enumerate(ids)]
    earlier = None
    for k in range(2):
        start = random_start(k, lm.d_model, R, 3, None if earlier is None else _basis(earlier))
        torch.testing.assert_close(start, fast[k].start)
        ref = naive.train_vector(lm, ids, pos, src, tgt, start, earlier, R, p, q, steps, cfg.learning_rate(lm.d_model))
        torch.testing.assert_close(fast[k].vector, ref, atol=2e-4, rtol=1e-3)
        earlier = ref[None] if earlier is None else torch.cat([earlier, ref[None]])


def _basis(v):
    from melbo.train import orthonormal_basis
    return orthonormal_basis(v)


def test_lr_scales_with_radius():
    assert TrainConfig(radius=4.0).learning_rate(2048) == pytest.approx(0.011 * 4 / 2048 ** 0.5)
    assert TrainConfig(radius=4.0, lr=0.5).learning_rate(2048) == 0.5


@pytest.mark.parametrize("field,value", [("radius", 0), ("radius", -1.0), ("p", 0), ("q", -2), ("num_vectors", 0),
                                         ("radius", float("nan")), ("steps", -1)])
def test_bad_hyperparameters(field, value):
    kw = {"radius": 1.0, field: value}
    with pytest.raises(MelboError, match=str(value) if field != "radius" or value == value else "nan"):
        TrainConfig(**kw)


def test_random_baseline_is_orthogonal_on_sphere_and_prefix_stable():
    r = random_vectors(6, 16, 2.5, 7)
    assert torch.allclose(r.norm(dim=-1), torch.full((6,), 2.5), atol=1e-5)
    assert max_abs_cos(r) <= 1e-5
    torch.testing.assert_close(random_vectors(3, 16, 2.5, 7), r[:3])
    assert not torch.allclose(random_vectors(3, 16, 2.5, 8), r[:3])


def test_resume_continues_from_done_vectors():
    lm = tiny_loaded("qwen2")
    s = make_slice(lm)
    cfg = TrainConfig(radius=2.0, num_vectors=3, steps=8)
    full = train_vectors(s, cfg, show_progress=False)
    part = train_vectors(s, TrainConfig(radius=2.0, num_vectors=2, steps=8), show_progress=False)
    calls = []
    rest = train_vectors(s, cfg, done=torch.stack([r.vector for r in part]), show_progress=False,
                         on_vector=lambda k, r: calls.append(k))
    assert calls == [2] and len(rest) == 1
    torch.testing.assert_close(rest[0].vector, full[2].vector, atol=1e-5, rtol=1e-4)


def test_zero_vector_cannot_go_on_the_sphere():
    from melbo.train import to_sphere

    with pytest.raises(MelboError, match="zero vector"):
        to_sphere(torch.zeros(2, 8), 1.0)
