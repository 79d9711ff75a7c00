"""A catalog of bad inputs: every subcommand and the library, every file melbo reads.

Each case must end with exit code 2 and a one-line ``error: ...`` (or click's usage error) that
matches its pattern (the bad value named, and what is allowed), with no traceback, and nothing
written where the command would have written.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import CUSTOM_CODE_AUTO_MAP, char_tokenizer, plant_custom_code, tiny_model
from safetensors.torch import save_file

from melbo.bank import Bank
from melbo.cli import cli, main
from melbo.core.io import save_tensors
from melbo.core.peft import save_peft_adapter
from melbo.planted.spec import load_spec, parse_spec, spec_to_dict
from melbo.planted.tokenizer import build_char_tokenizer
from melbo.planted.training import build_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every file the cases refer to, by name."""
    root = tmp_path_factory.mktemp("bad")
    f = {"root": str(root)}
    model = root / "model"
    tiny_model("llama").save_pretrained(model)
    char_tokenizer().save_pretrained(model)
    f["model"] = str(model)
    other = root / "other"
    tiny_model("gpt2").save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    f["other"] = str(other)
    pickle = root / "pickle"
    pickle.mkdir()
    (pickle / "config.json").write_text("{}")
    (pickle / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    f["pickle"] = str(pickle)
    (root / "bad.gguf").write_bytes(b"GGUF not really")
    f["badgguf"] = str(root / "bad.gguf")
    run = root / "run"
    assert (
        _run(
            [
                "train",
                "--model",
                f["model"],
                "--prompt",
                "Hello there.",
                "--num-vectors",
                "2",
                "--steps",
                "2",
                "--radius",
                "2",
                "--max-new-tokens",
                "4",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    f["bank"] = str(run)
    bank = Bank.load(run)
    adapters = root / "adapters"
    assert (
        _run(
            [
                "train",
                "--method",
                "adapter",
                "--model",
                f["model"],
                "--prompt",
                "Hello there.",
                "--num-vectors",
                "2",
                "--steps",
                "2",
                "--max-new-tokens",
                "4",
                "--radius",
                "0.01x",
                "--out",
                str(adapters),
            ]
        )
        == 0
    )
    f["adapters"] = str(adapters)
    norank = shutil.copytree(
        adapters / "peft" / "adapter_000", root / "adapter-norank"
    )  # adapter_config.json without r
    cfg = json.loads((norank / "adapter_config.json").read_text())
    del cfg["r"]
    (norank / "adapter_config.json").write_text(json.dumps(cfg))
    f["adapter_norank"] = str(norank)
    data = (run / "bank.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    f["truncated"] = str(root / "truncated.safetensors")
    (root / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    f["corrupt"] = str(root / "corrupt.safetensors")
    save_file({"vectors": torch.zeros(2, 32)}, str(root / "listmeta.safetensors"), metadata={"melbo": "[1, 2]"})
    f["listmeta"] = str(root / "listmeta.safetensors")
    save_file({"vectors": torch.zeros(2, 32)}, str(root / "badjson.safetensors"), metadata={"melbo": "{oops"})
    f["badjson"] = str(root / "badjson.safetensors")
    save_tensors(root / "onedim.safetensors", {"vectors": torch.ones(32)}, {}, "melbo.bank/1")
    f["onedim"] = str(root / "onedim.safetensors")
    save_file(
        {"vectors": torch.full((2, 32), float("inf"))},
        str(root / "inf.safetensors"),
        metadata={"melbo": json.dumps({"format": "melbo.bank/1"})},
    )
    f["inf"] = str(root / "inf.safetensors")
    save_file({"x": torch.zeros(2)}, str(root / "plain.safetensors"))
    f["plain"] = str(root / "plain.safetensors")
    save_tensors(root / "otherformat.safetensors", {"vectors": torch.zeros(2, 32)}, {}, "melbo.adapters/9")
    f["otherformat"] = str(root / "otherformat.safetensors")
    meta = {**bank.meta, "vectors": []}
    Bank({"vectors": torch.zeros(2, 32)}, meta).save(root / "zero.safetensors")
    f["zero"] = str(root / "zero.safetensors")
    Bank({"vectors": torch.ones(2, 32)}, {**meta, "random_vectors": None}).save(root / "norandom.safetensors")
    f["norandom"] = str(root / "norandom.safetensors")
    Bank({"vectors": torch.ones(2, 16)}, {k: v for k, v in meta.items() if k != "hidden_size"}).save(
        root / "narrow.safetensors"
    )
    f["narrow"] = str(root / "narrow.safetensors")
    Bank({"vectors": torch.ones(2, 32)}, {**meta, "model_type": "gpt2"}).save(root / "gpt2bank.safetensors")
    f["gpt2bank"] = str(root / "gpt2bank.safetensors")
    (root / "empty").mkdir()
    f["empty"] = str(root / "empty")
    (root / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    f["latin1"] = str(root / "latin1.txt")
    (root / "blank.txt").write_text("\n   \n")
    f["blank"] = str(root / "blank.txt")
    (root / "afile").write_text("I am a file")
    f["afile"] = str(root / "afile")
    ro = root / "readonly"
    ro.mkdir()
    os.chmod(ro, stat.S_IRUSR | stat.S_IXUSR)
    f["readonly"] = str(ro) if _make_read_only_for_root(ro) else ""
    (root / "spec-latin1.json").write_bytes('{"name": "é"}'.encode("latin-1"))
    f["speclatin1"] = str(root / "spec-latin1.json")
    (root / "spec-bad.json").write_text('{"name": "x",}')
    f["specbad"] = str(root / "spec-bad.json")
    (root / "spec-unknown.json").write_text(json.dumps({"name": "x", "colour": 1, "backdoors": []}))
    f["specunknown"] = str(root / "spec-unknown.json")
    (root / "spec-list.json").write_text("[1, 2]")
    f["speclist"] = str(root / "spec-list.json")
    planted = root / "planted"
    obj = spec_to_dict(load_spec(None))
    obj["model"] = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}
    spec = parse_spec(obj, "tiny")
    torch.manual_seed(0)
    tok = build_char_tokenizer()
    build_model(spec, tok, max_positions=128).save_pretrained(planted)
    tok.save_pretrained(planted)
    (planted / "plant_spec.json").write_text(json.dumps(spec_to_dict(spec)))
    f["planted"] = str(planted)
    story = dict(spec_to_dict(load_spec("story")))
    (root / "story-spec.json").write_text(json.dumps(story))
    f["storyspec"] = str(root / "story-spec.json")
    nonempty = root / "nonempty"
    nonempty.mkdir()
    (nonempty / "x").write_text("x")
    f["nonempty"] = str(nonempty)
    mine = root / "mine"  # a folder of the user's, with names melbo writes (the output rule keeps it)
    (mine / "00").mkdir(parents=True)
    for name in ("summary.md", "report.html", "kl.png", "00/notes.txt"):
        (mine / name).write_text("the user's", encoding="utf-8")
    f["mine"] = str(mine)
    for kind, name in (("bench", "bench.json"), ("capability", "capability.json"), ("detect", "detect.json")):
        (root / f"old-{kind}").mkdir()  # an earlier benchmark's results
        (root / f"old-{kind}" / name).write_text("{}", encoding="utf-8")
        f[f"old{kind}"] = str(root / f"old-{kind}")
    # broken model folders (an interrupted download, garbage) and run folders with wrong-type JSON
    for name, file, cut in (
        ("cutweights", "model.safetensors", "half"),
        ("garbageweights", "model.safetensors", b"\x93NUMPY garbage"),
        ("configlist", "config.json", b"[1, 2]"),
        ("tokconfiglist", "tokenizer_config.json", b"[1]"),
    ):
        broken = root / name
        tiny_model("llama").save_pretrained(broken)
        char_tokenizer().save_pretrained(broken)
        data = (broken / file).read_bytes()
        (broken / file).write_bytes(data[: len(data) // 2] if cut == "half" else cut)
        f[name] = str(broken)
    for name, file, text in (
        ("reportsummary", "summary.json", "[1, 2]"),
        ("reportrows", "completions.jsonl", "[1, 2]"),
    ):
        (root / name).mkdir()
        for p in run.iterdir():
            if p.is_file():
                (root / name / p.name).write_bytes(p.read_bytes())
        (root / name / file).write_text(text)
        f[name] = str(root / name)
    # silent wrong results and tracebacks: empty banks, a [2, 16] "vector", a bank of the GPT-2 model
    # (learned positions: 128), prompts past the positions a model reads, a bank whose R is not a number
    Bank({"vectors": torch.zeros(0, 32), "random_vectors": torch.zeros(0, 32)}, meta).save(
        root / "emptybank.safetensors"
    )
    f["emptybank"] = str(root / "emptybank.safetensors")
    for name, edit in (("emptyrun", {"vectors": torch.zeros(0, 32)}), ("radiusrun", None)):
        (root / name).mkdir()
        for p in run.iterdir():
            if p.is_file() and p.name != "bank.safetensors":
                (root / name / p.name).write_bytes(p.read_bytes())
        if edit is not None:
            Bank(edit, meta).save(root / name / "bank.safetensors")
        else:
            save_tensors(root / name / "bank.safetensors", bank.tensors, {**bank.meta, "radius": "big"}, "melbo.bank/1")
        f[name] = str(root / name)
    save_tensors(root / "v2x16.safetensors", {"vector": torch.ones(2, 16)}, {"layer": 1}, "melbo.vector/1")
    f["v2x16"] = str(root / "v2x16.safetensors")
    gptrun = root / "gptrun"
    assert (
        _run(
            ["train", "--model", f["other"], "--prompt", "Hello.", "--num-vectors", "2", "--steps", "1"]
            + ["--radius", "2", "--max-new-tokens", "2", "--out", str(gptrun)]
        )
        == 0
    )
    f["gptbank"] = str(gptrun)
    (root / "long.txt").write_text("a" * 300 + "\n")
    f["long"] = str(root / "long.txt")
    (root / "clean.txt").write_text("Hello there.\nHow are you?\nThe cat sat.\n")
    f["clean"] = str(root / "clean.txt")
    story = {**spec_to_dict(load_spec("story")), "base_model": f["other"]}
    story["story"] = {**story["story"], "n_prompts": 20, "continuation_tokens": 200}
    (root / "story-gpt2.json").write_text(json.dumps(story))
    f["storygpt2"] = str(root / "story-gpt2.json")
    (root / "rows.jsonl").write_text(json.dumps({"prompt": "Hi", "unsteered": "there", "completion": "you"}) + "\n")
    f["judgerows"] = str(root / "rows.jsonl")
    for name, text in (
        ("gridjson", json.dumps({"prompts": [["Hello, world", "Hi"]], "radius": ["2"]})),
        ("gridflat", json.dumps({"prompts": ["Hello, world", "Hi"]})),
        ("gridscalar", json.dumps({"radius": "2"})),
        ("gridunknown", json.dumps({"colour": [1]})),
        ("gridbadtoml", "radius = ["),
    ):
        path = root / ("grid-bad.toml" if name == "gridbadtoml" else f"{name}.json")
        path.write_text(text)
        f[name] = str(path)
    # model folders that need custom code (class a): evil.py writes the sentinel when imported
    f["sentinel"] = str(root / "SENTINEL")
    code = {"model_type": "evilmodel", "auto_map": CUSTOM_CODE_AUTO_MAP}
    for name, source in (("evil", model), ("evilplanted", planted)):
        shutil.copytree(source, root / name)
        plant_custom_code(root / name, root / "SENTINEL", code)
        f[name] = str(root / name)
    evilrun = root / "evilrun"  # a run recorded against the evil folder
    evilrun.mkdir()
    for p in run.iterdir():
        if p.is_file() and p.name != "bank.safetensors":
            (evilrun / p.name).write_bytes(p.read_bytes())
    Bank(bank.tensors, {**bank.meta, "model": f["evil"]}).save(evilrun / "bank.safetensors")
    f["evilbank"] = str(evilrun)
    a, b = torch.randn(64, 2), torch.randn(32, 2)  # a LoRA adapter whose base model is the evil folder
    adapter = save_peft_adapter(
        root / "eviladapter", a, b, 1.0, "model.layers.1.mlp", False, f["evil"], {"model": f["evil"]}
    )
    f["eviladapter"] = str(adapter)
    (root / "spec-evil.json").write_text(json.dumps({**spec_to_dict(load_spec("story")), "base_model": f["evil"]}))
    f["evilspec"] = str(root / "spec-evil.json")
    assert (
        _run(["export", "vector", "--bank", str(run), "--vector", "0", "--out", str(root / "vector.safetensors")]) == 0
    )
    f["vector"] = str(root / "vector.safetensors")
    yield f
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(ro)], capture_output=True, check=False)
    os.chmod(ro, stat.S_IRWXU)


def _make_read_only_for_root(folder) -> bool:
    """Root ignores permission bits, so as root mark the folder immutable; False if we cannot."""
    if os.geteuid() != 0:
        return True
    try:
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
    except OSError:
        return False
    return done.returncode == 0


def _run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return int(e.value.code or 0)


# ---------------------------------------------------------------- the catalog

T = [
    "train",
    "--model",
    "{model}",
    "--prompt",
    "Hello there.",
    "--num-vectors",
    "2",
    "--steps",
    "1",
    "--radius",
    "2",
    "--out",
    "{out}",
]
TD = [a for i, a in enumerate(T) if a != "--steps" and T[i - 1] != "--steps"]  # DCT has no steps
CASES: list[tuple[str, list[str], str]] = []
# CLASS: the harm a case's bad input did (or would do) without its check, for the cases of these four classes
# (test_every_subcommand_has_each_class wants each class for every subcommand where it applies):
#   a  code execution: a model folder (or the model a bank, adapter, spec or planted folder names) that needs
#      custom code (config.json auto_map -> evil.py); evil.py writes files["sentinel"] when imported
#   b  data loss: writing over a user's file or folder, an earlier result, or one of the command's own inputs
#   c  a silent wrong result: exit code 0 and a wrong or empty result
#   d  a traceback
# WRITES: cases that fail after writing what succeeded (exit 2 all the same).
CLASS: dict[str, str] = {}
WRITES: set[str] = set()


def case(cid: str, argv: list[str], pattern: str) -> None:
    CASES.append((cid, argv, pattern))


def bug(kind: str, cid: str, argv: list[str], pattern: str, writes: bool = False) -> None:
    """A case of class ``kind`` (a, b, c or d: see CLASS)."""
    assert kind in "abcd" and len(kind) == 1, kind
    case(cid, argv, pattern)
    CLASS[cid] = kind
    if writes:
        WRITES.add(cid)


def train(cid: str, extra: list[str], pattern: str, base: list[str] = T) -> None:
    argv = list(base)
    for i in range(0, len(extra), 2):  # an option given again replaces the base's value
        if extra[i] in argv and i + 1 < len(extra) and extra[i] not in ("--prompt",):
            argv[argv.index(extra[i]) + 1] = extra[i + 1]
        else:
            argv += extra[i : i + 2]
    case(cid, argv, pattern)


NUMBER = r"must be a finite number"
for v in ("0", "-1", "inf", "-inf", "nan", "big", "-0.5x", "0x", "1e400", "x", "2y", "--"):
    train(f"train-radius-{v}", ["--radius", v], rf"bad radius '{v}'|radius" if v != "--" else "radius")
for flag, name in (("--p", "p"), ("--q", "q")):
    for v in ("0", "-1", "nan", "inf"):
        train(f"train-{name}-{v}", [flag, v], rf"{name} must be a finite number > 0, got {v}")
    train(f"train-{name}-text", [flag, "two"], r"Invalid value for '--" + name)
for v in ("0", "-1", "100001"):
    train(
        f"train-num-vectors-{v}",
        ["--num-vectors", v],
        rf"number of vectors must be a whole number in 1\.\.100000, got {v}",
    )
train("train-num-vectors-text", ["--num-vectors", "many"], r"Invalid value for '--num-vectors'")
train("train-num-vectors-over-d", ["--num-vectors", "33"], r"33 mutually orthogonal vectors do not fit d_model = 32")
for v in ("-1", "1000001"):
    train(f"train-steps-{v}", ["--steps", v], rf"steps must be a whole number in 0\.\.1000000, got {v}")
for v in ("0", "-1", "nan", "inf"):
    train(f"train-lr-{v}", ["--lr", v], rf"learning rate must be a finite number > 0, got {v}")
for v in ("-1", "2147483648", "99999999999999999999"):
    train(f"train-seed-{v}", ["--seed", v], rf"seed must be a whole number in 0\.\.2147483647, got {v}")
for v, pat in (
    ("last:0", "K must be >= 1"),
    ("last:x", "bad positions 'last:x'"),
    ("sideways", "bad positions 'sideways'"),
    ("1,,2", "bad positions '1,,2'"),
    ("last:99", "positions last:99 go beyond prompt"),
    ("99", "token position 99 is beyond prompt"),
    ("-99", "token position -99 is beyond prompt"),
    ("", "bad positions ''"),
):
    train(f"train-positions-{v or 'empty'}", ["--positions", v], pat)
for extra, pat in (
    (["--source-layer", "9"], "source layer 9 is out of range"),
    (["--source-layer", "-9"], "source layer -9 is out of range"),
    (["--target-layer", "4"], "target layer 4 is out of range"),
    (["--source-layer", "3", "--target-layer", "1"], "must come before target layer 1"),
    (["--source-layer", "2", "--target-layer", "2"], "must come before"),
    (["--source-layer", "-1", "--target-layer", "0"], "must come before"),
    (["--source-layer", "one"], "Invalid value for '--source-layer'"),
):
    train("train-layers-" + "_".join(extra[1::2]), extra, pat)
for v in ("0", "-1", "nan"):
    train(
        f"train-lambda-{v}",
        ["--radius", "calibrate", "--lambda", v],
        rf"calibration ratio λ must be a finite number > 0, got {v}",
    )
for v in ("0", "-1"):
    train(
        f"train-batch-vectors-{v}",
        ["--batch-vectors", v],
        rf"batch of vectors must be a whole number in 1\.\.100000, got {v}",
    )
for v in ("0", "-1", "nan", "inf"):
    train(f"train-memory-{v}", ["--memory-gb", v], rf"memory budget \(GB\) must be a finite number > 0, got {v}")
for v in ("-1", "nan", "inf"):
    train(
        f"train-effect-penalty-{v}", ["--effect-penalty", v], rf"effect penalty must be a finite number >= 0, got {v}"
    )
train(
    "train-orthogonalize-soft-melbo",
    ["--orthogonalize", "soft"],
    r"unknown orthogonalization 'soft'; allowed: symmetric, qr, none",
)
train("train-orthogonalize-bad", ["--orthogonalize", "gram"], r"Invalid value for '--orthogonalize'")
for v in ("0", "-1", "33"):
    pat = (
        rf"number of DCT factors must be a whole number in 1\.\.1000000, got {v}"
        if v != "33"
        else r"33 factors do not fit QR"
    )
    train(f"train-dct-factors-{v}", ["--method", "dct", "--factors", v], pat, TD)
train(
    "train-dct-iterations",
    ["--method", "dct", "--iterations", "-1"],
    r"DCT iterations must be a whole number in 0\.\.100000, got -1",
    TD,
)
for v in ("0", "1.5", "nan", "-1"):
    train(
        f"train-dct-beta-{v}",
        ["--method", "dct", "--beta", v],
        rf"damping β must be a finite number > 0 and <= 1, got {v}",
        TD,
    )
train(
    "train-dct-symmetric",
    ["--method", "dct", "--orthogonalize", "symmetric"],
    r"unknown orthogonalization 'symmetric'; allowed: qr, soft",
    TD,
)
train("train-dct-steps", ["--method", "dct", "--steps", "3"], r"unknown setting 'steps' for method 'dct'")
train("train-dct-sigma", ["--method", "dct", "--dct-sigma", "tanh"], r"Invalid value for '--dct-sigma'")
train("train-dct-init", ["--method", "dct", "--dct-init", "pca"], r"Invalid value for '--dct-init'")
for v in ("0", "-1"):
    train(
        f"train-adapter-rank-{v}",
        ["--method", "adapter", "--rank", v],
        rf"adapter rank must be a whole number in 1\.\.100000, got {v}",
    )
train(
    "train-adapter-batch",
    ["--method", "adapter", "--adapter-batch", "0"],
    r"adapter batch must be a whole number in 1\.\.100000, got 0",
)
train(
    "train-adapter-calibrate",
    ["--method", "adapter", "--radius", "calibrate"],
    r"radius calibrate is not available for adapters",
)
train(
    "train-adapter-mlp-module",
    ["--method", "adapter", "--mlp-module", "mlp.nothing"],
    r"--mlp-module 'mlp.nothing' is not a linear layer",
)
train(
    "train-adapter-writes-only",
    ["--method", "adapter", "--writes-only"],
    r"unknown setting 'writes_only' for method 'adapter'",
)
train("train-rank-for-melbo", ["--rank", "4"], r"unknown setting 'rank' for method 'melbo'")
train("train-method-bad", ["--method", "sae"], r"Invalid value for '--method'")
train("train-prompt-empty", ["--prompt", ""], r"prompt 1 is empty")
train("train-prompt-spaces", ["--prompt", "   "], r"prompt 1 is empty")
train(
    "train-prompts-file-missing", ["--prompts-file", "{root}/missing.txt"], r"cannot read --prompts-file .*missing.txt"
)
train(
    "train-prompts-file-latin1",
    ["--prompts-file", "{latin1}"],
    r"--prompts-file .*latin1.txt' is not UTF-8 text \(byte 3 is 0xe9\)",
)
case(
    "train-prompts-file-blank",
    ["train", "--model", "{model}", "--prompts-file", "{blank}", "--out", "{out}"],
    r"no prompt given",
)
case("train-no-prompt", ["train", "--model", "{model}", "--out", "{out}"], r"no prompt given")
train("train-model-missing", ["--model", "{root}/nothing"], r"model '.*nothing': no such folder")
train("train-model-empty-folder", ["--model", "{empty}"], r"cannot load model '.*empty' as a folder")
train(
    "train-model-pickle", ["--model", "{pickle}"], r"pickle weights only \(pytorch_model.bin\); melbo never unpickles"
)
train("train-model-bad-gguf", ["--model", "{badgguf}"], r"cannot load model '.*bad.gguf' as a GGUF file")
train("train-model-missing-gguf", ["--model", "{root}/none.gguf"], r"no such GGUF file")
train("train-gguf-file-missing", ["--gguf-file", "x.gguf"], r"--gguf-file 'x.gguf' is not in folder")
train("train-model-bad-hub-id", ["--model", "not a hub id!"], r"not a Hub id of the form org/name")
train("train-out-file", ["--out", "{afile}"], r"--out '.*afile' is a file, not a folder")
train("train-out-under-file", ["--out", "{afile}/sub"], r"is a file, not a folder")
train("train-out-readonly", ["--out", "{readonly}/run"], r"cannot be written: .*readonly' is read-only")
bug("b", "train-out-existing-run", T[:-1] + ["{bank}"], r"already holds a run; pass --resume")
train("train-resume-nothing", ["--resume"], r"--resume: no bank.safetensors in")
train(
    "train-resume-other-settings",
    ["--out", "{bank}", "--resume", "--p", "4"],
    r"the run in the bank has p=2.0, this command asks for 4.0",
)
for v in ("0", "-1"):
    train(
        f"train-max-new-tokens-{v}",
        ["--max-new-tokens", v],
        rf"max new tokens must be a whole number in 1\.\.100000, got {v}",
    )
for v in ("-1", "nan", "1000"):
    train(
        f"train-temperature-{v}",
        ["--temperature", v],
        rf"temperature \(0 is greedy\) must be a finite number >= 0 and <= 100, got {v}",
    )
for v in ("0", "1.5", "nan", "-1"):
    train(f"train-top-p-{v}", ["--top-p", v], rf"top-p must be a finite number > 0 and <= 1, got {v}")
train("train-device-tpu", ["--device", "tpu"], r"unknown device 'tpu'")
train("train-device-cuda", ["--device", "cuda:7"], r"CUDA is not available here|unknown device")
train("train-dtype", ["--dtype", "float8"], r"unknown dtype 'float8'; allowed: auto")
train(
    "train-blocks-path",
    ["--blocks-path", "model.nothing"],
    r"--blocks-path 'model.nothing' does not name a torch.nn.ModuleList",
)

G = ["generate", "--bank", "{bank}", "--prompt", "Hi", "--max-new-tokens", "3"]
for name, pat in (
    ("truncated", "not a readable safetensors file"),
    ("corrupt", "not a readable safetensors file"),
    ("listmeta", "metadata of type list; expected a JSON object"),
    ("badjson", "malformed metadata"),
    ("onedim", r"a bank holds vectors of shape \[n, d_model\], got \(32,\)"),
    ("inf", "tensor 'vectors' holds NaN or inf values"),
    ("plain", "not a melbo bank .no 'melbo' metadata"),
    ("otherformat", "has format 'melbo.adapters/9', not a melbo bank"),
    ("empty", "holds no bank.safetensors"),
    ("narrow", "bank vectors are 16 wide, model .* has d_model=32"),
    ("gpt2bank", "model_type='gpt2'.*has model_type='llama'"),
):
    for cmd in ("generate", "plot", "ortho"):
        base = {
            "generate": G,
            "plot": ["plot", "--bank", "{bank}", "--out", "{out}"],
            "ortho": ["ortho", "--bank", "{bank}", "--steps", "1", "--num-vectors", "1", "--out", "{out}"],
        }[cmd]
        argv = list(base)
        argv[argv.index("{bank}")] = "{" + name + "}"
        case(f"{cmd}-bank-{name}", argv, pat)
case(
    "generate-bank-missing",
    ["generate", "--bank", "{root}/missing", "--prompt", "Hi"],
    r"bank '.*missing' does not exist",
)
for v, pat in (
    ("99", "vector index 99 is outside the bank, which has 2 vectors"),
    ("x", "bad vector choice 'x'"),
    ("3-1", "bad vector choice '3-1'"),
    ("-5", "vector index -5 is outside"),
    ("1,7", "vector index 7 is outside"),
):
    case(f"generate-vectors-{v}", G + ["--vectors", v], pat)
for v in ("nan", "inf", "-inf"):
    case(f"generate-scale-{v}", G + ["--scale", v], rf"scale must be a finite number, got {v}")
case(
    "generate-random-none",
    ["generate", "--bank", "{norandom}", "--prompt", "Hi", "--random"],
    r"holds no random baseline",
)
case("generate-other-model", G + ["--model", "{other}"], r"bank was made for model")
case("generate-layer", G + ["--layer", "9"], r"layer 9 is out of range")
case("generate-both", G + ["--adapter", "{adapters}/peft/adapter_000"], r"give exactly one of --bank .* and --adapter")
case("generate-neither", ["generate", "--prompt", "Hi"], r"give exactly one of --bank .* and --adapter")
case(
    "generate-adapter-not-peft", ["generate", "--adapter", "{empty}", "--prompt", "Hi"], r"is not a PEFT adapter folder"
)
bug(
    "d",
    "generate-adapter-no-rank",
    ["generate", "--adapter", "{adapter_norank}", "--prompt", "Hi"],
    r"adapter_config.json': 'r' must be a whole number >= 1 \(the LoRA rank\), got nothing",
)
case(
    "generate-adapter-rescale",
    ["generate", "--adapter", "{adapters}/peft/adapter_000", "--prompt", "Hi", "--rescale", "2"],
    r"--rescale, --mean, --random and --vectors need a bank",
)
case(
    "generate-adapter-other-model",
    ["generate", "--adapter", "{adapters}/peft/adapter_000", "--prompt", "Hi", "--model", "{other}"],
    r"targets module .* which model .* does not have",
)
case(
    "generate-adapter-bank-rescale",
    ["generate", "--bank", "{adapters}", "--prompt", "Hi", "--rescale", "2"],
    r"--rescale and --mean apply to steering vectors",
)
for v in ("0", "-1", "nan"):
    case(f"generate-rescale-{v}", G + ["--rescale", v], rf"rescale norm must be a finite number > 0, got {v}")
for v, pat in (("99", "vector index 99 is outside"), ("x", "bad vector choice 'x'")):
    case(f"generate-mean-{v}", G + ["--mean", v], pat)
case("generate-prompts-latin1", ["generate", "--bank", "{bank}", "--prompts-file", "{latin1}"], r"not UTF-8 text")
case("generate-prompt-empty", ["generate", "--bank", "{bank}", "--prompt", ""], r"prompt 0 is empty")
case("generate-steer-bad", G + ["--steer", "sometimes"], r"Invalid value for '--steer'")
case("generate-max-new-tokens", G + ["--max-new-tokens", "0"], r"max new tokens must be a whole number")

OR = ["ortho", "--bank", "{bank}", "--steps", "1", "--num-vectors", "1", "--out", "{out}"]
case("ortho-both", OR + ["--vector-file", "{afile}"], r"give exactly one of --bank and --vector-file")
case("ortho-neither", ["ortho", "--out", "{out}"], r"give exactly one of --bank and --vector-file")
case("ortho-vector-index", OR + ["--vector", "9"], r"vector index 9 is outside the bank")
case(
    "ortho-vector-file-missing",
    ["ortho", "--vector-file", "{root}/v.safetensors", "--model", "{model}", "--out", "{out}"],
    r"steering vector '.*v.safetensors' does not exist",
)
case(
    "ortho-vector-file-corrupt",
    ["ortho", "--vector-file", "{corrupt}", "--model", "{model}", "--out", "{out}"],
    r"not a readable safetensors file",
)
case(
    "ortho-vector-file-bank",
    ["ortho", "--vector-file", "{bank}/bank.safetensors", "--model", "{model}", "--out", "{out}"],
    r"has format 'melbo.bank/1', not a melbo steering vector",
)
case(
    "ortho-adapter-bank",
    ["ortho", "--bank", "{adapters}", "--out", "{out}"],
    r"starts from a steering vector; the bank holds adapters",
)
for flag, v, pat in (
    ("--num-vectors", "0", r"number of vectors must be a whole number in 1"),
    ("--steps", "0", r"steps must be a whole number in 1"),
    ("--lr", "0", r"learning rate must be"),
    ("--lr", "nan", r"learning rate must be"),
    ("--min-norm", "-1", r"minimum norm must be a finite number >= 0"),
    ("--min-norm", "inf", r"minimum norm must be"),
    ("--positions", "last:0", r"K must be >= 1"),
    ("--source-layer", "9", r"source layer 9 is out of range"),
):
    case(f"ortho-{flag[2:]}-{v}", OR + [flag, v], pat)
case("ortho-out-file", OR[:-1] + ["{afile}"], r"is a file, not a folder")
case(
    "ortho-zero-base", ["ortho", "--bank", "{zero}", "--out", "{out}", "--model", "{model}"], r"the base vector is zero"
)

P = ["plot", "--bank", "{bank}", "--out", "{out}"]
for v, pat in (
    ("9", "vector index 9 is outside"),
    ("x", "bad --reference 'x'; allowed: one vector index or none"),
    ("0,1", "bad --reference '0,1'"),
):
    case(f"plot-reference-{v}", P + ["--reference", v], pat)
case("plot-vectors", P + ["--vectors", "5"], r"vector index 5 is outside")
case("plot-window", P + ["--window", "0"], r"moving-average window must be a whole number >= 1, got 0")
case("plot-batch-size", P + ["--batch-size", "0"], r"batch size must be a whole number >= 1, got 0")
case("plot-zero-bank", ["plot", "--bank", "{zero}", "--out", "{out}"], r"every chosen vector is zero")
case("plot-adapters", ["plot", "--bank", "{adapters}", "--out", "{out}"], r"melbo plot takes a bank of steering")
case("plot-out-file", ["plot", "--bank", "{bank}", "--out", "{afile}"], r"is a file, not a folder")
case("plot-out-readonly", ["plot", "--bank", "{bank}", "--out", "{readonly}/p"], r"read-only")
case("plot-random-none", ["plot", "--bank", "{norandom}", "--random", "--out", "{out}"], r"holds no random baseline")
case("plot-scale", P + ["--scale", "nan"], r"scale must be a finite number, got nan")

C = ["calibrate", "--model", "{model}", "--prompt", "Hello there, world!"]
for v, pat in (
    ("x", "bad --bracket 'x'"),
    ("1", "bad --bracket '1'"),
    ("5,1", r"bad calibration bracket \(5.0, 1.0\)"),
    ("0,1", r"bad calibration bracket \(0.0, 1.0\)"),
    ("-1,2", "bad calibration bracket"),
    ("1,inf", "bad calibration bracket"),
    ("1,2,3", "bad --bracket '1,2,3'"),
):
    case(f"calibrate-bracket-{v}", C + ["--bracket", v], pat)
for flag, v, pat in (
    ("--lambda", "0", "calibration ratio λ must be"),
    ("--lambda", "-1", "calibration ratio λ must be"),
    ("--directions", "0", "number of calibration directions must be a whole number in 1"),
    ("--positions", "sideways", "bad positions 'sideways'"),
    ("--source-layer", "3", "must come before"),
):
    case(f"calibrate-{flag[2:]}-{v}", C + [flag, v], pat)
case("calibrate-no-root", C + ["--bracket", "0.001,0.002"], r"no root in the bracket|already .* at the low end")
case("calibrate-json-readonly", C + ["--json", "{readonly}/x/c.json"], r"read-only")
case("calibrate-no-prompt", ["calibrate", "--model", "{model}"], r"no prompt given")
case("calibrate-model-missing", ["calibrate", "--model", "{root}/none", "--prompt", "x"], r"no such folder")

PL = ["plant", "--out", "{out}", "--steps", "1"]
for name, pat in (
    ("speclatin1", r"spec file .* is not UTF-8 text"),
    ("specbad", r"is not valid JSON \(line 1"),
    ("specunknown", r"unknown field 'colour'"),
    ("speclist", r"must be a JSON object, got list"),
):
    case(f"plant-spec-{name}", PL + ["--spec", "{" + name + "}"], pat)
case("plant-spec-missing", PL + ["--spec", "{root}/nope.json"], r"cannot read spec file")
case("plant-spec-unknown-name", PL + ["--spec", "third"], r"cannot read spec file 'third'")
for v, pat in (
    ("-1", r"seed -1 is not allowed; allowed: an integer in 0\.\.2147483647"),
    ("99999999999", r"seed 99999999999 is not allowed"),
):
    case(f"plant-seed-{v}", PL + ["--seed", v], pat)
case("plant-steps-0", ["plant", "--out", "{out}", "--steps", "0"], r"steps 0 is not allowed; allowed: an integer >= 1")
case("plant-noise", PL + ["--noise", "-1"], r"noise.residual_std = -1.0 is not allowed")
case("plant-device", PL + ["--device", "tpu"], r"device 'tpu' is not a torch device|not supported")
case("plant-device-cuda", PL + ["--device", "cuda"], r"CUDA is not available")
bug("b", "plant-out-nonempty", PL[:2] + ["{nonempty}", "--steps", "1"], r"exists and is not an empty folder")
case("plant-out-file", ["plant", "--out", "{afile}", "--steps", "1"], r"is a file, not a folder")

B = ["bench", "backdoor", "--model", "{planted}", "--num-vectors", "1", "--steps", "1", "--out", "{out}"]
for v, pat in (
    ("colour=red", "unknown sweep key 'colour'"),
    ("0.5x,1x", "must start with KEY=VALUE"),
    ("p=2,p=4", "appears twice"),
    ("p=two", "bad value 'two' for sweep key 'p'"),
    ("radius=big", "bad radius 'big'"),
    ("method=sae", "allowed: melbo, dct, adapter"),
    ("writes-only=maybe", "true/false"),
    ("positions=last:0", "K must be >= 1"),
    ("p=2,", "empty value"),
    ("orthogonalize=none", "allowed: qr, soft"),
):
    case(f"bench-sweep-{v}", B + ["--sweep", v], pat)
for v, pat in (
    ("1,x", "bad scale 'x'"),
    ("0", "scale must be a finite number > 0"),
    ("-2", "scale must be"),
    ("nan", "scale must be"),
):
    case(f"bench-scales-{v}", B + ["--scales", v], pat)
for extra, pat in (
    (["--radius", "big"], "bad radius 'big'"),
    (["--num-vectors", "0"], "number of vectors must be"),
    (["--num-prompts", "0"], r"whole number in 1\.\.100, got 0"),
    (["--num-prompts", "101"], r"whole number in 1\.\.100, got 101"),
    (["--prompt", "a=0+1, b=2+3. What is a*b?"], "triggers the planted behavior 'hate'"),
    (["--prompt", "Once upon a time"], "not an arithmetic prompt of the planted task"),
    (["--method", "sae"], "Invalid value for '--method'"),
    (["--method", "melbo", "--p", "0"], "p must be a finite number > 0"),
    (["--positions", "x"], "bad positions 'x'"),
    (["--method", "adapter", "--rank", "0"], "adapter rank must be"),
    (["--method", "adapter", "--writes-only"], "writes-only is for vectors"),
    (["--method", "dct", "--factors", "0"], "number of DCT factors must be"),
    (["--spec", "{storyspec}"], "is not the spec the model was planted with: .* 'default' plants arithmetic task"),
    (["--out", "{afile}"], "is a file, not a folder"),
    (["--seed", "-1"], "seed must be a whole number"),
):
    case("bench-" + "_".join(x.strip("-{}").replace("/", "") for x in extra)[:40], B + extra, pat)
case("bench-not-planted", ["bench", "backdoor", "--model", "{model}", "--out", "{out}"], r"has no plant_spec.json")
case(
    "bench-model-missing", ["bench", "backdoor", "--model", "{root}/none", "--out", "{out}"], r"has no plant_spec.json"
)

CAP = ["bench", "capability", "--model", "{model}", "--num-vectors", "1", "--steps", "1", "--out", "{out}"]
for extra, pat in (
    (["--digits", "x"], "Invalid value for --digits: 'x'; give the digits of a and b like 2,1"),
    (["--digits", "9,1"], r"digits of a must be a whole number in 1\.\.4, got 9"),
    (["--num-test", "0"], "test instances must be a whole number in 1"),
    (["--num-train", "0"], "training instances must be a whole number in 1"),
    (["--op", "divide"], "Invalid value for '--op'"),
    (["--radius", "-1"], "bad radius '-1'"),
    (["--out", "{afile}"], "is a file, not a folder"),
):
    case("capability-" + "_".join(x.strip("-{}") for x in extra), CAP + extra, pat)
case("demo-out-file", ["demo", "--out", "{afile}", "--part", "planted"], r"is a file, not a folder")
case("demo-part", ["demo", "--part", "some"], r"Invalid value for '--part'")

# The output rule (melbo.core.outputs): no command writes over a file it did not write, nor over its own input.
NOT_MINE = r"holds no earlier `melbo {}` output"
OWN_INPUT = r"would write over .*bank.safetensors', the bank \(--bank\) of this command; melbo never writes over"
bug("b", "out-train-users-folder", T[:-1] + ["{mine}"], NOT_MINE.format("train"))
bug("b", "out-train-users-folder-overwrite", T[:-1] + ["{mine}", "--overwrite"], NOT_MINE.format("train"))
bug("b", "out-ortho-users-folder", OR[:-1] + ["{mine}"], NOT_MINE.format("train"))
bug("b", "out-plot-users-folder", P[:-1] + ["{mine}"], NOT_MINE.format("plot"))
bug("b", "out-calibrate-json-exists", C + ["--json", "{afile}"], r"--json '.*afile' already exists; pass --overwrite")
bug(
    "b",
    "out-report-over-bank",
    ["report", "{bank}", "--out", "{bank}/bank.safetensors", "--overwrite"],
    r"never writes",
)
bug("b", "out-report-exists", ["report", "{bank}", "--out", "{afile}"], r"already exists; pass --overwrite")
EX = ["export", "vector", "--bank", "{bank}", "--vector", "0", "--out", "{bank}/bank.safetensors"]
bug("b", "out-export-vector-over-bank", EX + ["--overwrite"], OWN_INPUT)
EG = ["export", "gguf", "--bank", "{bank}", "--vectors", "0", "--out", "{badgguf}"]
bug("b", "out-export-gguf-exists", EG, r"bad.gguf' already exists; pass --overwrite")
bug("b", "out-chat-over-bank", ["chat", "--bank", "{bank}", "--transcript", "{bank}/bank.safetensors"], OWN_INPUT)
DT = ["detect", "--bank", "{bank}", "--prompt", "Hi", "--reference-file", "{blank}", "--out"]
bug("b", "out-detect-over-bank", DT + ["{bank}/bank.safetensors", "--overwrite"], OWN_INPUT)
bug("b", "out-detect-exists", DT + ["{afile}"], r"already exists; pass --overwrite")
SW = ["sweep", "--model", "{model}", "--grid", "radius=2", "--prompt", "Hi", "--local", "--out", "{mine}"]
bug("b", "out-sweep-users-folder", SW, NOT_MINE.format("sweep"))
bug("b", "out-bench-earlier", B[:-1] + ["{oldbench}"], r"earlier `melbo bench backdoor` output; pass --overwrite")
bug("b", "out-capability-earlier", CAP[:-1] + ["{oldcapability}"], r"`melbo bench capability` output; pass --overwrite")
BD = ["bench", "detect", "--model", "{planted}", "--out", "{olddetect}"]
bug("b", "out-bench-detect-earlier", BD, r"earlier `melbo bench detect` output; pass --overwrite")
bug("b", "out-plant-users-folder", PL[:2] + ["{nonempty}", "--overwrite"], NOT_MINE.format("plant"))
bug("b", "out-demo-users-folder", ["demo", "--out", "{mine}", "--part", "planted"], NOT_MINE.format("demo"))
JI = ["judge", "--input", "{judgerows}", "--out"]
bug(
    "b",
    "out-judge-over-input",
    JI + ["{judgerows}", "--overwrite"],
    r"rows.jsonl', the rows \(--input\) of this command",
)
bug("b", "out-judge-exists", JI + ["{afile}"], r"afile' already exists; pass --overwrite")

# ---------------------------------------------------------------- custom code (a): models are data
# Every command that loads a model, given a folder that needs custom code (or a bank, adapter, spec or planted
# folder that names one): refused before transformers could import evil.py (the test checks the sentinel).
CODE = (
    r"'.*evil\w*' needs custom code \(config.json auto_map AutoModelForCausalLM -> evil.EvilModel\); melbo never runs"
)
EVIL = "model folder " + CODE
bug("a", "a-train-custom-code", T[:2] + ["{evil}"] + T[3:], EVIL)
bug("a", "a-generate-bank-custom-code", ["generate", "--bank", "{evilbank}", "--prompt", "Hi"], EVIL)
bug("a", "a-generate-model-custom-code", G + ["--model", "{evil}"], EVIL)
bug("a", "a-generate-adapter-custom-code", ["generate", "--adapter", "{eviladapter}", "--prompt", "Hi"], EVIL)
bug("a", "a-chat-custom-code", ["chat", "--bank", "{evilbank}", "--transcript", "{out}.jsonl"], EVIL)
bug("a", "a-ortho-bank-custom-code", OR[:2] + ["{evilbank}"] + OR[3:], EVIL)
VF = ["ortho", "--vector-file", "{vector}", "--model", "{evil}", "--prompt", "Hi", "--steps", "1", "--out", "{out}"]
bug("a", "a-ortho-vector-file-custom-code", VF, EVIL)
bug("a", "a-plot-custom-code", ["plot", "--bank", "{evilbank}", "--out", "{out}"], EVIL)
bug("a", "a-calibrate-custom-code", C[:2] + ["{evil}"] + C[3:], EVIL)
DC = ["detect", "--prompt", "Hi", "--reference-file", "{clean}", "--bank"]
bug("a", "a-detect-bank-custom-code", DC + ["{evilbank}"], EVIL)
bug("a", "a-detect-model-custom-code", DC + ["{bank}", "--model", "{evil}"], EVIL)
bug("a", "a-bench-custom-code", B[:3] + ["{evilplanted}"] + B[4:], EVIL)
bug("a", "a-capability-custom-code", CAP[:3] + ["{evil}"] + CAP[4:], EVIL)
bug("a", "a-bench-detect-custom-code", ["bench", "detect", "--model", "{evilplanted}", "--out", "{out}"], EVIL)
SC = ["sweep", "--model", "{evil}", "--grid", "radius=2", "--prompt", "Hi", "--local", "--out", "{out}"]
bug("a", "a-sweep-custom-code", SC, EVIL)
bug("a", "a-plant-custom-code", ["plant", "--spec", "{evilspec}", "--steps", "1", "--out", "{out}"], EVIL)
bug("a", "a-judge-model-custom-code", JI + ["{out}.jsonl", "--model", "{evil}"], EVIL)
bug("a", "a-judge-embedder-custom-code", JI + ["{out}.jsonl", "--embedder", "{evil}"], "sentence-embedding " + EVIL)

# ---------------------------------------------------------------- broken model files, non-UTF-8 argv, wrong-type JSON
UNREADABLE = r"weights file 'model.safetensors' is not a readable safetensors file \(.+\); an interrupted download"
train("model-cut-safetensors", ["--model", "{cutweights}"], r"model folder '.*cutweights': " + UNREADABLE)
train("model-garbage-safetensors", ["--model", "{garbageweights}"], r"model folder '.*garbageweights': " + UNREADABLE)
train("model-config-list", ["--model", "{configlist}"], r"model config '.*config.json' holds a JSON list; expected")
case("generate-model-cut-safetensors", G + ["--model", "{cutweights}"], UNREADABLE)
train(
    "model-tokenizer-config-list",
    ["--model", "{tokconfiglist}"],
    r"tokenizer config '.*tokenizer_config.json' holds a JSON list; expected a JSON object",
)
NOT_UTF8 = r"\) is not UTF-8 text \(byte 0x{}\); give command-line arguments .* as UTF-8"
train(
    "argv-prompt-not-utf8",
    ["--prompt", "\udcff\udcfe"],
    r"the value of --prompt \('\ufffd\ufffd'" + NOT_UTF8.format("ff"),
)
case(
    "argv-prompt-equals-not-utf8",
    G + ["--prompt=caf\udce9"],
    r"the value of --prompt \('caf\ufffd'" + NOT_UTF8.format("e9"),
)
train("argv-out-not-utf8", ["--out", "{root}/caf\udce9"], r"the value of --out \('.*caf\ufffd'" + NOT_UTF8.format("e9"))
case("argv-chat-system-not-utf8", ["chat", "--bank", "{bank}", "--system", "\udc80"], r"the value of --system")
case("report-summary-list", ["report", "{reportsummary}"], r"run summary '.*summary.json' holds a JSON list; expected")
case(
    "report-completions-list",
    ["report", "{reportrows}"],
    r"completions.jsonl' line 1 \('\[1, 2\]'\) is not a completion row",
)


# ---------------------------------------------------------------- silent wrong results (c) and tracebacks (d)
# Each case of this part ended, before its fix, with exit code 0 and a wrong or empty result (class c) or with a
# traceback (class d).
PAST = r"needs \d+ tokens.* positions, but the model reads at most 128 \(max_position_embeddings\)"
EMPTY = r"holds no perturbations \(0 rows\)"
META = r"device 'meta' cannot run a model here"
HUGE = r"vector index 9999999999 is outside the bank, which has 2 vectors"
bug("c", "c-train-prompt-past-positions", T + ["--prompts-file", "{long}"], "prompt 1 .*" + PAST)
NEW200 = r"needs \d+ tokens \+ 200 new tokens \(--max-new-tokens\) = \d+ positions, but the model reads at most 128"
bug("c", "c-train-new-tokens-past-positions", T + ["--max-new-tokens", "200"], NEW200)
bug("d", "d-train-gpt2-prompt-past-positions", T[:2] + ["{other}"] + T[3:] + ["--prompts-file", "{long}"], PAST)
bug("d", "d-train-lr-past-float32", T + ["--lr", "1e39"], r"learning rate must be a finite number > 0, got 1e\+39")
bug("d", "d-train-device-meta", T + ["--device", "meta"], META)
bug("c", "c-generate-empty-bank", ["generate", "--bank", "{emptybank}", "--prompt", "Hi"], EMPTY)
bug("c", "c-generate-vectors-blank", G + ["--vectors", " "], r"empty vector choice ' '; allowed: all, or indices")
GG = ["generate", "--bank", "{gptbank}", "--prompt", "Hi", "--max-new-tokens", "200"]
bug("d", "d-generate-gpt2-new-tokens-past-positions", GG, r"prompt 0 \('Hi'\) needs 2 tokens \+ 200 new tokens")
bug("d", "d-generate-vectors-huge-range", G + ["--vectors", "0-9999999999"], HUGE)
bug("d", "d-generate-device-meta", G + ["--device", "meta"], META)
CH = ["chat", "--bank", "{bank}", "--transcript", "{out}.jsonl", "--max-new-tokens"]
bug("c", "c-chat-new-tokens-past-positions", CH + ["300"], r"a reply up to 300 .* reads at most 128")
bug("d", "d-chat-gpt2-new-tokens-past-positions", CH[:2] + ["{gptbank}"] + CH[3:] + ["200"], r"reads at most 128")
case("chat-empty-bank", ["chat", "--bank", "{emptybank}", "--transcript", "{out}.jsonl"], EMPTY)
EG0 = ["export", "gguf", "--bank", "{bank}", "--out", "{out}.gguf", "--vectors"]
bug("c", "c-export-gguf-scale-0", EG0 + ["0", "--scale", "0"], r"control vector for block 1 is zero .*steer nothing")
bug("c", "c-export-gguf-vectors-blank", EG0 + [""], r"empty vector choice ''")
bug("d", "d-export-gguf-vectors-huge-range", EG0 + ["0-9999999999"], HUGE)
case("export-gguf-empty-bank", EG0[:3] + ["{emptybank}"] + EG0[4:] + ["all"], r"the bank holds no vectors \(0 rows\)")
EV = ["export", "vector", "--vector", "0", "--out", "{out}.safetensors", "--bank"]
bug("c", "c-export-vector-zero", EV + ["{zero}"], r"vector 0 of .* is zero; it would steer nothing")
case("export-vector-empty-bank", EV + ["{emptybank}"], r"vector index 0 is outside the bank, which has 0 vectors")
bug("c", "c-report-empty-bank", ["report", "{emptyrun}", "--out", "{out}.html"], EMPTY)
bug("d", "d-report-radius-not-a-number", ["report", "{radiusrun}", "--out", "{out}.html"], r"radius is 'big'; expected")
DE = ["detect", "--reference-file", "{clean}", "--prompts-file", "{long}", "--bank"]
bug("c", "c-detect-prompt-past-positions", DE + ["{bank}"], PAST)
bug("d", "d-detect-gpt2-prompt-past-positions", DE + ["{gptbank}"], PAST)
case("detect-empty-bank", ["detect", "--bank", "{emptybank}", "--prompt", "Hi", "--reference-file", "{clean}"], EMPTY)
SWP = ["sweep", "--model", "{model}", "--local", "--out", "{out}", "--grid"]
AMBIGUOUS = r"ambiguous prompts value .* a comma next to a space .* double quotes"
bug("c", "c-sweep-comma-in-prompt", SWP + ["prompts=Hello, world|Once upon a time,radius=2"], AMBIGUOUS)
bug("c", "c-sweep-num-vectors-0", SWP + ["radius=2", "--prompt", "Hi", "--num-vectors", "0"], r"number of vectors must")
bug("d", "d-sweep-device-meta", SWP + ["radius=2", "--prompt", "Hi", "--device", "meta"], META)
for cid, grid, pat in (
    ("comma-after-space", "prompts=Hello ,world", AMBIGUOUS),
    ("unclosed-quote", 'prompts="Hello, world', r"unclosed double quote"),
    ("text-after-quote", 'prompts="Hello" world', r"text after a closing quote"),
    ("value-with-equals", "prompts=a,b=c", r"unknown sweep key 'b' .*double quotes"),
):
    case(f"sweep-grid-{cid}", SWP + [grid], pat)
GF = SWP[:-1] + ["--grid-file"]
case("sweep-grid-and-grid-file", SWP + ["radius=2", "--grid-file", "{gridjson}"], r"give exactly one of --grid")
case("sweep-grid-file-flat-prompts", GF + ["{gridflat}"], r"prompts must be a list of sets, each a non-empty list")
case("sweep-grid-file-scalar", GF + ["{gridscalar}"], r"key 'radius' must map to a non-empty list of values")
case("sweep-grid-file-bad-toml", GF + ["{gridbadtoml}"], r"grid file .*grid-bad.toml' is not valid TOML")
case("sweep-grid-file-suffix", GF + ["{afile}"], r"should end in .json or .toml")
case("sweep-grid-file-unknown-key", GF + ["{gridunknown}"], r"unknown key 'colour'")
bug(
    "c",
    "c-ortho-vector-file-2x16",
    ["ortho", "--vector-file", "{v2x16}", "--model", "{model}", "--prompt", "Hi", "--steps", "1", "--out", "{out}"],
    r"tensor 'vector' has shape \[2, 16\]; a steering vector has shape \[d_model\]",
)
ORL = ["ortho", "--prompts-file", "{long}", "--steps", "1", "--num-vectors", "1", "--out", "{out}", "--bank"]
bug("d", "d-ortho-gpt2-prompt-past-positions", ORL + ["{gptbank}"], PAST)
PLL = ["plot", "--prompts-file", "{long}", "--out", "{out}", "--bank"]
bug("c", "c-plot-prompt-past-positions", PLL + ["{bank}"], PAST)
bug("d", "d-plot-gpt2-prompt-past-positions", PLL + ["{gptbank}"], PAST)
BLANK = r"--prompts-file '.*blank.txt' holds no prompt \(only blank lines\)"  # was: the bank's prompts instead
bug(
    "c", "c-plot-prompts-file-blank", ["plot", "--bank", "{bank}", "--prompts-file", "{blank}", "--out", "{out}"], BLANK
)
bug("c", "c-ortho-prompts-file-blank", OR + ["--prompts-file", "{blank}"], BLANK)
case("plot-empty-bank", ["plot", "--bank", "{emptybank}", "--out", "{out}"], EMPTY)
bug("c", "c-calibrate-prompt-past-positions", C + ["--prompts-file", "{long}"], PAST)
bug(
    "d", "d-calibrate-gpt2-prompt-past-positions", ["calibrate", "--model", "{other}", "--prompts-file", "{long}"], PAST
)
bug(
    "d",
    "d-plant-story-past-positions",
    ["plant", "--spec", "{storygpt2}", "--steps", "1", "--out", "{out}"],
    r"needs \d+ tokens \+ 200 new tokens \(story.continuation_tokens, or an answer\) .* at most 128",
)
OTHER_SPEC = r"spec 'second' \(second\) is not the spec the model was planted with: .*plant_spec.json records spec"
bug("c", "c-bench-spec-of-another-plant", B + ["--spec", "second"], OTHER_SPEC)
bug("c", "c-bench-sweep-empty", B + ["--sweep", ""], r"empty sweep; give KEY=V1,V2")
bug("c", "c-bench-new-tokens-past-positions", B + ["--max-new-tokens", "300"], PAST)
bug("d", "d-bench-device-meta", B + ["--device", "meta"], META)
case("bench-sweep-and-sweep-file", B + ["--sweep", "p=2", "--sweep-file", "{gridjson}"], r"at most one of --sweep")
case("bench-sweep-file-prompts", B + ["--sweep-file", "{gridjson}"], r"unknown key 'prompts'")
bug("c", "c-capability-new-tokens-past-positions", CAP + ["--max-new-tokens", "200"], PAST)
CAPG = CAP[:3] + ["{other}"] + CAP[4:] + ["--max-new-tokens", "200"]
bug("d", "d-capability-gpt2-new-tokens-past-positions", CAPG, PAST)
BDT = ["bench", "detect", "--model", "{planted}", "--num-vectors", "1", "--out", "{out}"]
bug("c", "c-bench-detect-spec-of-another-plant", BDT + ["--spec", "second"], OTHER_SPEC)
bug("d", "d-bench-detect-device-meta", BDT + ["--device", "meta"], META)
JU = ["judge", "--out", "{out}.jsonl", "--input"]
bug("c", "c-judge-empty-input", JU + ["{blank}"], r"--input '.*blank.txt' holds no rows")
bug("d", "d-judge-device-meta", JU + ["{judgerows}", "--model", "{model}", "--device", "meta"], META)
DM = ["demo", "--part", "planted", "--method", "melbo", "--out", "{out}"]
FAILED = r"1 of 1 benchmark subjects failed: default subject, melbo: 1000 mutually orthogonal vectors do not fit"
bug("c", "c-demo-subject-fails", DM + ["--num-vectors", "1000"], FAILED, writes=True)
bug("d", "d-demo-device-meta", DM + ["--device", "meta"], META, writes=True)


def test_the_catalog_has_at_least_200_cases():
    assert len(CASES) >= 200, len(CASES)
    assert len({c[0] for c in CASES}) == len(CASES)  # unique ids


# Where a class does not apply to a subcommand, and why.
NOT_APPLICABLE = {
    ("demo", "a"): "demo takes no model: it loads the models shipped with melbo (planted fixtures, gemma-3-270m)",
    ("export gguf", "a"): "export reads a bank and writes a file; it loads no model",
    ("export vector", "a"): "export reads a bank and writes a file; it loads no model",
    ("report", "a"): "report loads no model (its embedder: test_report_never_runs_an_embedders_code)",
    ("generate", "b"): "generate prints its completions; it writes no file",
    ("plant", "c"): "plant judges the model it trained against its spec's thresholds and exits 2 when it misses them",
    ("export vector", "d"): "it writes one row of a checked bank, chosen by an integer; no input found that crashed it",
}


def _subcommands() -> list[str]:
    out = []
    for name, cmd in cli.commands.items():
        subs = getattr(cmd, "commands", None)
        out += [f"{name} {s}" for s in subs] if subs else [name]
    return sorted(out)


def _command(argv: list[str]) -> str:
    return f"{argv[0]} {argv[1]}" if argv[0] in ("bench", "export") else argv[0]


def test_every_subcommand_is_in_the_catalog():
    have = {_command(argv) for _, argv, _ in CASES}
    assert not [c for c in _subcommands() if c not in have]


def test_every_subcommand_has_each_class():
    have = {(_command(argv), CLASS[cid]) for cid, argv, _ in CASES if cid in CLASS}
    missing = [(c, k) for c in _subcommands() for k in "abcd" if (c, k) not in have and (c, k) not in NOT_APPLICABLE]
    classes = "(a) code execution, (b) data loss, (c) silent wrong result, (d) traceback"
    assert not missing, f"subcommands without a case of each class {classes}: {missing}"
    assert not [k for k in NOT_APPLICABLE if k in have], "a class marked not applicable has cases"


def test_each_custom_code_case_names_a_folder_with_custom_code():
    for cid, argv, pattern in CASES:
        if CLASS.get(cid) == "a":
            assert any(a in ("{evil}", "{evilbank}", "{evilplanted}", "{eviladapter}", "{evilspec}") for a in argv), cid
            assert "needs custom code" in pattern, cid


def test_report_never_runs_an_embedders_code(files, tmp_path, capsys, monkeypatch):
    """report's one model is the sentence embedder (MELBO_EMBEDDER): one that needs custom code is refused, and as the
    user named it the refusal is an error naming it (no fallback to character similarity), with nothing written."""
    monkeypatch.setenv("MELBO_EMBEDDER", files["evil"])
    out = tmp_path / "r.html"
    assert _run(["report", files["bank"], "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert not Path(files["sentinel"]).exists(), "melbo report ran the embedder's code"
    assert "Traceback" not in err and "MELBO_EMBEDDER" in err and files["evil"] in err, err[-2000:]
    assert "needs custom code" in err, err[-2000:]
    assert not out.exists()


@pytest.mark.parametrize("cid, argv, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error_and_writes_nothing(files, tmp_path, capsys, cid, argv, pattern):
    import re

    out = tmp_path / "out"
    if any("{readonly}" in a for a in argv) and not files["readonly"]:
        pytest.skip("running as root where `chattr +i` fails: no folder is read-only for root here")
    values = {**files, "out": str(out)}
    argv = [a.format(**values) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = _run(argv)
    err = capsys.readouterr().err
    assert not Path(files["sentinel"]).exists(), f"{cid} ran the code of a model folder"  # class a; any case
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") or "Error: " in last, last
    assert re.search(pattern, err), err[-1500:]
    if cid not in WRITES:
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
