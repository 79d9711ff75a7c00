"""Steering adapters (melbo.methods.adapter, METHOD.md section 2): the truncated pass against the
full model, the constraint, the fast step against a naive full-model step, a whole run."""

import functools
import json

import pytest
import torch
from conftest import tiny_loaded
from naive import naive_adapter_objective

import melbo
from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig, generate
from melbo.core.lora import apply_adapter
from melbo.core.peft import load_peft_adapter
from melbo.core.prompts import encode_prompts
from melbo.methods.adapter import (
    AdapterMethod,
    AdapterSettings,
    AdapterSlice,
    adapter_objective,
    adapter_start,
    adapter_step,
    random_adapters,
)
from melbo.methods.base import Context, Fit, make_settings
from melbo.methods.melbo_train import BETAS

PROMPTS = ["Hello there, friend", "The cat sat"]


@functools.cache
def lm_of(arch):
    """One tiny model per architecture for the whole module (adapter hooks are always removed)."""
    return tiny_loaded(arch)


def _start(mlp, V, rank, seed=0):
    pairs = [adapter_start(k, mlp.d_hidden, mlp.d_model, rank, seed) for k in range(V)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def make_method(lm, src, tgt, positions="all", **overrides):
    s = make_settings("adapter", AdapterSettings, {"positions": positions, **overrides})
    batch = encode_prompts(lm.tokenizer, PROMPTS, s.positions)
    return AdapterMethod(Context(lm, batch, src, tgt, s, show_progress=False))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_adapter_slice_matches_full_model(arch):
    """The fast pass (block src from captured inputs, then the core Slice) for V adapters at once
    equals h_tgt of a full forward with each adapter hooked in."""
    lm = lm_of(arch)
    src, tgt = 1, 2
    batch = encode_prompts(lm.tokenizer, PROMPTS, "last:3")
    aslice = AdapterSlice(lm, batch, src, tgt)
    a, b = _start(aslice.mlp, 3, 4)
    m = batch.attention_mask.bool()
    with torch.no_grad():
        fast = aslice(a, b, 1.5)
        for v in range(3):
            with apply_adapter(aslice.mlp.module, a[v], b[v], 1.5):
                hs = lm.model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
                ).hidden_states[tgt + 1]
            assert torch.allclose(fast[v][m], hs[m], atol=1e-5)
        z0 = lm.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
        ).hidden_states[tgt + 1]
    assert torch.allclose(aslice.z0[m], z0[m], atol=1e-5)
    assert torch.equal(aslice.mask, batch.target_mask)


def test_constraints_hold_after_training():
    lm = lm_of("llama")
    m = make_method(lm, 1, 3, radius=0.5, num_vectors=3, steps=6, rank=5, batch=2, lr=0.05)
    fit = m.fit(None, None)
    h = m.mlp.d_hidden
    assert len(fit) == 3 and fit.tensors["omega_a"].shape == (3, h, 5)
    assert fit.tensors["omega_b"].shape == (3, lm.d_model, 5)
    for k, row in enumerate(fit.info):
        a, b = fit.tensors["omega_a"][k], fit.tensors["omega_b"][k]
        assert torch.allclose(a.norm(dim=1), torch.ones(h), atol=1e-5)
        assert torch.allclose(b.norm(dim=0), torch.ones(5), atol=1e-5)
        assert row["cosine_start_end"] < 0.9999
        assert row["objective"] > row["start_objective"]
        s0 = m.start(k)
        assert torch.equal(fit.tensors["start_omega_a"][k], s0[0])
        assert torch.equal(fit.tensors["start_omega_b"][k], s0[1])
    # batching is only for speed: adapter 2 trained in a batch of 3 ends where it did in a batch of 1
    solo = make_method(lm, 1, 3, radius=0.5, num_vectors=3, steps=6, rank=5, batch=3, lr=0.05).fit(None, None)
    assert torch.allclose(solo.tensors["omega_b"][2], fit.tensors["omega_b"][2], atol=1e-4)
    assert m.objectives(fit.tensors) == pytest.approx([r["objective"] for r in fit.info], rel=1e-5)


def test_resume_continues_per_batch():
    lm = lm_of("llama")
    kw = dict(radius=0.5, steps=4, rank=3, batch=2, lr=0.05)
    full = make_method(lm, 1, 3, num_vectors=4, **kw).fit(None, None)
    part = make_method(lm, 1, 3, num_vectors=2, **kw).fit(None, None)
    calls = []
    rest = make_method(lm, 1, 3, num_vectors=4, **kw).fit(Fit(part.tensors, part.info), lambda f: calls.append(len(f)))
    assert calls == [4]
    for name in ("omega_a", "omega_b", "start_omega_a"):
        torch.testing.assert_close(rest.tensors[name], full.tensors[name], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------ a naive, literal METHOD.md step


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_step_matches_naive_step(arch):
    lm = lm_of(arch)
    src, tgt, R, lr = 1, 2, 0.8, 0.02
    batch = encode_prompts(lm.tokenizer, PROMPTS, "last:4")
    aslice = AdapterSlice(lm, batch, src, tgt)
    mlp = aslice.mlp
    a0, b0 = _start(mlp, 1, 3, seed=5)

    a = a0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([a, b], lr=lr, betas=BETAS, weight_decay=0.0, amsgrad=True)
    fast_obj = [adapter_step(aslice, a, b, opt, R, 2.0, 2.0).item() for _ in range(3)]

    na = a0[0].clone().requires_grad_(True)
    nb = b0[0].clone().requires_grad_(True)
    nopt = torch.optim.AdamW([na, nb], lr=lr, betas=(0.9, 0.98), weight_decay=0.0, amsgrad=True)
    naive_obj = []
    for _ in range(3):
        nopt.zero_grad()
        obj = naive_adapter_objective(lm, mlp, batch, na, nb, R, tgt, 2.0, 2.0)
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
    with torch.no_grad():
        end = adapter_objective(aslice, a, b, R, 2.0, 2.0).item()
        assert end == pytest.approx(naive_adapter_objective(lm, mlp, batch, na, nb, R, tgt, 2.0, 2.0).item(), rel=1e-4)


# ------------------------------------------------------------ settings and a whole run


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("radius", "calibrate", "not available for adapters"),
        ("rank", 0, "adapter rank"),
        ("batch", 0, "adapter batch"),
        ("steps", -1, "steps"),
        ("lr", -1.0, "learning rate"),
    ],
)
def test_bad_settings(field, value, match):
    with pytest.raises(MelboError, match=match):
        make_settings("adapter", AdapterSettings, {field: value})


