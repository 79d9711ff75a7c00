"""Tests of melbo.sweep and `melbo sweep`: the grid, a 12-setting sweep on stories260k in-process and
under a local Ray with one worker killed midway (same table), resuming, bad input."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from conftest import char_tokenizer, shared_model_path, tiny_model

from melbo.cli import main
from melbo.core.errors import MelboError
from melbo.sweep import ROW, label, method_settings, parse_grid, read_grid, run_sweep, sweep_markdown

GRID = "radius=0.1x,0.2x,0.4x,source-layer=1,2,method=melbo,dct"
BASE = {"num_vectors": 3, "steps": 40}


def same_table(rows: list[dict]) -> list[dict]:
    """The rows without what differs between runs of the same setting (time, worker)."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "pid")} for r in rows]


def test_grid_is_the_cartesian_product_with_prompt_sets():
    grid = parse_grid("prompts=Once upon a time|The cat,A dog,radius=0.1x,0.2x,method=melbo,dct")
    assert len(grid) == 8
    assert grid[0] == {"prompts": ["Once upon a time", "The cat"], "radius": "0.1x", "method": "melbo"}
    assert grid[-1] == {"prompts": ["A dog"], "radius": "0.2x", "method": "dct"}
    assert len(parse_grid(GRID)) == 12 and parse_grid(GRID)[1] == {"radius": "0.1x", "source_layer": 1, "method": "dct"}
    method, used, unused = method_settings({"method": "dct", "radius": "1x"}, BASE)
    assert method == "dct" and used == {"num_vectors": 3, "radius": "1x"} and unused == ["steps"]
    for bad, message in (
        ("", "empty sweep"),
        ("colour=red", "unknown sweep key 'colour'"),
        ("prompts=a||b", "empty prompt"),
        ("prompts=a,radius=1x,prompts=b", "'prompts' appears twice"),
        ("radius=-1", "radius"),
    ):
        with pytest.raises(MelboError, match=message):
            parse_grid(bad)
    with pytest.raises(MelboError, match="unknown method 'ortho'"):
        method_settings({"method": "ortho"}, {})


def test_local_sweep_resumes_and_refuses_another_grid(tmp_path, capsys):
    model = str(shared_model_path("stories260k"))
    out = tmp_path / "sw"
    rows = run_sweep(model, GRID, out, ["Once upon a time"], BASE, 16, local=True, echo=lambda s: None)
    assert len(rows) == 12 and all("error" not in r for r in rows)
    assert [r["source_layer"] for r in rows[:4]] == [1, 1, 2, 2] and rows[1]["unused"] == ["steps"]
    assert rows[0]["radius"] < rows[4]["radius"] < rows[8]["radius"]
    (out / "05" / ROW).unlink()
    said: list[str] = []
    again = run_sweep(model, GRID, out, ["Once upon a time"], BASE, 16, local=True, echo=said.append)
    assert said[0] == "resuming: 11 of 12 settings already finished" and len(said) == 2 and said[1].startswith("[05]")
    assert same_table(again) == same_table(rows)
    with pytest.raises(MelboError, match="holds a sweep of another grid"):
        run_sweep(model, "radius=1x", out, ["Once upon a time"], BASE, 16, local=True)
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--model", model, "--grid", "radius=0.1x", "--out", str(tmp_path / "x"), "--local"])
    assert e.value.code == 2 and "no prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--model", model, "--grid", "method=ortho", "--prompt", "a", "--out", str(tmp_path / "y")])
    assert e.value.code == 2 and "bad value 'ortho' for sweep key 'method'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    local = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
    assert same_table(local) == same_table(rows)
    # the behavior judge's counts of each setting are those of its completions.jsonl
    comp = [json.loads(x) for x in (out / "00" / "run" / "completions.jsonl").read_text(encoding="utf-8").splitlines()]
    for kind in ("learned", "random"):
        labels = [r["label"] for r in comp if r["kind"] == kind and r["split"] == "train"]
        assert rows[0][kind]["labels"] == {k: labels.count(k) for k in ("new", "degenerate", "unchanged")}
    table = (out / "sweep.md").read_text(encoding="utf-8")
    assert "| learned new | learned degenerate |" in table
    new, deg = rows[0]["learned"]["labels"]["new"], rows[0]["learned"]["labels"]["degenerate"]
    assert f"| {new}/3 | {deg}/3 | {rows[0]['learned']['changed']} |" in table


