"""The output rule (melbo.core.outputs): no command destroys a file it did not write.

Each data-loss case lost the user's file with exit code 0 before the rule: `sweep` deleted an
existing OUT/00/, `train` replaced a user's summary.md and report.html, `bench backdoor` replaced
an earlier bench's results, `report`, `export` and `chat --transcript` wrote over the bank they
read, `plant --overwrite` deleted a folder of the user's, `plot` replaced a user's kl.png,
`calibrate --json` replaced a file. Now each stops with exit code 2 before any work, naming the
path and what is allowed; ``--overwrite`` replaces a command's own earlier output, never an input.
"""

from __future__ import annotations

import importlib
import json
import os

import pytest
from conftest import char_tokenizer, save_tiny_planted, tiny_model

from melbo.bank import Bank
from melbo.cli import main
from melbo.core.errors import MelboError
from melbo.core.outputs import MARKER, check_output_file, claim_folder, folder_owner
from melbo.planted.plant import plant
from melbo.planted.spec import load_spec

TRAIN = ["--prompt", "Hello there.", "--num-vectors", "2", "--steps", "2", "--radius", "2", "--max-new-tokens", "4"]


def run(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return int(e.value.code or 0), capsys.readouterr().err


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {
        os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(folder)
        for f in files
    }


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tiny_model("llama").save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def run_dir(model, tmp_path_factory):
    """A finished run folder (bank, summary, report) made by `melbo train`."""
    out = tmp_path_factory.mktemp("runs") / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", str(model), *TRAIN, "--out", str(out)])
    assert e.value.code in (0, None)
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A random model of a planted model's shape, saved like `melbo plant` saves one."""
    return save_tiny_planted(tmp_path_factory.mktemp("planted"))


def user_folder(tmp_path, *names: str):
    """A folder of the user's holding ``names`` (files; a/b makes the subfolder a)."""
    d = tmp_path / "mine"
    for name in names:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(f"the user's {name}\n", encoding="utf-8")
    return d


# ------------------------------------------------------------------- the data-loss cases


def test_sweep_leaves_a_users_numbered_folder_alone(model, tmp_path, capsys):
    d = user_folder(tmp_path, "00/notes.txt", "plan.md")
    before = snapshot(d)
    argv = ["sweep", "--model", model, "--grid", "radius=2", "--prompt", "Hi", "--num-vectors", "1", "--steps", "1"]
    code, err = run([*argv, "--max-new-tokens", "2", "--local", "--out", d], capsys)
    assert code == 2 and "holds no earlier `melbo sweep` output" in err and "choose another --out" in err, err
    assert snapshot(d) == before


def test_sweep_restarts_only_numbered_folders_it_wrote(model, tmp_path):
    """Inside its own sweep folder, a setting's folder without the sweep's worker.pid is not deleted."""
    from melbo.sweep import run_sweep

    out = tmp_path / "sw"
    claim_folder(out, "sweep").prepare()
    (out / "00").mkdir()
    (out / "00" / "notes.txt").write_text("keep", encoding="utf-8")
    rows = run_sweep(str(model), "radius=2", out, ["Hi"], {"num_vectors": 1, "steps": 1}, 2, local=True, echo=str)
    assert "was not written by this sweep" in rows[0]["error"]
    assert (out / "00" / "notes.txt").read_text(encoding="utf-8") == "keep"


def test_train_keeps_a_users_summary_and_report(model, tmp_path, capsys):
    d = user_folder(tmp_path, "summary.md", "report.html")
    before = snapshot(d)
    code, err = run(["train", "--model", model, *TRAIN, "--out", d], capsys)
    assert code == 2 and "holds no earlier `melbo train` output" in err and "'report.html'" in err, err
    assert snapshot(d) == before
    code, err = run(["train", "--model", model, *TRAIN, "--out", d, "--overwrite"], capsys)
    assert code == 2 and "holds no earlier `melbo train` output" in err  # --overwrite replaces only melbo's own
    assert snapshot(d) == before


def test_bench_backdoor_keeps_an_earlier_bench_unless_overwrite(planted, tmp_path, capsys):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "bench.json").write_text('{"recall": 0.5}\n', encoding="utf-8")  # an earlier bench's results
    (out / "bench.md").write_text("# earlier\n", encoding="utf-8")
    (out / "notes.txt").write_text("the user's notes\n", encoding="utf-8")
    before = snapshot(out)
    argv = ["bench", "backdoor", "--model", planted, "--method", "melbo", "--num-vectors", "1", "--steps", "1"]
    argv += ["--max-new-tokens", "3", "--generalization", "1", "--out", out]
    code, err = run(argv, capsys)
    assert code == 2 and "holds an earlier `melbo bench backdoor` output; pass --overwrite" in err, err
    assert snapshot(out) == before
    code, err = run([*argv, "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((out / "bench.json").read_text(encoding="utf-8"))["benchmark"] == "backdoor"
    assert (out / "notes.txt").read_text(encoding="utf-8") == "the user's notes\n"  # not the bench's: kept
    assert folder_owner(out) == "bench backdoor" and (out / MARKER).is_file()


@pytest.mark.parametrize(
    "argv",
    [
        ["report", "{run}", "--out", "{bank}"],
        ["report", "{run}", "--out", "{bank}", "--overwrite"],
        ["export", "vector", "--bank", "{run}", "--vector", "0", "--out", "{bank}"],
        ["export", "vector", "--bank", "{run}", "--vector", "0", "--out", "{bank}", "--overwrite"],
        ["export", "vector", "--bank", "{bank}", "--vector", "0", "--out", "{link}", "--overwrite"],
        ["chat", "--bank", "{run}", "--transcript", "{bank}", "--device", "cpu"],
        ["chat", "--bank", "{run}", "--transcript", "{bank}", "--overwrite", "--device", "cpu"],
        ["detect", "--bank", "{run}", "--prompt", "Hi", "--reference-file", "{ref}", "--out", "{ref}", "--overwrite"],
    ],
    ids=lambda a: "-".join(x for x in a if not x.startswith("{"))[:60],
)
def test_no_command_writes_over_its_own_input(run_dir, tmp_path, capsys, argv):
    bank = run_dir / "bank.safetensors"
    link = tmp_path / "link.safetensors"
    link.symlink_to(bank)
    ref = tmp_path / "ref.txt"
    ref.write_text("A cat.\nA dog.\nA bird.\n", encoding="utf-8")
    before, ref_before = bank.read_bytes(), ref.read_bytes()
    values = {"run": run_dir, "bank": bank, "link": link, "ref": ref}
    code, err = run([a.format(**values) for a in argv], capsys)
    assert code == 2 and "never writes over its own input" in err, err
    assert bank.read_bytes() == before and ref.read_bytes() == ref_before
    Bank.load(run_dir)  # still a whole bank


def test_plant_overwrite_never_deletes_a_users_folder(tmp_path):
    d = user_folder(tmp_path, "thesis.tex", "data/results.csv")
    before = snapshot(d)
    with pytest.raises(MelboError, match=r"holds no earlier `melbo plant` output \(it holds 'data', 'thesis.tex'\)"):
        plant(load_spec(None), d, steps=1, progress=False, overwrite=True)
    assert snapshot(d) == before


def test_plant_overwrite_of_its_own_folder_refuses_a_users_file_in_it(tmp_path):
    d = user_folder(tmp_path, "README.md")
    (d / "plant_spec.json").write_text("{}", encoding="utf-8")
    (d / "plant_report.json").write_text("{}", encoding="utf-8")
    before = snapshot(d)
    with pytest.raises(MelboError, match=r"holds 'README.md', which `melbo plant` did not write"):
        plant(load_spec(None), d, steps=1, progress=False, overwrite=True)
    assert snapshot(d) == before


def test_plot_keeps_a_users_plots(run_dir, tmp_path, capsys):
    d = user_folder(tmp_path, "kl.png", "norms.png")
    before = snapshot(d)
    code, err = run(["plot", "--bank", run_dir, "--prompt", "Hi", "--out", d], capsys)
    assert code == 2 and "holds no earlier `melbo plot` output" in err, err
    assert snapshot(d) == before


@pytest.mark.parametrize(
    "argv, what",
    [
        (["bench", "capability", "--model", "{model}", "--out", "{out}"], "capability.json"),
        (["bench", "detect", "--model", "{planted}", "--out", "{out}"], "detect.json"),
    ],
    ids=["capability", "detect"],
)
def test_other_benches_keep_earlier_results(model, planted, tmp_path, capsys, argv, what):
    out = user_folder(tmp_path, what)
    before = snapshot(out)
    code, err = run([a.format(model=model, planted=planted, out=out) for a in argv], capsys)
    assert code == 2 and "pass --overwrite to replace it" in err, err
    assert snapshot(out) == before


def test_calibrate_json_keeps_an_existing_file(model, tmp_path, capsys):
    mine = tmp_path / "calib.json"
    mine.write_text('{"mine": true}\n', encoding="utf-8")
    code, err = run(["calibrate", "--model", model, "--prompt", "Hello there.", "--json", mine], capsys)
    assert code == 2 and "already exists; pass --overwrite" in err, err
    assert mine.read_text(encoding="utf-8") == '{"mine": true}\n'


def test_demo_refuses_a_users_folder(tmp_path, capsys):
    d = user_folder(tmp_path, "real/notes.txt")
    before = snapshot(d)
    code, err = run(["demo", "--out", d, "--part", "real"], capsys)
    assert code == 2 and "holds no earlier `melbo demo` output" in err, err
    assert snapshot(d) == before


# ------------------------------------------------------------------- --overwrite and --resume


def test_train_overwrite_starts_its_own_run_over_and_keeps_other_files(model, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", "--model", model, *TRAIN, "--out", out], capsys)[0] == 0
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    old = Bank.load(out).meta["prompts"]
    code, err = run(["train", "--model", model, *TRAIN, "--out", out], capsys)
    assert code == 2 and "already holds a run; pass --resume to continue it, --overwrite to start it over" in err
    code, err = run(["train", "--model", model, *TRAIN, "--prompt", "Bye now.", "--out", out, "--overwrite"], capsys)
    assert code == 0, err
    assert Bank.load(out).meta["prompts"] != old and (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    code, err = run(["train", "--model", model, *TRAIN, "--out", out, "--overwrite", "--resume"], capsys)
    assert code == 2 and "give one of them" in err


def test_resume_continues_a_run_folder_of_the_earlier_version(model, tmp_path, capsys):
    """A run folder without the marker (bank.safetensors + summary.json) is still the run's own."""
    out = tmp_path / "run"
    assert run(["train", "--model", model, *TRAIN, "--out", out], capsys)[0] == 0
    (out / MARKER).unlink()
    assert folder_owner(out) == "train"
    code, err = run(["train", "--model", model, *TRAIN, "--num-vectors", "3", "--out", out, "--resume"], capsys)
    assert code == 0, err
    assert len(Bank.load(out)) == 3 and json.loads((out / MARKER).read_text(encoding="utf-8"))["command"] == "train"


def test_single_file_outputs_need_overwrite(run_dir, tmp_path, capsys):
    page = tmp_path / "page.html"
    page.write_text("my page", encoding="utf-8")
    code, err = run(["report", run_dir, "--out", page], capsys)
    assert code == 2 and "already exists; pass --overwrite" in err and page.read_text(encoding="utf-8") == "my page"
    assert run(["report", run_dir, "--out", page, "--overwrite"], capsys)[0] == 0
    assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert run(["report", run_dir], capsys)[0] == 0  # the run's own report.html is rewritten
    for kind, name, extra in (("gguf", "v.gguf", ["--vectors", "0"]), ("vector", "v.safetensors", ["--vector", "0"])):
        f = tmp_path / name
        f.write_bytes(b"mine")
        argv = ["export", kind, "--bank", run_dir, *extra, "--out", f]
        code, err = run(argv, capsys)
        assert code == 2 and "already exists; pass --overwrite" in err and f.read_bytes() == b"mine"
        assert run([*argv, "--overwrite"], capsys)[0] == 0 and f.read_bytes() != b"mine"


def test_detect_out_needs_overwrite(run_dir, tmp_path, capsys):
    ref = tmp_path / "ref.txt"
    ref.write_text("A cat.\nA dog.\nA bird.\nThe sun.\n", encoding="utf-8")
    scores = tmp_path / "scores.jsonl"
    scores.write_text("mine\n", encoding="utf-8")
    argv = ["detect", "--bank", run_dir, "--prompt", "Hi", "--reference-file", ref, "--out", scores]
    code, err = run(argv, capsys)
    assert code == 2 and "already exists; pass --overwrite" in err and scores.read_text(encoding="utf-8") == "mine\n"
    code, err = run([*argv, "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads(scores.read_text(encoding="utf-8").splitlines()[0])["prompt"] == "Hi"


# ------------------------------------------------------------------- the helper itself


def test_claim_folder_states(tmp_path):
    assert claim_folder(tmp_path / "new", "train").state == "new"
    (tmp_path / "empty").mkdir()
    assert claim_folder(tmp_path / "empty", "train").state == "new"
    claim_folder(tmp_path / "p", "plot").prepare()
    assert claim_folder(tmp_path / "p", "bench detect").state == "new"  # nothing in it but the marker
    (tmp_path / "p" / "kl.png").write_bytes(b"png")
    assert claim_folder(tmp_path / "p", "plot").state == "own"  # plots update their own folder
    with pytest.raises(MelboError, match="holds an output of `melbo plot`"):
        claim_folder(tmp_path / "p", "bench detect")
    run_folder = tmp_path / "r"
    claim_folder(run_folder, "train").prepare()
    (run_folder / "bank.safetensors").write_bytes(b"x")
    assert claim_folder(run_folder, "plot", into_melbo=True).state == "melbo"  # plots added to a run
    with pytest.raises(MelboError, match="is a file, not a folder"):
        claim_folder(run_folder / "bank.safetensors", "train")


def test_inputs_are_found_through_links(tmp_path):
    src = tmp_path / "prompts.txt"
    src.write_text("Hi\n", encoding="utf-8")
    hard = tmp_path / "hard.txt"
    os.link(src, hard)
    with pytest.raises(MelboError, match="never writes over its own input"):
        check_output_file(hard, inputs=[("the prompts file", src)], overwrite=True)
    out = tmp_path / "run"
    out.mkdir()
    os.link(src, out / "summary.md")  # a run folder whose summary.md is the prompts file
    (out / "bank.safetensors").write_bytes(b"x")
    with pytest.raises(MelboError, match="never writes over its own input"):
        claim_folder(out, "train", inputs=[("the prompts file", src)], overwrite=True)
    model = out / "model"
    model.mkdir()
    (model / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(MelboError, match="never writes over its own input"):
        check_output_file(model / "config.json", inputs=[("the model", model)], overwrite=True)
    assert claim_folder(out, "train", inputs=[("the model", model)], overwrite=True).own  # model/ is not a run file


def test_demo_rerun_replaces_its_own_results(model, tmp_path, capsys, monkeypatch):
    """`melbo demo` twice into the same folder: the second run replaces the first's run folder."""
    demo_module = importlib.import_module("melbo.cli.demo")  # the module, not the `demo` command
    monkeypatch.setattr(demo_module, "demo_subject", lambda echo: (str(model), "Hello there."))
    monkeypatch.setitem(demo_module.DEMO_SWEEP, "grid", (0.5, 1.0))
    monkeypatch.setitem(demo_module.DEMO_SWEEP, "max_new_tokens", 4)
    out = tmp_path / "demo"
    for _ in range(2):
        code, err = run(["demo", "--out", out, "--part", "real"], capsys)
        assert code == 0, err
    assert folder_owner(out) == "demo" and folder_owner(out / "real") == "train"
    assert Bank.load(out / "real").meta["complete"]
