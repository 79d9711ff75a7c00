"""``report.html`` (melbo.report.html): a card per evaluated perturbation with its completions
beside the unsteered and random ones, KL and clusters; self-contained (no network); bad folders
get clear errors; the clustering on known distances."""

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_run

from melbo.cli import cli, main
from melbo.core.errors import MelboError
from melbo.report.html import clusters, markdown_html, report_data, write_html_report

PROMPT = "Hello there, world!"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    tiny_run(out, PROMPT, num_vectors=3)
    return out


def test_every_run_writes_a_self_contained_report(run_dir):
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert page.count('<div class="card"') == 3
    assert [int(i) for i in re.findall(r'data-index="(\d+)"', page)] == [0, 1, 2]
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must not reach the network"
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert len(summary["kl_to_unsteered"]) == 3 and len(summary["kl_random_to_unsteered"]) == 3
    data = report_data(run_dir)
    card = data["cards"][1]
    assert card["kl"] == pytest.approx(summary["kl_to_unsteered"][1])
    assert {r["split"] for r in card["rows"]} == {"train", "heldout"}
    rows = [json.loads(x) for x in (run_dir / "completions.jsonl").read_text(encoding="utf-8").splitlines()]
    steered = next(r for r in rows if r["kind"] == "learned" and r["vector"] == 1 and r["prompt"] == PROMPT)
    assert card["rows"][0]["steered"] == steered["completion"]
    assert 0 <= card["generalization"] <= 1


def test_cli_report_rewrites_to_another_file(run_dir, tmp_path):
    out = tmp_path / "page.html"
    r = CliRunner().invoke(cli, ["report", str(run_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_text(encoding="utf-8") == (run_dir / "report.html").read_text(encoding="utf-8")


def test_bad_folders(tmp_path, capsys):
    with pytest.raises(MelboError, match="is not a folder"):
        write_html_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MelboError, match=r"holds no bank.safetensors \(nor bench.md\)"):
        write_html_report(tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "empty")])
    assert e.value.code == 2 and "holds no bank.safetensors" in capsys.readouterr().err


def test_benchmark_folder_shows_its_tables(tmp_path):
    (tmp_path / "bench.md").write_text("# Recall\n\n| method | hits |\n|---|---|\n| learned | 3 |\n", encoding="utf-8")
    page = write_html_report(tmp_path).read_text(encoding="utf-8")
    assert "<th>method</th>" in page and "<td>3</td>" in page


def test_clusters_cut_at_the_threshold():
    d = np.array([[0, 0.1, 0.9, 0.9], [0.1, 0, 0.9, 0.9], [0.9, 0.9, 0, 0.05], [0.9, 0.9, 0.05, 0]])
    assert clusters(d, 0.25) == [0, 0, 1, 1]
    assert clusters(d, 0.01) == [0, 1, 2, 3]
    assert clusters(d, 0.95) == [0, 0, 0, 0]


def test_markdown_escapes_html():
    assert markdown_html("a <b>`x`</b>") == "<p>a &lt;b&gt;<code>x</code>&lt;/b&gt;</p>"


def test_a_named_embedder_that_fails_is_an_error(run_dir, tmp_path, monkeypatch):
    """MELBO_EMBEDDER names the model: when it cannot be loaded the report stops with an error
    naming it, and writes nothing (no silent fallback to character similarity)."""
    broken = tmp_path / "broken-embedder"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    monkeypatch.setenv("MELBO_EMBEDDER", str(broken))
    out = tmp_path / "page.html"
    with pytest.raises(MelboError, match=r"MELBO_EMBEDDER=.*broken-embedder"):
        write_html_report(run_dir, out)
    assert not out.exists()


def test_no_embedder_installed_nor_named_falls_back(run_dir, tmp_path, monkeypatch):
    import sys

    monkeypatch.delenv("MELBO_EMBEDDER", raising=False)
    monkeypatch.setitem(sys.modules, "all_minilm_l6_v2", None)  # the offline package: not installed
    page = write_html_report(run_dir, tmp_path / "page.html").read_text(encoding="utf-8")
    assert "character similarity (no sentence-embedding model installed)" in page
