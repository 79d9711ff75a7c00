"""The truncated src→tgt pass and the objective, against the full model one prompt at a time."""

import pytest
import torch

import naive
from conftest import ARCHS, tiny_loaded
from melbo.objective import Slice, melbo_objective
from melbo.prompts import encode_prompts, parse_positions
from melbo.errors import MelboError

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


def test_positions_parsing_and_errors():
    assert parse_positions("last:3").select(5) == [2, 3, 4]
    assert parse_positions("0,-1").select(4) == [0, 3]
    assert parse_positions("all").select(2) == [0, 1]
    for bad in ("last:0", "last:x", "first", "1,,2"):
        with pytest.raises(MelboError, match="positions"):
            parse_positions(bad)
    with pytest.raises(MelboError, match=r"beyond prompt 'Hi'.*2 tokens"):
        encode_prompts(tiny_loaded("llama").tokenizer, ["Hi"], "last:3")
    with pytest.raises(MelboError, match="token position 7 is beyond"):
        encode_prompts(tiny_loaded("llama").tokenizer, ["Hi"], "7")
    with pytest.raises(MelboError, match="empty"):
        encode_prompts(tiny_loaded("llama").tokenizer, ["Hi", "  "], "all")
    with pytest.raises(MelboError, match="no prompt"):
        encode_prompts(tiny_loaded("llama").tokenizer, [], "all")


def test_chat_template_applied_when_present():
    from melbo.prompts import format_prompt

    tok = tiny_loaded("llama").tokenizer
    with pytest.warns(UserWarning, match="no chat template"):
        assert format_prompt(tok, "Hi", chat=True) == "Hi"
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    assert format_prompt(tok, "Hi", chat=True) == "<user>Hi<assistant>"
    assert format_prompt(tok, "Hi", chat=False) == "Hi"
    batch = encode_prompts(tok, ["Hi"], "all", chat=True)
    assert batch.texts == ["<user>Hi<assistant>"] and batch.input_ids.shape[1] == len("<user>Hi<assistant>")
