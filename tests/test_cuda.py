"""GPU paths (opt-in: run only where CUDA is available; CI has no GPU)."""

import pytest
import torch
from conftest import char_tokenizer, tiny_model

import melbo
from melbo.core.models import wrap_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")


def loaded(dtype):
    return wrap_model(tiny_model("llama").to("cuda", dtype), char_tokenizer())


def test_cuda_float32_matches_cpu():
    cpu = wrap_model(tiny_model("llama"), char_tokenizer())
    gpu = loaded(torch.float32)
    out = [
        melbo.train(
            lm,
            ["The cat sat.", "Hi"],
            num_vectors=2,
            steps=10,
            radius="2",
            source_layer=0,
            target_layer=2,
            show_progress=False,
        ).vectors
        for lm in (cpu, gpu)
    ]
    torch.testing.assert_close(out[0], out[1], atol=1e-3, rtol=1e-3)


def test_cuda_bfloat16_trains_and_generates():
    lm = loaded(torch.bfloat16)
    bank = melbo.train(
        lm, "The cat sat.", num_vectors=2, steps=10, radius="2", source_layer=0, target_layer=2, show_progress=False
    )
    v = bank.vectors
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    assert torch.allclose(v.norm(dim=-1), torch.full((2,), 2.0), atol=1e-4)
    assert len(bank.generate("The cat", max_new_tokens=4)) == 3
