"""Models are data: no loading path of melbo ever runs a model folder's Python code.

A folder names ``evil.py`` in its ``auto_map`` (``config.json``, ``tokenizer_config.json``); the
file writes a sentinel file when imported. Every loading path runs in a subprocess, once with
"y" answers piped on stdin (transformers' "Do you wish to run the custom code? [y/N]" prompt would
take them) and once with stdin at EOF: the sentinel must never appear, and each path must end in
a MelboError (CLI: ``error: ...``, exit 2) that names the ``auto_map`` entry.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CUSTOM_CODE_AUTO_MAP, char_tokenizer, plant_custom_code, tiny_model

from melbo.bank import Bank
from melbo.core.errors import MelboError
from melbo.core.model_files import custom_code
from melbo.core.peft import save_peft_adapter
from melbo.planted.spec import load_spec, spec_to_dict

ROOT = Path(__file__).resolve().parents[2]
NAMED = r"config.json auto_map AutoModelForCausalLM -> evil.EvilModel"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Folders that name custom code, and the sentinel its import would write."""
    root = tmp_path_factory.mktemp("remote")
    sentinel = root / "SENTINEL"
    w = {"root": str(root), "sentinel": str(sentinel)}
    clean = root / "clean"
    tiny_model("llama").save_pretrained(clean)
    char_tokenizer().save_pretrained(clean)
    evil = root / "evil"
    shutil.copytree(clean, evil)
    plant_custom_code(evil, sentinel, {"model_type": "evilmodel", "auto_map": CUSTOM_CODE_AUTO_MAP})
    w["evil"] = str(evil)
    native = root / "native"  # transformers implements llama itself: the auto_map is ignored
    shutil.copytree(clean, native)
    plant_custom_code(native, sentinel, {"auto_map": CUSTOM_CODE_AUTO_MAP})
    w["native"] = str(native)
    planted = root / "planted"
    shutil.copytree(evil, planted)
    (planted / "plant_spec.json").write_text(json.dumps(spec_to_dict(load_spec(None))))
    w["planted"] = str(planted)
    # a PEFT adapter folder that names code itself, and one whose model is the evil folder
    a, b = torch.randn(64, 2), torch.randn(32, 2)
    adapter_code = save_peft_adapter(root / "adapter-code", a, b, 1.0, "model.layers.1.mlp", False, str(clean))
    plant_custom_code(adapter_code, sentinel, {"model_type": "evilmodel", "auto_map": CUSTOM_CODE_AUTO_MAP})
    w["adapter_code"] = str(adapter_code)
    w["adapter_base"] = str(
        save_peft_adapter(
            root / "adapter-base", a, b, 1.0, "model.layers.1.mlp", False, str(evil), {"model": str(evil)}
        )
    )
    embedder = root / "embedder"  # a sentence-transformers folder whose modules.json names code
    shutil.copytree(evil, embedder)
    (embedder / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "evil.EvilModule"}]))
    w["embedder_modules"] = str(embedder)
    meta = {"model": str(evil), "radius": 1.0, "model_type": "evilmodel", "hidden_size": 32, "num_layers": 4}
    Bank({"vectors": torch.ones(2, 32)}, {**meta, "source_layer": 1, "target_layer": 3}).save(root / "bank")
    w["bank"] = str(root / "bank")
    return w


