"""The whole pipeline on the real pretrained models of ../shared/models (skipped when absent)."""

import pytest

from conftest import shared_model_path
from melbo.generate import generate
from melbo.models import load_model
from melbo.run import RunSpec, run_train
from melbo.generate import GenerationConfig


@pytest.mark.parametrize("name", ["stories260k", "tinystories-656k"])
def test_run_on_real_model(name, tmp_path):
    path = str(shared_model_path(name))
    lm = load_model(path, device="cpu")
    spec = RunSpec(model=path, prompts=["Once upon a time, there was a little girl named Lily."],
                   out=str(tmp_path / "run"), radius="0.5x", num_vectors=3, steps=40, show_progress=False,
                   generation=GenerationConfig(max_new_tokens=12))
    s = run_train(spec, lm)
    assert s["learned"]["mean_objective"] > s["random"]["mean_objective"]
    assert s["mean_cosine_start_end"] < 0.999
    assert len(s["unsteered"][0]) > 10  # real text comes out


def test_unsteered_generation_matches_plain_generate():
    path = str(shared_model_path("stories260k"))
    lm = load_model(path, device="cpu")
    ours = generate(lm, ["Once upon a time"], None, 1, cfg=GenerationConfig(max_new_tokens=20))[0][0]
    ids = lm.tokenizer("Once upon a time", return_tensors="pt")
    ref = lm.model.generate(**ids, max_new_tokens=20, do_sample=False)
    assert ours == lm.tokenizer.decode(ref[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert ours.startswith(", there was a little girl named Lily")