def test_train_adapter_run(tmp_path):
    lm = lm_of("llama")
    run = tmp_path / "run"
    kw = dict(
        radius="0.5x",
        source_layer=1,
        target_layer=3,
        num_vectors=3,
        steps=4,
        rank=4,
        batch=2,
        heldout=["Bye"],
        generation=GenerationConfig(max_new_tokens=5),
        show_progress=False,
    )
    bank = melbo.train(lm, ["Hello there"], "adapter", out=run, **kw)
    saved = melbo.Bank.load(run)
    meta = saved.meta
    assert saved.kind == "adapter" and meta["rank"] == 4 and len(meta["vectors"]) == 3 and meta["complete"]
    assert saved.tensors["omega_a"].shape == (3, 64, 4) and saved.tensors["random_omega_b"].shape == (3, 32, 4)
    ev = bank.evaluation
    assert ev["learned"]["n"] == 3 and ev["random"]["n"] == 3
    # "0.5x": the learned starts add half the (median) residual norm to the MLP output on average,
    # and the random baseline (other draws at the same R) about as much
    starts = [r["start_perturbation_norm"] for r in meta["vectors"]]
    assert sum(starts) / 3 == pytest.approx(0.5 * meta["residual_norm"], rel=1e-4)
    rnd = meta["random_perturbation_norms"]
    assert sum(rnd) / len(rnd) == pytest.approx(0.5 * meta["residual_norm"], rel=0.3)
    rows = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 + 2 * 3 * 2
    assert (run / "summary.md").read_text().startswith("# melbo run: steering adapters")
    loaded = load_peft_adapter(run / "peft" / "adapter_002")
    assert torch.allclose(loaded.omega_a, saved.tensors["omega_a"][2], atol=1e-6)
    assert torch.allclose(loaded.omega_b, meta["radius"] * saved.tensors["omega_b"][2], atol=1e-6)
    assert not (run / "adapters.safetensors").exists()
    with pytest.raises(MelboError, match="already holds a run"):
        melbo.train(lm, ["Hello there"], "adapter", out=run, **kw)


def test_adapter_bank_generates_batched_like_one_at_a_time():
    lm = lm_of("llama")
    bank = melbo.train(
        lm,
        PROMPTS,
        "adapter",
        radius=3.0,
        source_layer=1,
        target_layer=3,
        num_vectors=3,
        steps=2,
        rank=4,
        show_progress=False,
    )
    comps = bank.generate(PROMPTS, max_new_tokens=6, batch_size=4)  # 2 rows of (adapter, prompt) per call
    assert list(comps) == ["unsteered", "adapter 0", "adapter 1", "adapter 2"]
    cfg = GenerationConfig(max_new_tokens=6)
    assert comps["unsteered"] == generate(lm, PROMPTS, None, 1, 1.0, cfg)[0]
    with bank[2].apply(lm):
        alone = generate(lm, PROMPTS, None, 1, 1.0, cfg)[0]
    assert comps["adapter 2"] == alone
    a, b = random_adapters(3, bank.tensors["omega_a"].shape[1], lm.d_model, 4, seed=0)
    torch.testing.assert_close(bank.tensors["random_omega_a"], a)
    torch.testing.assert_close(bank.tensors["random_omega_b"], b)
    rnd = bank.generate(PROMPTS, vectors=[1], random=True, scale=2.0, unsteered=False, max_new_tokens=6)
    with bank.random[1].apply(lm, scale=2.0):
        assert rnd == {"random adapter 1": generate(lm, PROMPTS, None, 1, 1.0, cfg)[0]}


def test_bad_mlp_module_is_refused_before_anything_is_written(tmp_path):
    lm = lm_of("llama")
    with pytest.raises(MelboError, match="mlp.gate_proj"):
        melbo.train(lm, PROMPTS, "adapter", mlp_module="mlp.gate_proj", out=tmp_path / "r", show_progress=False)
    assert not (tmp_path / "r").exists()


def test_product_cosine_equals_the_explicit_products():
    from melbo.methods.adapter import _product_cosine

    g = torch.Generator().manual_seed(0)
    a0, a1 = torch.randn(3, 7, 2, generator=g), torch.randn(3, 7, 2, generator=g)
    b0, b1 = torch.randn(3, 5, 2, generator=g), torch.randn(3, 5, 2, generator=g)
    p0 = torch.einsum("vdr,vhr->vdh", b0.double(), a0.double()).flatten(1)
    p1 = torch.einsum("vdr,vhr->vdh", b1.double(), a1.double()).flatten(1)
    assert torch.allclose(_product_cosine(a0, b0, a1, b1), torch.nn.functional.cosine_similarity(p0, p1, dim=1))
    assert torch.allclose(_product_cosine(a0, b0, a0, b0), torch.ones(3, dtype=torch.float64))