def _env(world: dict) -> dict:
    return {
        **os.environ,
        "HF_MODULES_CACHE": str(Path(world["root"]) / "hf-modules"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }


STDIN = {"yes": {"input": b"y\n" * 50}, "eof": {"stdin": subprocess.DEVNULL}}

API = r"""
import json, sys
from pathlib import Path
w = json.loads(sys.argv[1])
sentinel = Path(w["sentinel"])
from melbo.core.models import load_model
from melbo.core.model_files import load_causal_lm, load_config, load_tokenizer
from melbo.core.peft import load_peft_adapter
from melbo.embed import embed
from melbo.planted.plant import load_planted
calls = {
    "load_model": lambda: load_model(w["evil"], "cpu"),
    "tokenizer": lambda: load_tokenizer(w["evil"]),
    "config": lambda: load_config(w["evil"]),
    "causal_lm": lambda: load_causal_lm(w["evil"]),
    "planted": lambda: load_planted(w["planted"]),
    "peft_adapter_folder": lambda: load_peft_adapter(w["adapter_code"]),
    "embedder": lambda: embed(["hello"], embedder=w["evil"]),
    "embedder_modules": lambda: embed(["hello"], embedder=w["embedder_modules"]),
    "native": lambda: load_model(w["native"], "cpu"),
}
out = {}
for name, call in calls.items():
    try:
        call()
        out[name] = {"error": None, "message": ""}
    except Exception as e:
        out[name] = {"error": type(e).__name__, "message": str(e)}
    out[name]["sentinel"] = sentinel.exists()
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module", params=sorted(STDIN))
def api_results(request, world):
    """Each library loading path, run in one subprocess per stdin mode."""
    done = subprocess.run(
        [sys.executable, "-c", API, json.dumps(world)],
        capture_output=True,
        env=_env(world),
        cwd=world["root"],
        timeout=600,
        **STDIN[request.param],
    )
    out = done.stdout.decode("utf-8", "replace")
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 0, err[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, out[-2000:] + err[-2000:]
    return json.loads(lines[-1][len("RESULT ") :]), out + err


@pytest.mark.parametrize(
    "path, pattern",
    [
        ("load_model", "model folder '.*evil' needs custom code \\(" + NAMED + "\\); melbo never runs a model's code"),
        ("tokenizer", NAMED),
        ("config", NAMED),
        ("causal_lm", NAMED),
        ("planted", NAMED),
        ("peft_adapter_folder", "PEFT adapter folder '.*adapter-code' needs custom code \\(" + NAMED),
        ("embedder", "sentence-embedding model folder '.*evil' needs custom code \\(" + NAMED),
        ("embedder_modules", "needs custom code \\(modules.json type evil.EvilModule\\)"),
    ],
)
def test_every_loading_path_refuses_custom_code(api_results, path, pattern):
    import re

    results, text = api_results
    r = results[path]
    assert not r["sentinel"], f"{path} ran the model folder's code"
    assert r["error"] == "MelboError", r
    assert re.search(pattern, r["message"]), r["message"]
    assert "Do you wish to run the custom code" not in text


def test_a_known_architecture_with_an_auto_map_loads_natively(api_results):
    r = api_results[0]["native"]
    assert r["error"] is None, r
    assert not r["sentinel"]


CLI = {
    "train": ["train", "--model", "{evil}", "--prompt", "Hello there.", "--steps", "1", "--out", "{root}/out-train"],
    "chat": ["chat", "--bank", "{bank}", "--transcript", "{root}/out-chat.jsonl"],
    "generate-adapter": ["generate", "--adapter", "{adapter_base}", "--prompt", "Hello"],
}


@pytest.mark.parametrize("stdin", sorted(STDIN))
@pytest.mark.parametrize("command", sorted(CLI))
def test_the_cli_refuses_custom_code(world, command, stdin):
    argv = [a.format(**world) for a in CLI[command]]
    done = subprocess.run(
        [sys.executable, "-c", "from melbo.cli import main; main()", *argv],
        capture_output=True,
        env=_env(world),
        cwd=world["root"],
        timeout=600,
        **STDIN[stdin],
    )
    err = done.stderr.decode("utf-8", "replace")
    assert not Path(world["sentinel"]).exists(), f"melbo {command} ran the model folder's code"
    assert done.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "Do you wish to run the custom code" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "needs custom code (" + NAMED.replace("\\", "") in last, last
    assert not any(Path(world["root"]).glob("out-*")), "a refused command wrote files"


def test_custom_code_names_tokenizer_entries_only_when_transformers_lacks_the_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    tok = {"auto_map": {"AutoTokenizer": [None, "tok.FancyTokenizer"]}, "tokenizer_class": "TokenizersBackend"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok))
    assert custom_code(tmp_path) is None
    tok["tokenizer_class"] = "FancyTokenizer"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok))
    assert custom_code(tmp_path) == "tokenizer_config.json auto_map AutoTokenizer -> tok.FancyTokenizer"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": ["tok.Slow", None]}))  # legacy list
    assert custom_code(tmp_path) == "tokenizer_config.json auto_map AutoTokenizer -> tok.Slow"
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "vit", "auto_map": {"AutoModelForCausalLM": "m.M"}})
    )
    assert custom_code(tmp_path) == "config.json auto_map AutoModelForCausalLM -> m.M"  # no ViT causal LM
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(MelboError, match=r"model config .*config.json' holds a JSON list; expected a JSON object"):
        custom_code(tmp_path)


# ---------------------------------------------------------------- the package's own calls

LOADERS = {"from_pretrained", "SentenceTransformer", "pipeline"}
FORBIDDEN = {"get_class_from_dynamic_module", "get_class_in_module", "load_custom_generate"}


def _calls() -> list[tuple[str, int, str, ast.Call]]:
    out = []
    for path in sorted((ROOT / "melbo").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                out.append((str(path.relative_to(ROOT)), node.lineno, name, node))
    return out


def test_every_model_load_in_the_package_passes_trust_remote_code_false():
    loads = [c for c in _calls() if c[2] in LOADERS]
    assert len(loads) >= 4, loads  # the tokenizer, config, causal LM and sentence-transformers loads
    bad = []
    for where, line, name, node in loads:
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        flag = kw.get("trust_remote_code")
        if not (isinstance(flag, ast.Constant) and flag.value is False):
            bad.append(f"{where}:{line} {name}(...)")
    assert not bad, "calls that may run a model's code (pass trust_remote_code=False): " + ", ".join(bad)
    forbidden = [f"{w}:{line} {n}" for w, line, n, _ in _calls() if n in FORBIDDEN]
    assert not forbidden, forbidden


def test_only_the_model_files_module_calls_the_loaders():
    where = {w for w, _, n, _ in _calls() if n in LOADERS}
    assert where == {os.path.join("melbo", "core", "model_files.py")}, where
