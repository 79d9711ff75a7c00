"""Steering adapters as PEFT LoRA folders (melbo.core.peft, METHOD.md section 2): what melbo writes,
PEFT itself loads with the same logits as melbo's hook, and melbo reads it back."""

import json

import pytest
import torch
from conftest import tiny_loaded, tiny_model
from safetensors.torch import save_file

from melbo.core.errors import MelboError
from melbo.core.lora import apply_adapter, find_mlp_out
from melbo.core.peft import ADAPTER_META, load_peft_adapter, save_peft_adapter
from melbo.core.prompts import encode_prompts
from melbo.methods.adapter import adapter_start

PROMPTS = ["Hello there, friend", "The cat sat"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_peft_roundtrip_same_logits(arch, tmp_path):
    from peft import PeftModel

    lm = tiny_loaded(arch)
    mlp = find_mlp_out(lm, 2)
    a, b = adapter_start(0, mlp.d_hidden, mlp.d_model, 6, seed=3)
    R = 1.7
    folder = save_peft_adapter(tmp_path / "ad", a, b, R, mlp.full_name, mlp.conv1d, lm.name, {"index": 0})
    assert folder == tmp_path / "ad" and sorted(p.name for p in folder.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", ADAPTER_META]
    )
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 6 and cfg["target_modules"] == [mlp.full_name]
    assert cfg["fan_in_fan_out"] == mlp.conv1d
    ids = encode_prompts(lm.tokenizer, PROMPTS[:1]).input_ids
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits
        with apply_adapter(mlp.module, a, b, R):
            ours = lm.model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(tiny_model(arch), str(folder)).eval()
        theirs = peft_model(input_ids=ids).logits
        loaded = load_peft_adapter(folder)
        with apply_adapter(mlp.module, loaded.omega_a, loaded.omega_b, loaded.scale):
            again = lm.model(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-3
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours - again).abs().max() <= 1e-5
    assert loaded.module_name == mlp.full_name and loaded.meta["radius"] == pytest.approx(R)
    assert loaded.meta["index"] == 0 and loaded.scale == 1.0 and loaded.path == str(folder)
    assert torch.allclose(loaded.omega_a, a, atol=1e-6)
    assert torch.allclose(loaded.omega_b / R, b, atol=1e-6)  # lora_B = R·Ω_B


def test_saving_replaces_a_folder_atomically(tmp_path):
    lm = tiny_loaded("llama")
    mlp = find_mlp_out(lm, 1)
    a, b = adapter_start(0, mlp.d_hidden, mlp.d_model, 2, seed=0)
    folder = tmp_path / "ad"
    save_peft_adapter(folder, a, b, 1.0, mlp.full_name, False, lm.name)
    save_peft_adapter(folder, a, b, 2.0, mlp.full_name, False, lm.name)
    assert load_peft_adapter(folder).meta["radius"] == 2.0
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # no temporary folder left


def test_load_peft_adapter_errors(tmp_path):
    with pytest.raises(MelboError, match="not a PEFT adapter folder"):
        load_peft_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(MelboError, match="IA3"):
        load_peft_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    two = {f"base_model.model.m{i}.lora_{x}.weight": torch.zeros(2, 2) for i in (0, 1) for x in "AB"}
    save_file(two, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(MelboError, match="2 LoRA modules"):
        load_peft_adapter(tmp_path)
    save_file({"base_model.model.m.lora_A.weight": torch.zeros(2, 3)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(MelboError, match="no base_model.model.m.lora_B.weight"):
        load_peft_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(MelboError, match="not a readable safetensors"):
        load_peft_adapter(tmp_path)


@pytest.mark.parametrize(
    "cfg, pattern",
    [
        ([1, 2], r"adapter_config.json' is a JSON list, not an object"),
        ({}, r"'r' must be a whole number >= 1 \(the LoRA rank\), got nothing \(the key is missing\)"),
        ({"r": "x"}, r"'r' must be a whole number >= 1 \(the LoRA rank\), got 'x'"),
        ({"r": 0}, r"'r' must be a whole number >= 1 .*, got 0"),
        ({"r": True}, r"'r' must be a whole number >= 1 .*, got True"),
        ({"r": 2.5}, r"'r' must be a whole number >= 1 .*, got 2.5"),
        ({"r": 3, "lora_alpha": 3}, r"'r' must be the rank of the LoRA weights, 2, got 3"),
        ({"r": 2}, r"'lora_alpha' must be a finite number, got nothing \(the key is missing\)"),
        ({"r": 2, "lora_alpha": "2"}, r"'lora_alpha' must be a finite number, got '2'"),
        ({"r": 2, "lora_alpha": None}, r"'lora_alpha' must be a finite number, got None"),
        ({"r": 2, "lora_alpha": 2, "use_rslora": "yes"}, r"'use_rslora' must be true or false, got 'yes'"),
    ],
)
def test_load_peft_adapter_checks_its_config(tmp_path, cfg, pattern):
    """Each key of adapter_config.json that the scale is read from is checked: an error names the
    file, the key, the value and what is allowed (never a KeyError/ValueError traceback)."""
    if isinstance(cfg, dict):
        cfg = {"peft_type": "LORA", **cfg}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    w = {"base_model.model.m.lora_A.weight": torch.ones(2, 3), "base_model.model.m.lora_B.weight": torch.ones(4, 2)}
    save_file(w, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(MelboError, match=pattern) as e:
        load_peft_adapter(tmp_path)
    assert str(tmp_path / "adapter_config.json") in str(e.value)


@pytest.mark.parametrize("rslora, scale", [(False, 3 / 2), (True, 3 / 2**0.5)])
def test_load_peft_adapter_scale(tmp_path, rslora, scale):
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 3, "use_rslora": rslora})
    )
    w = {"base_model.model.m.lora_A.weight": torch.ones(2, 3), "base_model.model.m.lora_B.weight": torch.ones(4, 2)}
    save_file(w, str(tmp_path / "adapter_model.safetensors"))
    assert load_peft_adapter(tmp_path).scale == pytest.approx(scale)
