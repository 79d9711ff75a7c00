"""KL curves, norms, moving averages, rescaling and means, plots (METHOD.md sections 3-4)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from conftest import char_tokenizer, tiny_loaded, tiny_model

from melbo.bank import Bank
from melbo.cli import main
from melbo.core.errors import MelboError
from melbo.core.models import wrap_model
from melbo.measure import (
    effective_window,
    kl_curves,
    kl_divergence,
    kl_label,
    last_token_logprobs,
    mean_vector,
    moving_average,
    rescale_vectors,
    vector_norms,
    vector_variants,
)

PROMPTS = ["Hello there, friend", "The cat"]


@functools.cache
def lm_of(arch):
    return tiny_loaded(arch)


def _naive_kl(lm, prompt, vec_p, vec_q, layer):
    """KL(P ‖ Q) at the last position: full model, one vector at a time, full logits, a plain hook."""
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]

    def logp(vec):
        hooks = []
        if vec is not None:

            def add(module, args, output):
                if isinstance(output, tuple):
                    return (output[0] + vec,) + tuple(output[1:])
                return output + vec

            hooks.append(lm.blocks[layer].register_forward_hook(add))
        try:
            with torch.no_grad():
                return torch.log_softmax(lm.model(input_ids=ids).logits[0, -1].double(), -1)
        finally:
            for h in hooks:
                h.remove()

    p, q = logp(vec_p), logp(vec_q)
    return torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum").item()  # Σ p (log p − log q)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kl_matches_naive_and_is_zero_for_reference(arch):
    lm = lm_of(arch)
    g = torch.Generator().manual_seed(1)
    vecs = torch.randn(5, lm.d_model, generator=g) * 2.0
    layer = 1
    kl = kl_curves(lm, PROMPTS, vecs, layer, reference=vecs[2], batch_size=2)
    assert kl.direction == "k||ref" and kl.to_reference.shape == (5,) and kl.per_prompt_unsteered.shape == (5, 2)
    assert kl.to_reference[2].item() <= 1e-6
    assert kl.to_reference.max() > 1e-3
    for k in range(5):
        for i, prompt in enumerate(PROMPTS):
            assert kl.per_prompt_reference[k, i].item() == pytest.approx(
                _naive_kl(lm, prompt, vecs[k], vecs[2], layer), rel=1e-3, abs=1e-6
            )
            assert kl.per_prompt_unsteered[k, i].item() == pytest.approx(
                _naive_kl(lm, prompt, vecs[k], None, layer), rel=1e-3, abs=1e-6
            )
    rev = kl_curves(lm, PROMPTS[:1], vecs[:2], layer, reference=vecs[2], direction="ref||k")
    assert rev.to_reference[0].item() == pytest.approx(
        _naive_kl(lm, PROMPTS[0], vecs[2], vecs[0], layer), rel=1e-3, abs=1e-6
    )


def test_last_token_logprobs_batched_equals_single():
    lm = lm_of("llama")
    vecs = torch.randn(3, lm.d_model, generator=torch.Generator().manual_seed(2))
    many = last_token_logprobs(lm, PROMPTS, vecs, 1, batch_size=3)
    one = torch.cat([last_token_logprobs(lm, PROMPTS, vecs[k : k + 1], 1) for k in range(3)])
    assert many.shape == (3, 2, 128)
    assert torch.allclose(many, one, atol=1e-5)
    assert torch.allclose(many.exp().sum(-1), torch.ones(3, 2), atol=1e-5)


def test_kl_divergence_basics():
    p = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0]]), -1)
    q = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0]]), -1)
    assert kl_divergence(p, p).item() == 0
    assert kl_divergence(p, q).item() == pytest.approx((p.exp() * (p - q)).sum().item(), rel=1e-6)
    zero_p = torch.tensor([[0.0, float("-inf")]])
    assert kl_divergence(zero_p, torch.log(torch.tensor([[0.5, 0.5]]))).item() == pytest.approx(np.log(2), rel=1e-6)
    assert kl_label("k||ref", "0") == "KL(P_k ‖ P_0)" and kl_label("ref||k", "0") == "KL(P_0 ‖ P_k)"
    with pytest.raises(MelboError, match="direction"):
        kl_label("sideways")


def test_norms_rescale_mean_moving_average():
    v = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
    assert vector_norms(v).tolist() == [5.0, 2.0, 1.0]
    assert torch.allclose(vector_norms(rescale_vectors(v, 7)), torch.full((3,), 7.0))
    assert torch.allclose(mean_vector(v, [0, 2]), torch.tensor([2.0, 2.0]))
    with pytest.raises(MelboError, match="outside"):
        mean_vector(v, [5])
    with pytest.raises(MelboError, match="rescale norm"):
        rescale_vectors(v, 0)
    with pytest.raises(MelboError, match="zero"):
        rescale_vectors(torch.zeros(1, 2), 1.0)
    assert moving_average([1, 2, 3, 4], 2).tolist() == [1.5, 2.5, 3.5]
    assert moving_average([1, float("nan"), 3], 2).tolist() == [1.0, 3.0]
    assert effective_window(1558) == 50 and effective_window(64) == 16 and effective_window(3) == 1
    with pytest.raises(MelboError, match="window"):
        effective_window(10, 0)


def test_vector_variants_and_cli_generate_rescale_mean(tmp_path, capsys):
    v = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
    rows, labels = vector_variants(v, [0], [1, 2], rescale=10.0)
    assert labels == [
        "vector 0 (norm 5)",
        "mean of vectors 1,2 (norm 1.118)",
        "vector 0 rescaled to norm 10",
        "mean of vectors 1,2 rescaled to norm 10",
    ]
    assert torch.allclose(rows[3], torch.tensor([5.0, 10.0]) / 1.118034 * 10 / 10, atol=1e-4)

    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    lm = wrap_model(tiny_model("llama"), char_tokenizer(), name=str(model_dir))
    vecs = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    Bank({"vectors": vecs}, {**lm.identity(), "source_layer": 1}).save(tmp_path / "bank.safetensors")
    with pytest.raises(SystemExit) as e:
        main(
            [
                "generate",
                "--bank",
                str(tmp_path / "bank.safetensors"),
                "--prompt",
                "Hi",
                "--mean",
                "1,3",
                "--rescale",
                "7",
                "--max-new-tokens",
                "3",
                "--device",
                "cpu",
            ]
        )
    out = capsys.readouterr().out
    assert e.value.code == 0
    for label in (
        "--- unsteered:",
        "--- vector 1 (norm",
        "--- vector 3 (norm",
        "--- mean of vectors 1,3 (norm",
        "--- vector 1 rescaled to norm 7 x 1:",
        "--- mean of vectors 1,3 rescaled to norm 7",
    ):
        assert label in out, label
    assert "--- vector 0 " not in out  # --mean without --vectors applies only its members
