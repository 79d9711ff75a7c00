"""Batched fast paths of the evaluation against their one-at-a-time versions: one generate for the
unsteered, learned and random completions (Bank.generate_beside_random), for vectors and adapters;
token log-probabilities of many completions per forward pass (quality.token_logprobs_batch)."""

import pytest
import torch
from conftest import tiny_loaded

import melbo
from melbo.quality import token_logprobs, token_logprobs_batch


@pytest.mark.parametrize("method", ["melbo", "adapter"])
def test_one_call_equals_separate_calls(method):
    lm = tiny_loaded("llama")
    bank = melbo.train(lm, "Hello there, world!", method, num_vectors=3, steps=3, radius="2", show_progress=False)
    prompts = ["Hello there, world!", "A dog."]
    gen = {"max_new_tokens": 6}
    base, learned, random = bank.generate_beside_random(prompts, 2, **gen)
    sep = bank.generate(prompts, vectors=[0, 1], **gen)
    assert base == sep.pop("unsteered") and learned == list(sep.values())
    assert random == list(bank.generate(prompts, vectors=[0, 1], random=True, unsteered=False, **gen).values())
    assert len(learned) == len(random) == 2 and any(c != base for c in learned)  # the perturbations steer
    base, learned, random = bank.generate_beside_random(prompts, **gen)
    assert len(learned) == len(random) == 3


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_batched_logprobs_equal_one_at_a_time(arch):
    lm = tiny_loaded(arch)
    pairs = [
        ("Hello there", " world, how are you today?"),
        ("A dog.", " It ran."),
        ("Hello there", ""),
        ("A much longer prompt than the others", " x"),
        ("A dog.", " It ran."),  # a duplicate: scored once, returned twice
    ]
    cache: dict = {}
    got = token_logprobs_batch(lm, pairs, batch_size=3, cache=cache)
    assert len(got) == len(pairs) and len(cache) == 4
    for (p, c), lp in zip(pairs, got):
        want = token_logprobs(lm, p, c)
        assert lp.shape == want.shape
        torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)
    assert got[1].numel() > 0 and got[2].numel() == 0
    cache[pairs[0]] = torch.full_like(got[0], 7.0)  # a cached pair is not scored again
    assert (token_logprobs_batch(lm, pairs[:1], cache=cache)[0] == 7.0).all()


def test_generation_feeds_the_head_contiguous_hidden_states_with_the_same_completions(monkeypatch):
    import contextlib

    import melbo.core.generate as g

    lm = tiny_loaded("llama")
    vecs = torch.randn(4, lm.d_model)
    cfg = melbo.GenerationConfig(max_new_tokens=6)
    seen: list[bool] = []
    handle = lm.model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: seen.append(args[0].is_contiguous())
    )
    try:
        fast = g.generate(lm, ["Hello there", "A dog."], vecs, 1, cfg=cfg)
        assert seen and all(seen)
        seen.clear()
        monkeypatch.setattr(g, "contiguous_head", lambda model: contextlib.nullcontext())
        slow = g.generate(lm, ["Hello there", "A dog."], vecs, 1, cfg=cfg)
    finally:
        handle.remove()
    assert not all(seen)  # without it the first step's slice reaches the head as a view
    assert fast == slow
    assert not lm.model.get_output_embeddings()._forward_pre_hooks  # the hook is removed
