"""GPU paths (opt-in: run only where CUDA is available; CI has no GPU)."""

import pytest
import torch

from conftest import tiny_model, char_tokenizer
from melbo.generate import GenerationConfig, generate
from melbo.models import wrap_model
from melbo.objective import Slice
from melbo.prompts import encode_prompts
from melbo.train import TrainConfig, train_vectors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")


def loaded(dtype):
    return wrap_model(tiny_model("llama").to("cuda", dtype), char_tokenizer())


def test_cuda_float32_matches_cpu():
    cpu = wrap_model(tiny_model("llama"), char_tokenizer())
    gpu = loaded(torch.float32)
    cfg = TrainConfig(radius=2.0, num_vectors=2, steps=10)
    out = []
    for lm in (cpu, gpu):
        s = Slice(lm.model, lm.blocks, encode_prompts(lm.tokenizer, ["The cat sat.", "Hi"], "all"), 0, 2)
        out.append(torch.stack([r.vector for r in train_vectors(s, cfg, show_progress=False)]))
    torch.testing.assert_close(out[0], out[1], atol=1e-3, rtol=1e-3)


def test_cuda_bfloat16_trains_and_generates():
    lm = loaded(torch.bfloat16)
    s = Slice(lm.model, lm.blocks, encode_prompts(lm.tokenizer, ["The cat sat."], "all"), 0, 2)
    res = train_vectors(s, TrainConfig(radius=2.0, num_vectors=2, steps=10), show_progress=False)
    v = torch.stack([r.vector for r in res])
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    assert torch.allclose(v.norm(dim=-1), torch.full((2,), 2.0), atol=1e-4)
    comps = generate(lm, ["The cat"], v, 0, cfg=GenerationConfig(max_new_tokens=4))
    assert len(comps) == 2
