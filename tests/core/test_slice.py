"""The truncated src→tgt pass and the objective, against the full model one prompt at a time."""

import naive
import pytest
import torch
from conftest import ARCHS, tiny_loaded

from melbo.core.errors import MelboError
from melbo.core.prompts import encode_prompts, parse_positions
from melbo.core.slice import Slice, melbo_objective

PROMPTS = ["Hello there, world!", "Hi", "A somewhat longer prompt here"]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_truncated_pass_equals_full_model(arch):
    lm = tiny_loaded(arch)
    batch = encode_prompts(lm.tokenizer, PROMPTS, "all")
    s = Slice(lm.model, lm.blocks, batch, 1, 3)
    torch.manual_seed(0)
    theta = torch.randn(2, lm.d_model)
    z = s(theta)
    assert z.shape == (2, 3, batch.input_ids.shape[1], lm.d_model)
    for i, n in enumerate(batch.attention_mask.sum(1).tolist()):
        ids = batch.input_ids[i, :n]
        with torch.no_grad():
            torch.testing.assert_close(s.z0[i, :n], naive.target_activations(lm, ids, 1, 3, None), atol=2e-5, rtol=1e-4)
            for v in range(2):
                ref = naive.target_activations(lm, ids, 1, 3, theta[v])
                torch.testing.assert_close(z[v, i, :n], ref, atol=2e-5, rtol=1e-4)


def test_zero_vector_gives_z0(loaded):
    batch = encode_prompts(loaded.tokenizer, PROMPTS, "all")
    s = Slice(loaded.model, loaded.blocks, batch, 0, 2)
    torch.testing.assert_close(s(torch.zeros(1, loaded.d_model))[0], s.z0, atol=1e-6, rtol=0)
    assert melbo_objective(s(torch.zeros(1, loaded.d_model)), s.z0, s.mask, 2, 1).item() < 1e-8


@pytest.mark.parametrize("positions,p,q", [("all", 2, 1), ("last:2", 4, 4), ("0,-1", 2, 2)])
def test_padded_batch_objective_equals_one_at_a_time(loaded, positions, p, q):
    batch = encode_prompts(loaded.tokenizer, PROMPTS, positions)
    assert (batch.attention_mask == 0).any()  # padding is really there
    s = Slice(loaded.model, loaded.blocks, batch, 1, 3)
    theta = torch.randn(1, loaded.d_model)
    fast = melbo_objective(s(theta), s.z0, s.mask, p, q).item()
    pos = parse_positions(positions)
    ids = [batch.input_ids[i, :n] for i, n in enumerate(batch.attention_mask.sum(1).tolist())]
    with torch.no_grad():
        ref = naive.objective(loaded, ids, [pos.select(len(x)) for x in ids], 1, 3, theta[0], p, q).item()
    assert fast == pytest.approx(ref, rel=1e-4)
    # and one prompt at a time through the fast path too
    singles = 0.0
    for prompt in PROMPTS:
        b1 = encode_prompts(loaded.tokenizer, [prompt], positions)
        s1 = Slice(loaded.model, loaded.blocks, b1, 1, 3)
        singles += melbo_objective(s1(theta), s1.z0, s1.mask, p, q).item()
    assert fast == pytest.approx(singles, rel=1e-4)


def test_padding_never_counts():
    lm = tiny_loaded("llama")
    batch = encode_prompts(lm.tokenizer, PROMPTS, "all")
    assert not batch.target_mask[batch.attention_mask == 0].any()


def test_gradients_reach_the_vector_through_the_slice(loaded):
    batch = encode_prompts(loaded.tokenizer, PROMPTS[:2], "all")
    s = Slice(loaded.model, loaded.blocks, batch, 0, 3)
    theta = torch.randn(1, loaded.d_model, requires_grad=True)
    melbo_objective(s(theta), s.z0, s.mask, 2, 1).sum().backward()
    assert theta.grad.abs().sum() > 0


def test_residual_norm_median_ignores_one_massive_position():
    lm = tiny_loaded("llama")
    batch = encode_prompts(lm.tokenizer, ["Hello there, world!"], "all")
    s = Slice(lm.model, lm.blocks, batch, 1, 3)
    s.h_src = s.h_src.clone()
    s.h_src[0, 0] *= 1000.0  # a BOS-like massive activation at position 0
    norms = s.position_norms()
    assert s.residual_norm("median") == pytest.approx(float(norms.median()))
    assert s.residual_norm("mean") > 20 * s.residual_norm("median")
    with pytest.raises(MelboError, match="unknown residual-norm statistic 'max'"):
        s.residual_norm("max")


def test_batch_dependent_inputs_found_by_probe():
    """Bloom's ALiBi is [n·heads, 1, T]: tiled with the batch; position_ids [1, T] are not."""
    lm = tiny_loaded("bloom")
    batch = encode_prompts(lm.tokenizer, PROMPTS, "all")
    s = Slice(lm.model, lm.blocks, batch, 0, 2)
    call = s.calls[1]
    alibi = call.kwargs["alibi"]
    assert alibi.shape[0] == len(PROMPTS) * lm.model.config.n_head and call.mask[1]["alibi"] == lm.model.config.n_head
    z = s(torch.randn(3, lm.d_model))
    assert z.shape[0] == 3 and torch.isfinite(z).all()
