"""The orchestrator (melbo.train): validation before work, run folders, the random baseline,
resume equals an uninterrupted run for every resumable method, the defaults table."""

import json

import pytest
import torch
from conftest import tiny_loaded, tiny_run

import melbo
from melbo.bank import Bank
from melbo.core.errors import MelboError
from melbo.defaults import DEFAULTS, REASONS
from melbo.methods.registry import METHODS

PROMPT = "Hello there, world!"


def test_every_method_has_a_complete_defaults_table():
    import dataclasses

    for name, cls in METHODS.items():
        fields = {f.name for f in dataclasses.fields(cls.settings_class)}
        assert fields == set(DEFAULTS[name]), name
        assert all(REASONS[name][k] for k in fields)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"colour": "red"}, "unknown setting 'colour' for method 'melbo'"),
        ({"radius": "-1"}, "bad radius '-1'"),
        ({"p": 0}, "p must be a finite number > 0"),
        ({"num_vectors": 0}, "number of vectors must be a whole number in 1"),
        ({"steps": 2.5}, "steps must be a whole number"),
        ({"positions": "last:0"}, "K must be >= 1"),
        ({"seed": -3}, "seed must be a whole number"),
        ({"source_layer": 3, "target_layer": 1}, "must come before"),
        ({"source_layer": 9}, "out of range"),
    ],
)
def test_bad_settings_fail_before_anything_is_written(tmp_path, settings, message):
    lm = tiny_loaded("llama")
    with pytest.raises(MelboError, match=message):
        melbo.train(lm, PROMPT, out=tmp_path / "run", show_progress=False, **settings)
    assert not (tmp_path / "run").exists()


def test_bad_prompts_and_methods(tmp_path):
    lm = tiny_loaded("llama")
    with pytest.raises(MelboError, match="empty"):
        melbo.train(lm, ["  "], out=tmp_path / "r")
    with pytest.raises(MelboError, match="unknown method 'sae'; allowed: melbo, dct, adapter, rank1, ortho"):
        melbo.train(lm, PROMPT, "sae")
    with pytest.raises(MelboError, match="needs a base vector"):
        melbo.train(lm, PROMPT, "ortho")
    with pytest.raises(MelboError, match="radius calibrate is not available for adapters"):
        melbo.train(lm, PROMPT, "adapter", radius="calibrate")
    assert not (tmp_path / "r").exists()


def test_in_memory_run_returns_an_attached_bank():
    lm = tiny_loaded("llama")
    bank = melbo.train(lm, PROMPT, num_vectors=3, steps=4, radius="0.5x", show_progress=False)
    assert len(bank) == 3 and bank.lm is lm and bank.random is not None and len(bank.random) == 3
    norms = bank.vectors.double().norm(dim=-1)
    torch.testing.assert_close(norms, torch.full((3,), bank.meta["radius"], dtype=torch.float64), rtol=1e-5, atol=0)
    assert bank.meta["radius"] == pytest.approx(0.5 * bank.meta["residual_norm"])
    assert bank.meta["residual_norm_statistic"] == "median"
    cos = (bank.vectors @ bank.vectors.T) / bank.meta["radius"] ** 2
    assert (cos - torch.eye(3)).abs().max() < 1e-5
    assert len(bank.meta["random_objectives"]) == 3 and bank.evaluation is None


def test_run_folder_holds_bank_completions_summary(tmp_path):
    lm = tiny_loaded("llama")
    out = tmp_path / "run"
    bank = tiny_run(out, PROMPT, num_vectors=2, lm=lm)
    names = {p.name for p in out.iterdir()}
    counted = "skipped" not in bank.evaluation["behaviors"]  # distinct behaviors need the embedder
    assert names == {
        "bank.safetensors",
        "completions.jsonl",
        "summary.md",
        "summary.json",
        "report.html",
        "kl.png",
        ".melbo-run.json",  # the marker: this folder holds a `train` run (melbo.core.outputs)
        *(("enumeration.png", "frontier.png") if counted else ()),
    }
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {(r["kind"], r["split"]) for r in rows} == {
        (k, s) for k in ("unsteered", "learned", "random") for s in ("train", "heldout")
    }
    ev = bank.evaluation
    assert ev["learned"]["n"] == 2 and ev["random"]["n"] == 2 and ev["seconds_per_step"] > 0
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "learned" in md and "random (same R)" in md and "Prompt 0" in md
    with pytest.raises(MelboError, match="already holds a run; pass --resume"):
        melbo.train(lm, PROMPT, out=out, num_vectors=2, steps=3, radius="2", show_progress=False)


