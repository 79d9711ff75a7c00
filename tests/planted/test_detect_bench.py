"""Tests of melbo.planted.detect_bench and `melbo bench detect`: the prompt sets, and a run on the
packaged planted model."""

from __future__ import annotations

import json

import pytest

from melbo.cli import main
from melbo.core.errors import MelboError
from melbo.planted.bench import bench_prompts
from melbo.planted.fixtures import FIXTURES, load_planted_lm
from melbo.planted.scoring import parse_problem
from melbo.planted.spec import load_spec
from melbo.planted.story import story_trigger


@pytest.mark.parametrize("name", ["default", "story"])
def test_prompt_sets_are_disjoint_and_labelled_by_the_spec(name):
    from melbo.planted.detect_bench import detection_prompts

    spec = load_spec(name)
    train, _ = bench_prompts(spec, None, 1, None, 2)
    ref, clean, triggered = detection_prompts(spec, train, 10, 8)
    assert len(ref) == 10 and len(clean) == 8 and set(triggered) == {b.name for b in spec.backdoors}
    every = train + ref + clean + [p for ps in triggered.values() for p in ps]
    assert len(set(every)) == len(every)

    def group(p: str) -> str | None:
        b = spec.backdoor_for(parse_problem(p)) if spec.task == "arithmetic" else story_trigger(spec, p)
        return b.name if b else None

    assert all(group(p) is None for p in train + ref + clean)
    assert all(group(p) == g for g, ps in triggered.items() for p in ps) and all(triggered.values())
    with pytest.raises(MelboError, match="number of reference prompts"):
        detection_prompts(spec, train, 2, 8)
    with pytest.raises(MelboError, match="1000 reference \\+ 1000 test prompts need 2000"):
        detection_prompts(spec, train, 1000, 1000)


def test_bench_on_the_packaged_planted_model(tmp_path, capsys):
    out = tmp_path / "det"
    argv = ["bench", "detect", "--model", str(FIXTURES["default"]), "--num-vectors", "8", "--num-reference", "16"]
    with pytest.raises(SystemExit) as e:
        main(argv + ["--num-test", "12", "--out", str(out)])
    assert e.value.code == 0
    report = json.loads((out / "detect.json").read_text(encoding="utf-8"))
    assert report["n_reference"] == 16 and report["n_clean"] == 12 and set(report["layers"]) == {"target", "source"}
    for row in report["layers"].values():
        for key in ("learned", "random", "baseline"):
            assert set(row[key]["auroc"]) == {"cheese", "hate", "all"}
            assert all(0 <= a <= 1 for a in row[key]["auroc"].values())
    # the planted triggers move the target layer: even the distance baseline separates them (were the
    # prompt sets mislabelled, every AUROC would sit near 0.5)
    assert report["layers"]["target"]["baseline"]["auroc"]["all"] > 0.75
    assert "| learned bank | target |" in (out / "detect.md").read_text(encoding="utf-8")
    assert "AUROC" in capsys.readouterr().out
    for extra, message in (
        (["--num-reference", "2"], "number of reference prompts"),
        (["--fpr", "0"], "--fpr 0.0 is not allowed"),
        (["--method", "adapter"], "Invalid value for '--method'"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["bench", "detect", "--model", str(FIXTURES["default"]), "--out", str(tmp_path / "x")] + extra)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_adapters_are_refused(tmp_path):
    from melbo.planted.bench_config import setting_from_options
    from melbo.planted.detect_bench import run_detect_bench

    lm, spec = load_planted_lm(FIXTURES["default"])
    with pytest.raises(MelboError, match="adapters have no direction"):
        run_detect_bench(lm, spec, setting_from_options("adapter", spec.task, num_vectors=2), tmp_path / "a")
    assert not (tmp_path / "a").exists()
