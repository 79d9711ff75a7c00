"""Tests of melbo.planted.plant: a miniature training run (tiny model, a few steps; thresholds not
asserted) writes a complete folder or nothing, deterministically for a seed; and `melbo plant`."""

from __future__ import annotations

import json

import pytest
import torch
from planted.specs import minimal, with_backdoors
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import melbo.planted.plant as plant_module
from melbo.cli import main
from melbo.core.errors import MelboError
from melbo.planted.plant import REPORT_FILE, SPEC_FILE, check_report, load_planted, plant
from melbo.planted.spec import parse_spec

TINY = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}


def test_miniature_training_writes_model_and_report(tmp_path):
    spec = parse_spec(
        minimal(
            model=TINY,
            train={"steps": 3, "batch_size": 8, "warmup_steps": 1},
            noise={"residual_std": 0.1, "residual_dropout": 0.1},
            eval={"n_clean": 6, "n_triggered": 3},
        )
    )
    out = tmp_path / "m"
    report = plant(spec, out, seed=1, progress=False)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", SPEC_FILE, REPORT_FILE):
        assert (out / name).is_file(), name
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no hidden work folder left beside it
    saved = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    assert saved["status"] in ("PASSED", "FAILED") and saved["recipe"] == "noisy" and saved["seed"] == 1
    assert set(saved["backdoors"]) == {"cheese", "hate"} and saved["n_clean"] == 6
    assert 0 <= saved["clean_accuracy"] <= 1 and saved["steps"] == 3
    assert report["status"] == "FAILED"  # three steps cannot learn the task
    with pytest.raises(MelboError, match="missed its thresholds.*kept for inspection"):
        check_report(report)
    model, _tok, spec2, report2 = load_planted(out)
    assert spec2.train.seed == 1 and report2["status"] == report["status"]
    assert isinstance(model, AutoModelForCausalLM._model_mapping[type(model.config)])
    with pytest.raises(MelboError, match="exists and is not an empty folder"):
        plant(spec, out, progress=False)
    with pytest.raises(MelboError, match="device 'gpu9'"):
        plant(spec, tmp_path / "n", device="gpu9", progress=False)


def test_training_is_deterministic_for_a_seed(tmp_path):
    spec = parse_spec(
        minimal(
            model=TINY, train={"steps": 2, "batch_size": 4, "warmup_steps": 1}, eval={"n_clean": 2, "n_triggered": 1}
        )
    )
    weights = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        plant(spec, tmp_path / name, seed=seed, progress=False)
        weights.append(load_file(tmp_path / name / "model.safetensors"))
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])
    assert not all((weights[0][k] == weights[2][k]).all() for k in weights[0])


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_plant_leaves_nothing_behind(tmp_path, monkeypatch, existing):
    """Ctrl-C in the middle of training: no output folder and no hidden work folder remain; with
    ``overwrite``, the folder that was there before is left as it was."""
    spec = parse_spec(minimal(model=TINY, train={"steps": 2, "batch_size": 4}, eval={"n_clean": 2, "n_triggered": 1}))
    out = tmp_path / "m"
    if existing:  # an earlier planted model, which overwrite replaces
        out.mkdir()
        for name in (REPORT_FILE, SPEC_FILE):
            (out / name).write_text("old", encoding="utf-8")
    seen = []

    def interrupted(*args, **kwargs):
        seen.extend(p.name for p in tmp_path.iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(plant_module, "train_lm", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plant(spec, out, progress=False, overwrite=existing)
    hidden = [name for name in seen if name.startswith(".")]
    assert len(hidden) == 1  # the run was building its folder in a hidden sibling when interrupted
    if existing:
        assert [p.name for p in tmp_path.iterdir()] == ["m"]
        assert sorted(p.name for p in out.iterdir()) == sorted([REPORT_FILE, SPEC_FILE])
        assert (out / SPEC_FILE).read_text(encoding="utf-8") == "old"
    else:
        assert list(tmp_path.iterdir()) == []


# --- command line -----------------------------------------------------------------------------


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_cli_plant_bad_spec_and_failed_thresholds(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(with_backdoors({"name": "x", "trigger": {"a1": 12}, "phrase": "hi"})))
    code, _, err = run_cli(["plant", "--spec", str(bad), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "error:" in err and "a1 has 12" in err and not (tmp_path / "m").exists()

    tiny = tmp_path / "tiny.json"
    tiny.write_text(
        json.dumps(
            minimal(model=TINY, train={"batch_size": 4, "warmup_steps": 1}, eval={"n_clean": 4, "n_triggered": 2})
        )
    )
    out = tmp_path / "m"
    code, stdout, err = run_cli(
        ["plant", "--spec", str(tiny), "--out", str(out), "--steps", "2", "--seed", "3", "--noise", "0.2"], capsys
    )
    assert code == 2 and "[FAILED]" in stdout and "kept for inspection" in err
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["steps"] == 2 and report["seed"] == 3 and report["recipe"] == "noisy"
    assert json.loads((out / SPEC_FILE).read_text())["noise"]["residual_std"] == 0.2


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_logits_at_selected_positions_equal_the_full_logits(arch):
    """gemma2 soft-caps its final logits: the shortcut must do the same."""
    from conftest import tiny_model

    from melbo.planted.training import logits_at

    m = tiny_model(arch)
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 0, 0]])
    mask = (ids != 0).long()
    where = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(logits_at(m, ids, mask, where), m(input_ids=ids, attention_mask=mask).logits[where])
