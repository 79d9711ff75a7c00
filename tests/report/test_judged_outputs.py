"""The behavior judge in a run's outputs: ``completions.jsonl`` carries the labels and scores that
:func:`melbo.eval.judge.judge` gives the same rows, ``summary.json``/``summary.md`` count them,
the controls panel's hit is the label ``new``, ``report.html`` tags and filters by label, and a run
embeds each text once."""

from __future__ import annotations

import importlib
import json
import re
from collections import Counter, OrderedDict

import pytest
import torch
from conftest import shared_model_path, tiny_loaded

import melbo
import melbo.embed
from melbo.capability import Task, run_capability
from melbo.core.errors import MelboError
from melbo.core.models import load_model
from melbo.embed import embed
from melbo.eval.judge import LABELS, judge
from melbo.eval.labels import HIT, ORDER, coherent, count_labels, counts_text
from melbo.quality import is_coherent, token_logprobs

demo = importlib.import_module("melbo.cli.demo")  # melbo.cli.demo is also the click command

PROMPT = "Once upon a time, there was a little girl named Lily."
HELD = "One day, a boy named Tom went to the park."


@pytest.fixture(scope="module")
def story_run(tmp_path_factory):
    """A small run of stories260k (real text: the labels vary) with the cheap controls."""
    lm = load_model(str(shared_model_path("stories260k")))
    out = tmp_path_factory.mktemp("judged") / "run"
    bank = melbo.train(
        lm,
        PROMPT,
        out=out,
        num_vectors=4,
        steps=30,
        radius="0.06x",
        heldout=[HELD],
        generation=melbo.GenerationConfig(max_new_tokens=24),
        controls="cheap",
        show_progress=False,
    )
    rows = [json.loads(x) for x in (out / "completions.jsonl").read_text(encoding="utf-8").splitlines()]
    return lm, bank, out, rows


def test_completions_carry_the_labels_of_the_judge(story_run):
    lm, _, _, rows = story_run
    base = {r["prompt"]: r["completion"] for r in rows if r["kind"] == "unsteered"}
    steered = [r for r in rows if r["kind"] != "unsteered"]
    assert len(steered) == 2 * 4 * 2 and all("label" not in r for r in rows if r["kind"] == "unsteered")
    direct = judge(
        [{"prompt": r["prompt"], "unsteered": base[r["prompt"]], "completion": r["completion"]} for r in steered], lm=lm
    )
    for r, j in zip(steered, direct):
        assert r["label"] == j["label"]
        assert r["scores"] == {**{k: round(j["scores"][k], 4) for k in LABELS}, "reasons": j["scores"]["reasons"]}
        assert r["changed"] == (r["completion"] != base[r["prompt"]])
        assert r["embedding_distance"] == pytest.approx(j["scores"]["distance"], abs=1e-4)
    # the headline comes first after the text; the older flags are kept and mean what they meant
    assert list(steered[0])[:7] == ["kind", "vector", "split", "prompt", "completion", "label", "scores"]
    for r in rows:
        assert r["coherent"] == is_coherent(r["completion"], token_logprobs(lm, r["prompt"], r["completion"]))
    e = embed([steered[0]["completion"], base[steered[0]["prompt"]]])
    assert steered[0]["embedding_distance"] == pytest.approx(float(1 - e[0] @ e[1]), abs=1e-3)


def test_summary_counts_the_labels_of_completions_jsonl(story_run):
    _, bank, out, rows = story_run
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    md = (out / "summary.md").read_text(encoding="utf-8")
    for kind, name in (("learned", "learned"), ("random", "random (same R)")):
        for split in ("train", "heldout"):
            labels = [r["label"] for r in rows if r["kind"] == kind and r["split"] == split]
            counts = {k: labels.count(k) for k in ("new", "degenerate", "unchanged")}
            assert summary[kind][f"labels_{split}"] == counts
        c = summary[kind]["labels_train"]
        assert f"| {name} | 4 | {c['new']} / {c['degenerate']} / {c['unchanged']} |" in md
        assert f"{kind} {counts_text(summary[kind]['labels_heldout'])}" in md
    assert bank.evaluation["labels"]["learned"] == [
        [r["label"] for r in rows if r["kind"] == "learned" and r["vector"] == v] for v in range(4)
    ]


def test_the_controls_hit_is_the_label_new(story_run):
    lm, _, out, rows = story_run
    table = json.loads((out / "summary.json").read_text(encoding="utf-8"))["controls"]
    assert table["predicate"] == HIT
    ctl = [json.loads(x) for x in (out / "controls.jsonl").read_text(encoding="utf-8").splitlines()]
    assert ctl and all(r["hit"] == (r["label"] == "new") for r in ctl)
    by = {r["group"]: r for r in table["rows"]}
    learned = [r["label"] for r in rows if r["kind"] == "learned"]
    assert by["learned"]["hits"] == learned.count("new") and by["learned"]["labels"] == count_labels(learned)
    for name in {r["control"] for r in ctl}:
        mine = [r["label"] for r in ctl if r["control"] == name]
        assert by[name]["labels"] == count_labels(mine) and by[name]["hits"] == mine.count("new")
    # a control's labels are the judge's against the same unsteered completions as completions.jsonl
    base = {r["prompt"]: r["completion"] for r in rows if r["kind"] == "unsteered"}
    direct = judge(
        [{"prompt": r["prompt"], "unsteered": base[r["prompt"]], "completion": r["completion"]} for r in ctl], lm=lm
    )
    assert [r["label"] for r in ctl] == [j["label"] for j in direct]
    assert "judge: new / degenerate / unchanged" in (out / "summary.md").read_text(encoding="utf-8")


