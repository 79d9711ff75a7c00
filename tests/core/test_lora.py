"""The adapter hook and the MLP-output finder (melbo.core.lora, METHOD.md section 2):
``W' = W + R · Ω_B Ω_Aᵀ`` applied as a forward hook, one adapter or one per group of rows."""

import functools

import pytest
import torch
from conftest import ARCHS, tiny_loaded
from torch.func import functional_call

from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig, generate, generate_rows
from melbo.core.lora import AdapterHook, apply_adapter, find_mlp_out, linear_dims, module_by_name
from melbo.core.prompts import encode_prompts
from melbo.methods.adapter import adapter_start, random_adapters

PROMPTS = ["Hello there, friend", "The cat sat"]
MOE = {"mixtral"}  # mixtures of experts have no single MLP output projection


@functools.cache
def lm_of(arch):
    """One tiny model per architecture for the whole module (adapter hooks are always removed)."""
    return tiny_loaded(arch)


def _start(mlp, V, rank, seed=0):
    pairs = [adapter_start(k, mlp.d_hidden, mlp.d_model, rank, seed) for k in range(V)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_find_mlp_out_all_archs(arch):
    lm = lm_of(arch)
    if arch in MOE:
        with pytest.raises(MelboError, match="cannot find the MLP output projection"):
            find_mlp_out(lm, 1)
        return
    mlp = find_mlp_out(lm, 1)
    assert mlp.d_model == lm.d_model
    assert mlp.full_name.endswith(mlp.path) and ".1." in mlp.full_name
    assert mlp.conv1d == (arch == "gpt2")
    assert module_by_name(lm, mlp.full_name) is mlp.module
    assert linear_dims(mlp.module) == (mlp.d_hidden, mlp.d_model, mlp.conv1d)


def test_find_mlp_out_override_and_errors():
    lm = lm_of("llama")
    assert find_mlp_out(lm, 0, "mlp.down_proj").path == "mlp.down_proj"
    with pytest.raises(MelboError, match="mlp.up_proj"):
        find_mlp_out(lm, 0, "mlp.up_proj")  # outputs d_hidden, not d_model
    with pytest.raises(MelboError, match="mlp.nope"):
        find_mlp_out(lm, 0, "mlp.nope")
    with pytest.raises(MelboError, match="does not have"):
        module_by_name(lm, "model.layers.9.mlp.down_proj")


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
        after = lm.model(input_ids=ids).logits
    assert torch.equal(ref, zero)
    assert (moved - ref).abs().max() > 1e-4
    assert torch.equal(ref, after)  # the hook is gone


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hook_equals_the_weight_perturbation(arch):
    """The hook is W' = W + R Ω_B Ω_Aᵀ substituted into the weight (Conv1D stores W transposed)."""
    lm = lm_of(arch)
    mlp = find_mlp_out(lm, 2)
    a, b = _start(mlp, 1, 3, seed=2)
    R = 1.3
    ids = encode_prompts(lm.tokenizer, PROMPTS[:1]).input_ids
    name = mlp.full_name + ".weight"
    W = dict(lm.model.named_parameters())[name]
    delta = R * b[0] @ a[0].T
    with torch.no_grad():
        want = functional_call(
            lm.model, {name: W + (delta.T if mlp.conv1d else delta)}, args=(), kwargs={"input_ids": ids}
        ).logits
        with AdapterHook(mlp.module, a[0], b[0], R):
            got = lm.model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_batched_hook_gives_each_group_of_rows_its_adapter():
    lm = lm_of("llama")
    mlp = find_mlp_out(lm, 1)
    a, b = _start(mlp, 3, 4)
    radii = torch.tensor([0.0, 1.5, 3.0])
    batch = encode_prompts(lm.tokenizer, PROMPTS)
    ids, att = batch.input_ids.repeat(3, 1), batch.attention_mask.repeat(3, 1)  # vector-major rows
    with torch.no_grad():
        with apply_adapter(mlp.module, a, b, radii):
            got = lm.model(input_ids=ids, attention_mask=att).logits.reshape(3, 2, *ids.shape[1:], -1)
        for v in range(3):
            with apply_adapter(mlp.module, a[v], b[v], float(radii[v])):
                one = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            torch.testing.assert_close(got[v], one, atol=1e-5, rtol=1e-5)
    with pytest.raises(MelboError, match="do not fit"):
        AdapterHook(mlp.module, a, b[0], 1.0)
    with pytest.raises(MelboError, match="cannot split a batch"), torch.no_grad(), apply_adapter(mlp.module, a, b):
        lm.model(input_ids=batch.input_ids)


def test_generate_with_adapters_batched():
    lm = lm_of("llama")
    mlp = find_mlp_out(lm, 1)
    a, b = random_adapters(3, mlp.d_hidden, mlp.d_model, 4, seed=1)
    cfg = GenerationConfig(max_new_tokens=6, batch_size=4)  # 2 adapters x 2 prompts per call
    radii = torch.tensor([0.0, 3.0, 3.0])
    comps = generate_rows(lm, PROMPTS, 3, lambda rows: apply_adapter(mlp.module, a[rows], b[rows], radii[rows]), cfg)
    assert comps[0] == generate(lm, PROMPTS, None, 1, 1.0, cfg)[0]
    with apply_adapter(mlp.module, a[2], b[2], 3.0):
        alone = generate(lm, PROMPTS, None, 1, 1.0, cfg)[0]
    assert comps[2] == alone
    assert comps[1] != comps[0]
