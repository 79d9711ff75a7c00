"""Tests of melbo.detect and `melbo detect`: the AUROC, the bank directions against a naive
full-model computation, the standardized score, the leave-one-out reference scores, bad input."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from conftest import tiny_loaded, tiny_run
from naive import target_activations

from melbo.cli import main
from melbo.core.errors import MelboError
from melbo.detect import Detector, auroc, detect, threshold

PROMPTS = ["The cat sat.", "A dog ran far.", "Birds fly high.", "Fish swim.", "The sun is hot today."]


def naive_auroc(pos, neg):
    wins = 0.0
    for a in pos:
        for b in neg:
            wins += 1.0 if a > b else 0.5 if a == b else 0.0
    return wins / (len(pos) * len(neg))


def test_auroc_matches_the_pairwise_definition():
    torch.manual_seed(0)
    pos, neg = torch.randn(17).round(decimals=1) + 0.5, torch.randn(23).round(decimals=1)
    assert auroc(pos, neg) == pytest.approx(naive_auroc(pos.tolist(), neg.tolist()))
    assert auroc([2, 3], [0, 1]) == 1.0 and auroc([0, 1], [2, 3]) == 0.0 and auroc([1, 1], [1]) == 0.5
    with pytest.raises(MelboError, match="0 positive"):
        auroc([], [1.0])
    with pytest.raises(MelboError, match="non-finite"):
        auroc([float("nan")], [1.0])


def test_target_directions_match_the_naive_full_model_shift():
    lm = tiny_loaded("llama")
    torch.manual_seed(1)
    vectors = torch.randn(3, lm.d_model) * 2.0
    det = Detector.fit(lm, vectors, 0, 2, PROMPTS, where="target", positions="last")
    tok = lm.tokenizer
    for i, theta in enumerate(vectors):
        shifts = []
        for p in PROMPTS:  # one prompt and one vector at a time, the full model, a hook
            ids = torch.tensor(tok(p)["input_ids"])
            with torch.no_grad():
                shifts.append(
                    target_activations(lm, ids, 0, 2, theta)[-1] - target_activations(lm, ids, 0, 2, None)[-1]
                )
        delta = torch.stack(shifts).mean(0)
        assert torch.allclose(det.directions[i], delta / delta.norm(), atol=1e-5)
    src = Detector.fit(lm, vectors, 0, 2, PROMPTS, where="source")
    assert torch.allclose(src.directions, vectors / vectors.norm(dim=1, keepdim=True))
    ids = torch.tensor(tok(PROMPTS[1])["input_ids"])
    with torch.no_grad():
        assert torch.allclose(det.reference[1], target_activations(lm, ids, 0, 2, None)[-1], atol=1e-5)


def test_score_is_the_largest_standardized_shift_and_leave_one_out_is_out_of_sample():
    torch.manual_seed(2)
    ref = torch.randn(12, 6)
    dirs = torch.linalg.qr(torch.randn(6, 3))[0].T  # 3 orthonormal directions
    det = Detector(dirs, "target", "last", ref, 0, 1)
    mu = ref.mean(0)
    spread = (ref @ dirs.T).std(0)
    x = mu + 4.0 * spread[1] * dirs[1]
    s, best, base = det.score(x[None])
    assert int(best) == 1 and float(s) == pytest.approx(4.0, rel=1e-4)
    assert float(base) == pytest.approx(float(4.0 * spread[1]), rel=1e-4)
    loo, loo_base = det.reference_scores()
    for j in (0, 5, 11):  # the same as a detector fitted without prompt j
        rest = Detector(dirs, "target", "last", torch.cat([ref[:j], ref[j + 1 :]]), 0, 1)
        s_j, _, b_j = rest.score(ref[j][None])
        assert float(loo[j]) == pytest.approx(float(s_j), rel=1e-5)
        assert float(loo_base[j]) == pytest.approx(float(b_j), rel=1e-5)
    assert threshold(torch.arange(101.0), 0.05) == pytest.approx(95.0)
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(MelboError, match=f"false-positive rate {bad!r}"):
            threshold(loo, bad)


def test_fit_refuses_bad_input():
    lm = tiny_loaded("llama")
    v = torch.randn(2, lm.d_model)
    with pytest.raises(MelboError, match="where 'middle'"):
        Detector.fit(lm, v, 0, 2, PROMPTS, where="middle")
    with pytest.raises(MelboError, match="positions 'first'"):
        Detector.fit(lm, v, 0, 2, PROMPTS, positions="first")
    with pytest.raises(MelboError, match="at least 3 clean reference prompts to measure the clean spread, got 2"):
        Detector.fit(lm, v, 0, 2, PROMPTS[:2])
    with pytest.raises(MelboError, match="got 2 and 2"):
        Detector.fit(lm, v, 2, 2, PROMPTS)
    with pytest.raises(MelboError, match=r"shape \(2, 5\)"):
        Detector.fit(lm, torch.randn(2, 5), 0, 2, PROMPTS)
    with pytest.raises(MelboError, match="vector 1 has zero norm"):
        Detector.fit(lm, torch.stack([v[0], torch.zeros(lm.d_model)]), 0, 2, PROMPTS, where="source")


def test_detect_and_the_cli(tmp_path, monkeypatch, capsys):
    lm = tiny_loaded("llama")
    bank = tiny_run(tmp_path / "run", "The cat sat on the mat.", 3, lm)
    result = detect(bank, PROMPTS[:2], PROMPTS[2:], positions="mean", fpr=0.5)
    assert [r["prompt"] for r in result["rows"]] == PROMPTS[:2] and len(result["reference"]) == 3
    assert all(r["flagged"] == (r["score"] > result["threshold"]) for r in result["rows"])
    assert all(0 <= r["vector"] < 3 for r in result["rows"])

    cli_detect = importlib.import_module("melbo.cli.detect")  # the module, not the command of that name

    # the bank's model is a tiny one built in memory: hand it to the command
    monkeypatch.setattr(cli_detect, "open_model", lambda *a, **k: lm)
    ref = tmp_path / "clean.txt"
    ref.write_text("\n".join(PROMPTS[2:]) + "\n", encoding="utf-8")
    out = tmp_path / "scores.jsonl"
    args = ["detect", "--bank", str(tmp_path / "run"), "--reference-file", str(ref)]
    with pytest.raises(SystemExit) as e:
        main(args + ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", str(out), "--random"])
    assert e.value.code == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS[:2]
    assert "threshold" in capsys.readouterr().out
    small = tmp_path / "two.txt"
    small.write_text("a\nb\n", encoding="utf-8")
    for extra, message in (
        ([], "no inputs to score"),
        (["--prompt", "x", "--fpr", "1.5"], "--fpr 1.5 is not allowed"),
        (["--prompt", "x", "--layer", "middle"], "Invalid value for '--layer'"),
        (
            ["--prompt", "x", "--reference-file", str(small)],
            "at least 3 clean reference prompts to measure the clean spread, got 2",
        ),
        (["--prompt", "x", "--reference-file", str(tmp_path / "nope.txt")], "nope.txt"),
    ):
        with pytest.raises(SystemExit) as e:
            main(args + extra)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