@pytest.mark.parametrize(
    "method, extra",
    [
        ("melbo", {"steps": 4, "batch_vectors": 1}),
        ("adapter", {"steps": 3, "batch": 2}),
        ("ortho", {"steps": 15, "min_norm": 0.0}),
    ],
)
def test_resume_equals_an_uninterrupted_run(tmp_path, method, extra):
    lm = tiny_loaded("llama")
    kw = dict(extra, radius="2") if method != "ortho" else dict(extra)
    if method == "ortho":
        kw["base"] = melbo.train(lm, PROMPT, num_vectors=1, steps=3, radius="2", show_progress=False)[0]
    full = melbo.train(
        lm, PROMPT, method, out=tmp_path / "full", num_vectors=4, evaluate=False, show_progress=False, **kw
    )
    part = melbo.train(
        lm, PROMPT, method, out=tmp_path / "part", num_vectors=2, evaluate=False, show_progress=False, **kw
    )
    assert len(part) == (3 if method == "ortho" else 2)
    resumed = melbo.train(
        lm, PROMPT, method, out=tmp_path / "part", resume=True, num_vectors=4, evaluate=False, show_progress=False, **kw
    )
    for name in full.tensors:
        torch.testing.assert_close(resumed.tensors[name], full.tensors[name], atol=1e-6, rtol=1e-5)
    assert [r.get("objective") for r in resumed.meta["vectors"]] == pytest.approx(
        [r.get("objective") for r in full.meta["vectors"]], rel=1e-5
    )
    again = Bank.load(tmp_path / "part")
    assert again.meta["complete"] is True and len(again) == len(full)


def test_resume_refuses_other_settings(tmp_path):
    lm = tiny_loaded("llama")
    melbo.train(lm, PROMPT, out=tmp_path / "r", num_vectors=1, steps=2, radius="2", evaluate=False, show_progress=False)
    with pytest.raises(MelboError, match="the run in the bank has radius=2.0, this command asks for 3.0"):
        melbo.train(
            lm, PROMPT, out=tmp_path / "r", resume=True, num_vectors=2, steps=2, radius="3", show_progress=False
        )
    with pytest.raises(MelboError, match="no bank.safetensors"):
        melbo.train(lm, PROMPT, out=tmp_path / "nothing", resume=True)
    melbo.train(
        lm, PROMPT, "dct", out=tmp_path / "d", num_vectors=2, radius="1", factors=4, evaluate=False, show_progress=False
    )
    with pytest.raises(MelboError, match="the run in the bank has factors=4, this command asks for 8"):
        melbo.train(lm, PROMPT, "dct", out=tmp_path / "d", resume=True, num_vectors=2, radius="1", factors=8)


def test_dct_bank_holds_all_factors_and_evaluates_the_top(tmp_path):
    lm = tiny_loaded("llama")
    bank = melbo.train(
        lm,
        PROMPT,
        "dct",
        out=tmp_path / "d",
        num_vectors=3,
        radius="1",
        factors=8,
        generation=melbo.GenerationConfig(max_new_tokens=4),
        show_progress=False,
    )
    assert len(bank) == 8 and len(bank.random) == 8 and bank.evaluation["evaluated"] == 3
    alpha2 = [r["alpha"] ** 2 for r in bank.meta["vectors"]]
    assert alpha2 == sorted(alpha2, reverse=True)
