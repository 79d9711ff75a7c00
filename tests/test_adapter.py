"""Steering adapters (METHOD.md section 2): constraint, hook, fast pass vs a naive full-model
step, PEFT export, a whole run."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch.func import functional_call

from conftest import ARCHS, tiny_loaded, tiny_model
from melbo.adapter import (AdapterConfig, AdapterSlice, adapter_start, adapter_step, apply_adapter, find_mlp_out,
                           generate_with_adapters, load_adapters, load_peft_adapter, make_adapter_optimizer,
                           random_adapters, run_adapter_train, save_peft_adapter, train_adapters)
from melbo.errors import MelboError
from melbo.generate import GenerationConfig, generate
from melbo.prompts import encode_prompts

PROMPTS = ["Hello there, friend", "The cat sat"]


@functools.lru_cache(maxsize=None)
def lm_of(arch):
    """One tiny model per architecture for the whole module (adapter hooks are always removed)."""
    return tiny_loaded(arch)


def _start(mlp, V, rank, seed=0):
    pairs = [adapter_start(k, mlp.d_hidden, mlp.d_model, rank, seed) for k in range(V)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def test_find_mlp_out_all_archs():
    for arch in ARCHS:
        lm = lm_of(arch)
        mlp = find_mlp_out(lm, 1)
        assert mlp.d_model == lm.d_model
        assert mlp.full_name.endswith(mlp.path) and ".1." in mlp.full_name
        assert mlp.conv1d == (arch == "gpt2")


def test_find_mlp_out_override_and_errors():
    lm = lm_of("llama")
    assert find_mlp_out(lm, 0, "mlp.down_proj").path == "mlp.down_proj"
    with pytest.raises(MelboError, match="mlp.up_proj"):
        find_mlp_out(lm, 0, "mlp.up_proj")  # outputs d_hidden, not d_model
    with pytest.raises(MelboError, match="mlp.nope"):
        find_mlp_out(lm, 0, "mlp.nope")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zero_scale_adapter_leaves_logits(arch):
    lm = lm_of(arch)
    mlp = find_mlp_out(lm, 1)
    a, b = _start(mlp, 1, 4)
    ids = encode_prompts(lm.tokenizer, PROMPTS[:1]).input_ids
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits
        with apply_adapter(mlp.module, a[0], b[0], 0.0):
            zero = lm.model(input_ids=ids).logits
        with apply_adapter(mlp.module, a[0], b[0], 2.0):
            moved = lm.model(input_ids=ids).logits
    assert torch.equal(ref, zero)
    assert (moved - ref).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_adapter_slice_matches_full_model(arch):
    """The fast pass (block src from captured inputs, then the core Slice) for V adapters at once
    equals h_tgt of a full forward with each adapter hooked in."""
    lm = lm_of(arch)
    src, tgt = 1, 2
    batch = encode_prompts(lm.tokenizer, PROMPTS, "last:3")
    aslice = AdapterSlice(lm, batch, src, tgt)
    a, b = _start(aslice.mlp, 3, 4)
    with torch.no_grad():
        fast = aslice(a, b, 1.5)
        for v in range(3):
            with apply_adapter(aslice.mlp.module, a[v], b[v], 1.5):
                hs = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              output_hidden_states=True).hidden_states[tgt + 1]
            m = batch.attention_mask.bool()
            assert torch.allclose(fast[v][m], hs[m], atol=1e-5)


def test_constraints_hold_after_training():
    arch = "llama"
    lm = lm_of(arch)
    aslice = AdapterSlice(lm, encode_prompts(lm.tokenizer, PROMPTS), 1, 3)
    cfg = AdapterConfig(radius=0.5, num_vectors=3, steps=6, rank=5, batch=2, lr=0.05)
    res = train_adapters(aslice, cfg, show_progress=False)
    assert len(res) == 3
    for r in res:
        assert r.omega_a.shape == (aslice.mlp.d_hidden, 5) and r.omega_b.shape == (lm.d_model, 5)
        assert torch.allclose(r.omega_a.norm(dim=1), torch.ones(aslice.mlp.d_hidden), atol=1e-5)
        assert torch.allclose(r.omega_b.norm(dim=0), torch.ones(5), atol=1e-5)
        assert r.cosine_start_end < 0.9999
        assert r.objective > r.start_objective
    # batching is only for speed: adapter 2 trained in a batch of 3 ends where it did in a batch of 1
    solo = train_adapters(aslice, AdapterConfig(radius=0.5, num_vectors=3, steps=6, rank=5, batch=3, lr=0.05),
                          show_progress=False)
    assert torch.allclose(solo[2].omega_b, res[2].omega_b, atol=1e-4)


# ------------------------------------------------------------ a naive, literal METHOD.md step

def _naive_objective(lm, mlp, batch, a, b, R, tgt, p, q):
    """Full model, W' = W + R Ω_B Ω_Aᵀ substituted into the weight, Σ_i (Σ_t ‖Z − Z0‖^p)^(1/q)
    with explicit loops."""
    name = mlp.full_name + ".weight"
    W = dict(lm.model.named_parameters())[name]
    delta = R * b @ a.T  # [d_model, d_hidden]
    if mlp.conv1d:
        delta = delta.T
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    z = functional_call(lm.model, {name: W + delta}, args=(), kwargs=inputs).hidden_states[tgt + 1]
    with torch.no_grad():
        z0 = lm.model(**inputs).hidden_states[tgt + 1]
    total = 0.0
    for i in range(z.shape[0]):
        s = 0.0
        for t in range(z.shape[1]):
            if batch.target_mask[i, t]:
                s = s + (z[i, t] - z0[i, t]).norm() ** p
        total = total + s ** (1.0 / q)
    return total


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_step_matches_naive_step(arch):
    lm = lm_of(arch)
    src, tgt, R = 1, 2, 0.8
    batch = encode_prompts(lm.tokenizer, PROMPTS, "last:4")
    aslice = AdapterSlice(lm, batch, src, tgt)
    mlp = aslice.mlp
    cfg = AdapterConfig(radius=R, p=2.0, q=2.0, num_vectors=1, steps=3, rank=3, lr=0.02)
    a0, b0 = _start(mlp, 1, 3, seed=5)

    a = a0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    opt = make_adapter_optimizer([a, b], cfg, lm.d_model)
    fast_obj = [adapter_step(aslice, a, b, opt, cfg).item() for _ in range(3)]

    na = a0[0].clone().requires_grad_(True)
    nb = b0[0].clone().requires_grad_(True)
    nopt = torch.optim.AdamW([na, nb], lr=0.02, betas=(0.9, 0.98), weight_decay=0.0, amsgrad=True)
    naive_obj = []
    for _ in range(3):
        nopt.zero_grad()
        obj = _naive_objective(lm, mlp, batch, na, nb, R, tgt, 2.0, 2.0)
        (-obj).backward()
        naive_obj.append(obj.item())
        with torch.no_grad():
            for j in range(na.shape[0]):  # each row of Ω_A: tangent space of its unit sphere
                na.grad[j] -= (na.grad[j] @ na[j]) * na[j]
            for j in range(nb.shape[1]):  # each column of Ω_B
                nb.grad[:, j] -= (nb.grad[:, j] @ nb[:, j]) * nb[:, j]
        nopt.step()
        with torch.no_grad():
            na /= na.norm(dim=1, keepdim=True)
            nb /= nb.norm(dim=0, keepdim=True)
    assert fast_obj == pytest.approx(naive_obj, rel=1e-4, abs=1e-6)
    assert torch.allclose(a.detach()[0], na.detach(), atol=1e-4)
    assert torch.allclose(b.detach()[0], nb.detach(), atol=1e-4)


# ------------------------------------------------------------ PEFT export

@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_peft_roundtrip_same_logits(arch, tmp_path):
    from peft import PeftModel

    lm = lm_of(arch)
    mlp = find_mlp_out(lm, 2)
    a, b = _start(mlp, 1, 6, seed=3)
    R = 1.7
    folder = save_peft_adapter(tmp_path / "ad", lm, mlp, a[0], b[0], R, {"index": 0})
    ids = encode_prompts(lm.tokenizer, PROMPTS[:1]).input_ids
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits
        with apply_adapter(mlp.module, a[0], b[0], R):
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
    assert torch.allclose(loaded.omega_b / R, b[0], atol=1e-6)


def test_load_peft_adapter_errors(tmp_path):
    with pytest.raises(MelboError, match="not a PEFT adapter folder"):
        load_peft_adapter(tmp_path)


# ------------------------------------------------------------ generation and a whole run

def test_generate_with_adapters_batched():
    lm = lm_of("llama")
    mlp = find_mlp_out(lm, 1)
    a, b = random_adapters(3, mlp.d_hidden, mlp.d_model, 4, seed=1)
    cfg = GenerationConfig(max_new_tokens=6, batch_size=4)  # 2 adapters x 2 prompts per call
    radii = torch.tensor([0.0, 3.0, 3.0])
    comps = generate_with_adapters(lm, PROMPTS, mlp.module, a, b, radii, cfg)
    assert comps[0] == generate(lm, PROMPTS, None, 1, 1.0, cfg)[0]
    with apply_adapter(mlp.module, a[2], b[2], 3.0):
        alone = generate(lm, PROMPTS, None, 1, 1.0, cfg)[0]
    assert comps[2] == alone


def test_run_adapter_train(tmp_path):
    from melbo.run import RunSpec

    lm = lm_of("llama")
    spec = RunSpec(model="tiny-llama", prompts=["Hello there"], out=str(tmp_path / "run"), radius="0.5x",
                   source_layer=1, target_layer=3, num_vectors=3, steps=4, heldout=["Bye"],
                   generation=GenerationConfig(max_new_tokens=5), show_progress=False)
    summary = run_adapter_train(spec, rank=4, batch=2, lm=lm)
    run = tmp_path / "run"
    tensors, meta = load_adapters(run)
    assert meta["kind"] == "adapter" and meta["rank"] == 4 and len(meta["vectors"]) == 3
    assert tensors["omega_a"].shape == (3, 64, 4) and tensors["random_omega_b"].shape == (3, 32, 4)
    assert summary["learned"]["n"] == 3 and summary["random"]["n"] == 3
    # "0.5x": the random starts add half the residual norm to the MLP output on average
    assert summary["mean_random_perturbation_norm"] == pytest.approx(0.5 * summary["residual_norm"], rel=0.3)
    rows = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 + 2 * 3 * 2
    assert (run / "summary.md").read_text().startswith("# melbo adapter run")
    loaded = load_peft_adapter(run / "peft" / "adapter_002")
    assert torch.allclose(loaded.omega_a, tensors["omega_a"][2], atol=1e-6)
    with pytest.raises(MelboError, match="already holds a run"):
        run_adapter_train(spec, rank=4, lm=lm)


# ------------------------------------------------------------ the CLI

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from conftest import char_tokenizer

    d = tmp_path_factory.mktemp("tiny-llama-adapter")
    tiny_model("llama").save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return str(d)


def _run(argv, capsys):
    from melbo.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_train_adapter_and_generate(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--kind", "adapter", "--model", model_dir, "--prompt", "The cat sat.", "--num-vectors", "2",
            "--steps", "3", "--radius", "0.05x", "--rank", "4", "--max-new-tokens", "5", "--device", "cpu"]
    code, stdout, err = _run(base + ["--out", str(out)], capsys)
    assert code == 0, err
    assert "PEFT LoRA folders" in stdout and (out / "peft" / "adapter_001" / "adapter_config.json").is_file()
    gen = ["generate", "--prompt", "A dog", "--max-new-tokens", "4", "--device", "cpu"]
    code, stdout, err = _run(gen + ["--adapter", str(out / "peft" / "adapter_001")], capsys)
    assert code == 0, err
    assert "--- unsteered:" in stdout and "--- adapter adapter_001" in stdout
    code, stdout, err = _run(gen + ["--adapter", str(out), "--vectors", "1", "--random", "--scale", "2"], capsys)
    assert code == 0, err
    assert "--- random adapter 1" in stdout
    code, _, err = _run(gen + ["--adapter", str(out), "--bank", str(out / "x")], capsys)
    assert code == 2 and "exactly one of --bank" in err
    code, _, err = _run(gen + ["--adapter", str(out), "--rescale", "3"], capsys)
    assert code == 2 and "not to adapters" in err
    code, _, err = _run(base + ["--out", str(tmp_path / "r2"), "--method", "dct"], capsys)
    assert code == 2 and "--kind adapter" in err and not (tmp_path / "r2").exists()
    code, _, err = _run(base + ["--out", str(tmp_path / "r3"), "--mlp-module", "mlp.gate_proj"], capsys)
    assert code == 2 and "mlp.gate_proj" in err
