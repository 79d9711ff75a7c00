"""Distinct behaviors (melbo.eval.behaviors, melbo.report.behaviors): clustering of constructed
topics with the real embedder, the adjusted Rand index, the exact enumeration curve against a
brute force over all orderings, c-TF-IDF names, the Pareto frontier against an O(n²) check, and
the wiring into a run folder."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
from conftest import tiny_loaded

import melbo
from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig
from melbo.eval import behaviors as bh
from melbo.eval.behaviors import (
    adjusted_rand_index,
    change_vectors,
    cluster,
    ctfidf_words,
    expected_distinct,
    find_behaviors,
    pareto_front,
    run_items,
)

_CONSTRUCTED = json.loads(
    (Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "judge" / "constructed_topics.json").read_text(
        "utf-8"
    )
)
STORY: str = _CONSTRUCTED["unsteered"]  # three topics of three paraphrases each, far from this story
TOPICS: list[list[str]] = _CONSTRUCTED["topics"]


@pytest.fixture(scope="module")
def embedder():
    try:
        return bh.embedder_path()
    except MelboError as e:
        pytest.skip(f"no sentence-embedding model installed ({e})")


def all_new(rows):
    return [("new", 0.0)] * len(rows)


# ---------------------------------------------------------------- clustering


def test_three_topics_of_paraphrases_are_three_behaviors(embedder):
    items = [
        {"group": "learned", "index": 3 * t + k, "prompt": "P", "unsteered": STORY, "completion": c}
        for t, texts in enumerate(TOPICS)
        for k, c in enumerate(texts)
    ]
    random.Random(0).shuffle(items)
    out = find_behaviors(items, all_new, embedder)
    got = sorted(sorted(b["members"]["learned"]) for b in out["behaviors"])
    assert got == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    words = {frozenset(b["words"]) for b in out["behaviors"]}
    assert any(w & {"pasta", "tomato", "sauce"} for w in words)
    assert any(w & {"moon", "rocket", "astronauts"} for w in words)
    assert out["groups"]["learned"] == {"perturbations": 9, "new": 9, "distinct": 3, "shared": 0}
    assert out["curves"]["learned"][-1] == pytest.approx(3.0)
    # another prompt's completions are never merged with these, even when identical
    other = [dict(it, prompt="Q") for it in items[:2]]
    assert len(find_behaviors(items + other, all_new, embedder)["behaviors"]) >= 4


def test_cluster_cuts_at_the_threshold_and_checks_arguments():
    emb = [[1.0, 0.0], [math.cos(0.3), math.sin(0.3)], [0.0, 1.0]]  # distances 1 − cos: 0.045, 1, 0.70
    assert cluster(emb, 0.1) == [0, 0, 1]
    assert cluster(emb, 0.01) == [0, 1, 2]
    assert cluster(emb, 1.5) == [0, 0, 0]
    assert cluster([[1.0, 0.0]]) == [0] and cluster([[0.0, 0.0], [1.0, 0.0]], 0.5) == [0, 1]
    with pytest.raises(MelboError, match="threshold 3"):
        cluster(emb, 3)
    with pytest.raises(MelboError, match="unknown linkage 'ward'"):
        cluster(emb, 0.5, "ward")


def test_change_vectors_drop_the_unsteered_direction():
    u = [0.6, 0.8, 0.0]
    e = [[0.6, 0.8, 0.0], [0.0, 0.0, 1.0], [0.8, -0.6, 0.0]]
    out = change_vectors(e, u)
    assert out[0] == pytest.approx([0, 0, 0]) and out[1] == pytest.approx(e[1]) and out[2] == pytest.approx(e[2])


def test_adjusted_rand_index_against_sklearn_and_known_cases():
    assert adjusted_rand_index([0, 0, 1, 1], ["a", "a", "b", "b"]) == 1.0
    assert adjusted_rand_index([0, 1, 2], ["x", "y", "z"]) == 1.0  # both all singletons
    # Hubert & Arabie's example by hand: a = [0,0,0,1,1,1], b = [0,0,1,1,2,2]
    # index = 1 + 0 + 1 = 2 pairs; Σ C(a,2) = 6, Σ C(b,2) = 3, C(6,2) = 15: E = 1.2, max 4.5
    assert adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx((2 - 1.2) / (4.5 - 1.2))
    with pytest.raises(MelboError, match="partitions of 2 and 1"):
        adjusted_rand_index([0, 1], [0])
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn (a sentence-transformers dependency)")
    rng = random.Random(1)
    for _ in range(30):
        n = rng.randint(2, 25)
        a = [rng.randint(0, 4) for _ in range(n)]
        b = [rng.randint(0, 3) for _ in range(n)]
        assert adjusted_rand_index(a, b) == pytest.approx(metrics.adjusted_rand_score(a, b), abs=1e-12)


# ---------------------------------------------------------------- enumeration


def brute_force(hits: list[set]) -> list[float]:
    """Mean over all orderings of the number of distinct behaviors among the first k."""
    n = len(hits)
    totals = [0] * n
    orders = list(itertools.permutations(range(n)))
    for order in orders:
        seen: set = set()
        for k, p in enumerate(order):
            seen |= hits[p]
            totals[k] += len(seen)
    return [t / len(orders) for t in totals]


def test_expected_distinct_equals_brute_force_over_all_orderings():
    rng = random.Random(0)
    cases = [[{0}, {0}, set(), {1, 2}], [set(), set()], [{"a"}]]
    for _ in range(12):
        n = rng.randint(1, 6)
        cases.append([{b for b in range(5) if rng.random() < 0.3} for _ in range(n)])
    for hits in cases:
        assert expected_distinct(hits) == pytest.approx(brute_force(hits), abs=1e-12)
    assert expected_distinct([{0}, {1}, {0, 1}], ks=[0, 3]) == pytest.approx([0.0, 2.0])
    with pytest.raises(MelboError, match="k = 4 perturbations out of 3"):
        expected_distinct([{0}, {1}, set()], ks=[4])


def test_enumeration_counts_a_behavior_a_control_shares(embedder):
    items = [
        {"group": g, "index": i, "prompt": "P", "unsteered": STORY, "completion": TOPICS[t][k]}
        for g, i, t, k in [("learned", 0, 0, 0), ("learned", 1, 1, 0), ("learned", 2, 0, 1), ("noise", 0, 0, 2)]
    ] + [{"group": "noise", "index": 1, "prompt": "P", "unsteered": STORY, "completion": STORY}]
    out = find_behaviors(items, lambda rows: [("new" if r["completion"] != STORY else "unchanged", 0.0) for r in rows])
    assert out["groups"]["learned"] == {"perturbations": 3, "new": 3, "distinct": 2, "shared": 1}
    assert out["groups"]["noise"] == {"perturbations": 2, "new": 1, "distinct": 1, "shared": 1}
    assert out["learned_only"] == 1
    assert out["curves"]["learned"] == pytest.approx(brute_force([{0}, {1}, {0}]))
    assert out["curves"]["noise"] == pytest.approx([0.5, 1.0])


# ---------------------------------------------------------------- names and frontier


def test_ctfidf_names_pick_the_distinctive_words():
    classes = [
        ["The knight saw a dragon near the castle.", "A dragon attacked the castle and the knight fought the story."],
        ["The rocket took the astronaut to the moon.", "The astronaut walked on the moon, the story says."],
        ["Lily played in the park.", "Lily went to the park story."],
    ]
    names = ctfidf_words(classes)
    assert names[0] == ["castle", "dragon", "knight"]  # equal scores: alphabetical
    assert names[1] == ["astronaut", "moon", "rocket"]  # "story" is in every class, "the" a stop word
    assert names[2] == ["lily", "park", "played"]
    # by hand: class 0 = "xx xx yy", class 1 = "yy zz"; A = 2.5, f(xx) = f(yy) = 2, f(zz) = 1:
    # xx 2/3·ln(2.25) > yy 1/3·ln(2.25); zz 1/2·ln(3.5) > yy 1/2·ln(2.25)
    assert ctfidf_words([["xx xx yy"], ["yy zz"]], top=2) == [["xx", "yy"], ["zz", "yy"]]
    assert ctfidf_words([[], ["aa"]]) == [[], ["aa"]]


def test_pareto_front_equals_the_quadratic_check():
    def naive(points):
        return [not any(q[0] >= p[0] and q[1] >= p[1] and (q[0] > p[0] or q[1] > p[1]) for q in points) for p in points]

    rng = random.Random(2)
    for _ in range(200):
        n = rng.randint(0, 30)
        pts = [(rng.randint(0, 6) / 6, rng.randint(0, 6) / 6) for _ in range(n)]  # many ties
        assert pareto_front(pts) == naive(pts)
    assert pareto_front([(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.4, 0.4), (0.5, 0.5)]) == [True, True, True, False, True]


def test_find_behaviors_refuses_bad_items_and_labellers():
    with pytest.raises(MelboError, match="completion 0 lacks one of group"):
        find_behaviors([{"prompt": "p"}], all_new)
    item = {"group": "learned", "index": 0, "prompt": "p", "unsteered": "a", "completion": "b"}
    with pytest.raises(MelboError, match="one \\(new \\| degenerate \\| unchanged, score\\) per completion"):
        find_behaviors([item], lambda rows: [])
    with pytest.raises(MelboError, match="per completion"):
        find_behaviors([item], lambda rows: [("odd", 0.0)])


# ---------------------------------------------------------------- a run folder


def test_run_items_reads_learned_and_controls(tmp_path):
    comp = [
        {"kind": "unsteered", "vector": None, "prompt": "p", "completion": "u"},
        {"kind": "learned", "vector": 0, "prompt": "p", "completion": "a"},
        {"kind": "random", "vector": 0, "prompt": "p", "completion": "r"},
    ]
    (tmp_path / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in comp))
    items = run_items(tmp_path)
    assert [(i["group"], i["index"], i["completion"], i["unsteered"]) for i in items] == [("learned", 0, "a", "u")]
    ctl = [{"control": c, "sample": 1, "prompt": "p", "completion": "c"} for c in ("random-vectors", "temperature-1.0")]
    (tmp_path / "controls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ctl))
    assert [(i["group"], i["index"]) for i in run_items(tmp_path)] == [
        ("learned", 0),
        ("random-vectors", 1),
        ("temperature-1.0", 1),
    ]
    (tmp_path / "controls.jsonl").write_text("{not json\n")
    with pytest.raises(MelboError, match="not JSON lines"):
        run_items(tmp_path)


def test_run_behaviors_reuses_the_labels_a_run_stored(tmp_path, embedder, monkeypatch):
    rows = [{"kind": "unsteered", "vector": None, "prompt": "p", "completion": STORY}] + [
        {
            "kind": "learned",
            "vector": v,
            "prompt": "p",
            "completion": text,
            "label": label,
            "scores": {"degenerate": deg, "new": 0.0, "unchanged": 0.0, "reasons": []},
        }
        for v, (text, label, deg) in enumerate(
            [(TOPICS[0][0], "new", 0.1), (TOPICS[0][1], "new", 0.0), ("zzzz zzzz", "degenerate", 0.9)]
        )
    ]
    (tmp_path / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def no_judge(*args, **kwargs):
        raise AssertionError("the run's stored labels should be used")

    monkeypatch.setattr(bh, "judge_labeller", no_judge)
    out = bh.run_behaviors(tmp_path)
    assert "labels stored in the run's completion files" in out["labeller"]
    assert out["groups"]["learned"] == {"perturbations": 3, "new": 2, "distinct": 1, "shared": 0}
    assert {p["index"]: p["fluency"] for p in out["points"]} == {0: 0.9, 1: 1.0, 2: pytest.approx(0.1)}
    assert (tmp_path / "enumeration.png").is_file() and (tmp_path / "frontier.png").is_file()


def test_train_writes_behaviors_plots_and_summary(tmp_path, embedder):
    out = tmp_path / "run"
    bank = melbo.train(
        tiny_loaded("llama"),
        "Hello there.",
        out=out,
        num_vectors=3,
        steps=2,
        radius="3",
        generation=GenerationConfig(max_new_tokens=6),
        show_progress=False,
        controls="temperature-1.0",
    )
    result = bank.evaluation["behaviors"]
    assert set(result["groups"]) == {"learned", "temperature-1.0"}
    assert all(s["perturbations"] == 3 for s in result["groups"].values())
    assert all(len(c) == 3 for c in result["curves"].values()) and len(result["points"]) == 6
    assert (out / "enumeration.png").stat().st_size > 1000 and (out / "frontier.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["behaviors"]["groups"] == result["groups"]
    assert "## Distinct behaviors" in (out / "summary.md").read_text()


def test_no_embedder_skips_the_count(tmp_path, monkeypatch):
    def missing(embedder=None):
        raise MelboError("no sentence-embedding model")

    monkeypatch.delenv("MELBO_EMBEDDER", raising=False)
    monkeypatch.setattr(bh, "embedder_path", missing)
    assert bh.run_behaviors(tmp_path) == {"skipped": "no sentence-embedding model"}
    assert not (tmp_path / "enumeration.png").exists()


def test_a_named_embedder_that_fails_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MELBO_EMBEDDER", str(tmp_path / "no-such-embedder"))
    with pytest.raises(MelboError, match="no-such-embedder"):
        bh.run_behaviors(tmp_path)
    assert not (tmp_path / "enumeration.png").exists()
