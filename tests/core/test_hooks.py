"""Applying vectors: zero vector is a no-op, hooks always removed, out of place, per-row vectors."""

import pytest
import torch
from conftest import tiny_loaded

from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig, generate
from melbo.core.hooks import PositionTracker, add_steering, steer


def logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


IDS = torch.tensor([[1, 40, 41, 42, 43, 44]])


def test_zero_vector_leaves_logits_unchanged(loaded):
    base = logits(loaded, IDS)
    with steer(loaded.blocks, 1, torch.zeros(loaded.d_model)):
        same = logits(loaded, IDS)
    torch.testing.assert_close(same, base, rtol=0, atol=0)


def test_vector_changes_logits_and_hook_is_removed(loaded):
    base = logits(loaded, IDS)
    with steer(loaded.blocks, 1, torch.randn(loaded.d_model), scale=4.0):
        steered = logits(loaded, IDS)
    assert (steered - base).abs().max() > 1e-3
    torch.testing.assert_close(logits(loaded, IDS), base)
    assert all(len(b._forward_hooks) == 0 for b in loaded.blocks)


def test_hook_removed_after_exception():
    lm = tiny_loaded("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with steer(lm.blocks, 2, torch.randn(lm.d_model)):
            assert len(lm.blocks[2]._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(lm.blocks[2]._forward_hooks) == 0


def test_handle_remove_and_context():
    lm = tiny_loaded("gpt2")
    base = logits(lm, IDS)
    h = add_steering(lm.blocks, -1, torch.randn(lm.d_model))
    assert (logits(lm, IDS) - base).abs().max() > 1e-4
    h.remove()
    h.remove()  # twice is fine
    torch.testing.assert_close(logits(lm, IDS), base)
    with add_steering(lm.blocks, 0, torch.randn(lm.d_model)):
        pass
    assert len(lm.blocks[0]._forward_hooks) == 0


def test_out_of_place_and_in_the_outputs_dtype():
    lm = tiny_loaded("llama")
    seen = {}

    def before(m, a, o):  # registered first: sees the block's own output
        seen["orig"], seen["copy"] = o, o.clone()

    def after(m, a, o):  # registered after the steering hook: sees the steered output
        seen["steered"] = o

    hb = lm.blocks[1].register_forward_hook(before)
    with steer(lm.blocks, 1, torch.ones(lm.d_model, dtype=torch.float64)):
        ha = lm.blocks[1].register_forward_hook(after)
        logits(lm, IDS)
    hb.remove()
    ha.remove()
    torch.testing.assert_close(seen["orig"], seen["copy"], rtol=0, atol=0)  # not modified in place
    assert seen["steered"].dtype == torch.float32
    torch.testing.assert_close(seen["steered"], seen["copy"] + 1)


def test_per_row_vectors_match_one_at_a_time():
    lm = tiny_loaded("qwen2")
    vecs = torch.randn(3, lm.d_model)
    ids = IDS.repeat(3, 1)
    with steer(lm.blocks, 1, vecs):
        batched = logits(lm, ids)
    for i in range(3):
        with steer(lm.blocks, 1, vecs[i]):
            torch.testing.assert_close(batched[i : i + 1], logits(lm, IDS), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        with steer(lm.blocks, 1, torch.randn(2, lm.d_model)):
            logits(lm, ids)


def test_gradients_reach_the_vector(loaded):
    theta = torch.zeros(loaded.d_model, requires_grad=True)
    with steer(loaded.blocks, 0, theta):
        out = loaded.model(input_ids=IDS).logits
    out.pow(2).sum().backward()
    assert theta.grad is not None and theta.grad.abs().sum() > 0


def test_position_tracker_prompt_and_generated():

    t = PositionTracker("prompt")
    assert t.mask(5).tolist() == [True] * 5 and t.mask(1).tolist() == [False] and t.mask(1).tolist() == [False]
    assert t.mask(7).tolist() == [True] * 5 + [False] * 2  # a full recompute is split at the prompt length
    g = PositionTracker("generated")
    assert g.mask(4).tolist() == [False] * 4 and g.mask(1).tolist() == [True]
    assert PositionTracker("all").mask(3) is None
    with pytest.raises(MelboError, match="unknown steering positions 'some'"):
        PositionTracker("some")


@pytest.mark.parametrize("positions", ["prompt", "generated", "all"])
def test_generation_steers_only_the_chosen_positions(positions):
    """Greedy generation with the KV cache steered at `positions` equals a full forward over the
    final sequence with the vector added at exactly those positions."""

    lm = tiny_loaded("llama")
    torch.manual_seed(3)
    v = 4.0 * torch.randn(lm.d_model)
    prompt = "Hello there"
    out = generate(lm, [prompt], v[None], 1, 1.0, GenerationConfig(max_new_tokens=6, steer_positions=positions))[0][0]
    ids = lm.tokenizer(prompt)["input_ids"]
    full = torch.tensor([ids + lm.tokenizer(out, add_special_tokens=False)["input_ids"]])
    T0 = len(ids)
    where = torch.arange(full.shape[1])
    mask = {"prompt": where < T0, "generated": where >= T0, "all": where >= 0}[positions]

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h + v * mask[None, :, None]
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    handle = lm.blocks[1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=full).logits[0]
    finally:
        handle.remove()
    greedy = logits[T0 - 1 : -1].argmax(-1).tolist()
    assert greedy == full[0, T0:].tolist()
