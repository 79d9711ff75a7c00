"""The whole pipeline on the real pretrained models of ../shared/models (skipped when absent)."""

import pytest
from conftest import shared_model_path

import melbo
from melbo.core.generate import GenerationConfig, generate


@pytest.mark.parametrize("name", ["stories260k", "tinystories-656k"])
def test_run_on_real_model(name, tmp_path):
    lm = melbo.load_model(str(shared_model_path(name)), device="cpu")
    bank = melbo.train(
        lm,
        "Once upon a time, there was a little girl named Lily.",
        out=tmp_path / "run",
        radius="0.5x",
        num_vectors=3,
        steps=40,
        show_progress=False,
        generation=GenerationConfig(max_new_tokens=12),
    )
    ev = bank.evaluation
    assert ev["learned"]["mean_objective"] > ev["random"]["mean_objective"]
    assert max(r["cosine_start_end"] for r in bank.meta["vectors"]) < 0.999
    assert len(ev["unsteered"][0]) > 10  # real text comes out


def test_unsteered_generation_matches_plain_generate():
    lm = melbo.load_model(str(shared_model_path("stories260k")), device="cpu")
    ours = generate(lm, ["Once upon a time"], None, 1, cfg=GenerationConfig(max_new_tokens=20))[0][0]
    ids = lm.tokenizer("Once upon a time", return_tensors="pt")
    ref = lm.model.generate(**ids, max_new_tokens=20, do_sample=False)
    assert ours == lm.tokenizer.decode(ref[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    assert ours.startswith(", there was a little girl named Lily")