def test_ray_sweep_survives_a_killed_worker_and_matches_in_process(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'melbo[sweep]')")
    model = str(shared_model_path("stories260k"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "ray"
        result: dict = {}
        thread = threading.Thread(
            target=lambda: result.update(rows=run_sweep(model, GRID, out, ["Once upon a time"], BASE, 16)),
            daemon=True,
        )
        thread.start()
        victim, pid_file, killed = "04", out / "04" / "worker.pid", None
        deadline = time.time() + 300
        while killed is None and time.time() < deadline and thread.is_alive():
            if pid_file.is_file() and not (out / victim / ROW).exists():
                text = pid_file.read_text(encoding="utf-8").strip()
                if text:
                    killed = int(text)
                    os.kill(killed, signal.SIGKILL)  # the Ray worker running setting 04, mid-setting
            time.sleep(0.01)
        thread.join(timeout=600)
        assert killed is not None, "setting 04 never started"
        rows = result["rows"]
        assert all("error" not in r for r in rows), rows
        assert rows[4]["pid"] != killed  # setting 04 was finished by the retry, on another worker
    finally:
        ray.shutdown()
    here = run_sweep(model, GRID, tmp_path / "here", ["Once upon a time"], BASE, 16, local=True, echo=lambda s: None)
    assert same_table(rows) == same_table(here)


def test_prompts_with_commas_need_quotes_or_a_grid_file(tmp_path):
    with pytest.raises(MelboError, match=r"ambiguous prompts value .*double quotes"):
        parse_grid("prompts=Hello, world|Once upon,radius=0.1x")  # was silently two prompt sets
    quoted = parse_grid('prompts="Hello, world"|Once upon,radius=0.1x')
    assert quoted == [{"prompts": ["Hello, world", "Once upon"], "radius": "0.1x"}]
    assert label(quoted[0]) == 'prompts="Hello, world"|Once upon radius=0.1x'
    row = sweep_markdown([{"index": 0, "label": label(quoted[0]), "error": "x"}]).splitlines()[-1]
    assert row.startswith('| 0 | prompts="Hello, world"\\|Once upon radius=0.1x | error: x |')  # one cell
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"prompts": [["Hello, world", "Once upon"]], "radius": ["0.1x"]}), encoding="utf-8")
    assert parse_grid(read_grid(path)) == quoted


def test_a_failed_setting_ends_the_sweep_with_exit_2_after_writing_the_others(tmp_path, capsys):
    model = tmp_path / "model"
    tiny_model("llama").save_pretrained(model)
    char_tokenizer().save_pretrained(model)
    grid = tmp_path / "grid.toml"
    grid.write_text("source-layer = [1, 9]\n", encoding="utf-8")  # the model has 4 blocks: 9 fails
    out = tmp_path / "sw"
    argv = ["sweep", "--model", str(model), "--grid-file", str(grid), "--prompt", "Hello there.", "--local"]
    argv += ["--num-vectors", "1", "--steps", "1", "--max-new-tokens", "2", "--out", str(out)]
    for _ in range(2):  # the second run resumes: setting 00 is read back, 01 fails again
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2, err
        assert "error: 1 of 2 sweep settings failed ([01] source_layer=9: source layer 9 is out of range" in err
        rows = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
        assert "error" not in rows[0] and rows[0]["source_layer"] == 1 and "out of range" in rows[1]["error"]
