"""Coherence of completions, judged by the unsteered model's own token probabilities."""

import torch
from conftest import shared_model_path, tiny_loaded

import melbo
from melbo.quality import is_coherent, repetition, surprising_share, token_logprobs


def test_repetition_and_surprise():
    assert repetition("day day day day day day day") > 0.75
    assert repetition("Lily went to the park and saw a big red ball.") == 0
    assert repetition("") == 0
    assert surprising_share(torch.tensor([-1.0, -7.0, -0.5, -9.0])) == 0.5
    assert surprising_share(torch.zeros(0)) == 1.0
    assert not is_coherent("   ", torch.zeros(3))


def test_token_logprobs_match_the_full_forward():
    lm = tiny_loaded("llama")
    lp = token_logprobs(lm, "Hello", " there")
    ids = lm.tokenizer("Hello there")["input_ids"]
    with torch.no_grad():
        full = lm.model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    want = torch.stack([full[t - 1, ids[t]] for t in range(len(ids) - 6, len(ids))])
    torch.testing.assert_close(lp, want)


def test_real_model_tells_text_from_gibberish():
    lm = melbo.load_model(str(shared_model_path("stories260k")))
    prompt = "Once upon a time, there was a little girl named Lily."
    story = " She loved to play outside in the park. One day, she saw a big, red ball."
    soup = " upon upon upon ahhingthing inteemakingthingthing zzq bog bog caart"
    assert is_coherent(story, token_logprobs(lm, prompt, story))
    assert not is_coherent(soup, token_logprobs(lm, prompt, soup))
