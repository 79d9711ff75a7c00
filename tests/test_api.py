"""The public API: the package's exports, and the README's library example run as written."""

import os
import re
from pathlib import Path

from conftest import shared_model_path

import melbo

ROOT = Path(__file__).resolve().parents[1]


def test_public_names():
    for name in (
        "load_model",
        "train",
        "ortho",
        "calibrate",
        "Bank",
        "SteeringVector",
        "SteeringAdapter",
        "MelboError",
        "DEFAULTS",
        "GenerationConfig",
        "__version__",
    ):
        assert name in melbo.__all__ and hasattr(melbo, name), name
    assert set(melbo.METHODS) == {"melbo", "dct", "adapter", "rank1", "ortho"}
    for name in ("Detector", "auroc", "run_sweep"):
        assert name in melbo.__all__ and hasattr(melbo, name), name
    for name in melbo.__all__:
        obj = getattr(melbo, name)
        if callable(obj):
            assert obj.__doc__, f"melbo.{name} has no docstring"


def test_readme_library_example_runs(tmp_path, monkeypatch, capsys):
    shared_model_path("stories260k")  # skips with a reason when ../shared/models is absent
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Library") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(ROOT)
    code = code.replace('"runs/notebook"', repr(str(tmp_path / "notebook")))  # write into the test's folder
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    bank, again = scope["bank"], scope["again"]
    assert len(bank) == 4 and bank.meta["radius"] == bank.meta["residual_norm"] * 0.04
    assert (again.vectors == bank.vectors).all() and os.path.isfile(tmp_path / "notebook" / "bank.safetensors")
    assert len(scope["more"]) >= 2 and len(scope["dct"]) == 32
    out = capsys.readouterr().out
    assert "unsteered:" in out and "vector 0:" in out