def test_report_page_tags_each_completion_and_filters_by_label(story_run):
    _, _, out, rows = story_run
    page = (out / "report.html").read_text(encoding="utf-8")
    select = re.search(r'<select id="label">(.*?)</select>', page, re.S)
    assert select and re.findall(r'<option value="(\w*)">', select.group(1)) == ["", *ORDER]
    assert 'getAttribute("data-label")' in page and 'label.addEventListener("change", update)' in page
    learned = [r["label"] for v in range(4) for r in rows if r["kind"] == "learned" and r["vector"] == v]
    assert re.findall(r'<tr class="completion" data-label="(\w+)">', page) == learned
    tags = Counter(re.findall(r'<span class="tag tag-(\w+)">\1</span> <span class="text">', page))
    assert tags == Counter(learned)  # each learned completion's own tag, in its cell
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must not reach the network"


def test_a_run_embeds_each_text_once(tmp_path, monkeypatch):
    encoded: list[str] = []
    load = melbo.embed._load

    class Counting:
        def __init__(self, model):
            self.model = model

        def encode(self, texts, **kw):
            encoded.extend(texts)
            return self.model.encode(texts, **kw)

    monkeypatch.setattr(melbo.embed, "_memo", OrderedDict())
    monkeypatch.setattr(melbo.embed, "_load", lambda path: Counting(load(path)))
    try:
        melbo.embed.embedder_path()
    except MelboError as e:
        pytest.skip(f"no sentence-embedding model: {e}")
    bank = melbo.train(
        tiny_loaded("llama"),
        "Hello there, world!",
        out=tmp_path / "run",
        num_vectors=2,
        steps=3,
        radius="2",
        heldout=["A dog."],
        generation=melbo.GenerationConfig(max_new_tokens=6),
        controls="cheap",
        show_progress=False,
    )
    assert encoded and bank.evaluation["judge"]["distance"] == "embedding" and bank.evaluation["controls"]
    assert max(Counter(encoded).values()) == 1, "a text was embedded twice in one run"


class _Fake:
    """An embedding model that records what it encodes: one-hot rows by first character."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, texts, **kw):
        self.calls.append(list(texts))
        out = torch.zeros(len(texts), 128)
        for i, t in enumerate(texts):
            out[i, ord(t[0]) % 128] = 1
        return out


def test_embeddings_are_kept_per_model_and_text(monkeypatch):
    fake = _Fake()
    monkeypatch.setattr(melbo.embed, "_memo", OrderedDict())
    monkeypatch.setattr(melbo.embed, "_load", lambda path: fake)
    first = embed(["abc", "b", "abc", " "], "fake-a")
    assert fake.calls == [["abc", "b", "∅"]] and first.shape == (4, 128)
    assert torch.equal(first[0], first[2])
    again = embed(["b", "c"], "fake-a")
    assert fake.calls[-1] == ["c"] and torch.equal(again[0], first[1])
    embed(["b"], "fake-b")  # another model: its own embeddings
    assert fake.calls[-1] == ["b"]
    monkeypatch.setattr(melbo.embed, "MEMO_TEXTS", 2)
    embed(["x", "y", "z"], "fake-a")
    assert len(melbo.embed._memo) == 2 and list(melbo.embed._memo) == [("fake-a", "y"), ("fake-a", "z")]


def test_label_helpers():
    assert set(ORDER) == set(LABELS)
    assert count_labels(["new", "new", "degenerate", "backdoor:cheese"]) == {"new": 2, "degenerate": 1, "unchanged": 0}
    assert counts_text({"new": 2, "degenerate": 1, "unchanged": 0}) == "new 2, degenerate 1, unchanged 0 of 3"
    with pytest.raises(MelboError, match="needs the judge's log-probability features"):
        coherent({"chars": 3.0, "word_repeated_3": 0.0})


def test_capability_report_counts_the_judges_labels(tmp_path):
    rep = run_capability(
        tiny_loaded("llama"), Task(), num_test=3, max_new_tokens=4, out=tmp_path / "cap", num_vectors=2, steps=2
    )
    for kind in ("learned", "random"):
        assert sum(rep["judge_labels"][kind].values()) == 2 * 3  # every test completion, labelled once
    md = (tmp_path / "cap" / "capability.md").read_text(encoding="utf-8")
    jl = rep["judge_labels"]
    assert f"learned {counts_text(jl['learned'])}; random {counts_text(jl['random'])}" in md


def test_demo_prints_the_label_of_each_completion(tmp_path, monkeypatch):
    path = str(shared_model_path("stories260k"))
    monkeypatch.setattr(demo, "demo_subject", lambda echo: (path, demo.DEMO_PROMPT))
    lines: list[str] = []
    bank = demo.real_model_demo(str(tmp_path / "real"), "cpu", lines.append, num_vectors=2, steps=5)
    labels = bank.evaluation["labels"]
    for kind, name in (("learned", "vector"), ("random", "random")):
        for v in range(2):
            line = next(x for x in lines if x.startswith(f"   {name} {v} "))
            assert f"[{labels[kind][v][0]}]" in line
