"""The negative-control panel (melbo.eval.controls, control_stats, panel): parsing, the noise
controls' sizes, weight restore, temperature sampling, matched budgets, the Fisher test, and the
wiring into `melbo train --controls` and `melbo bench backdoor --controls`."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from conftest import shared_model_path, tiny_loaded

import melbo
from melbo.cli import main
from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig, generate_rows
from melbo.eval import controls as ctl
from melbo.eval.control_stats import Completion, changed, control_table, fisher_vs_control, hits_of
from melbo.eval.controls import (
    ALL,
    CHEAP,
    CONTROLS,
    NoiseHandle,
    effect_size,
    parse_controls,
    run_controls,
    weight_noise,
)
from melbo.planted.bench import run_bench
from melbo.planted.bench_config import BenchSetting
from melbo.planted.fixtures import load_planted_lm

PROMPTS = ["Hello there.", "A cat sat."]
GEN = GenerationConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def lm():
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def vector_bank(lm):
    return melbo.train(lm, PROMPTS, num_vectors=3, steps=2, radius="3", evaluate=False, show_progress=False)


@pytest.fixture(scope="module")
def adapter_bank(lm):
    return melbo.train(
        lm, PROMPTS, "adapter", num_vectors=3, steps=2, rank=2, radius="1x", evaluate=False, show_progress=False
    )


# ---------------------------------------------------------------- names


def test_parse_controls_keywords_lists_and_refusals():
    assert parse_controls("cheap").names == CHEAP and parse_controls("all").names == ALL == CONTROLS
    assert parse_controls(" weight-noise , temperature-1.0").names == ("weight-noise", "temperature-1.0")
    assert parse_controls(["temperature-1.5", "random-vectors"]).names == ("random-vectors", "temperature-1.5")
    # cheap and all skip what does not apply to the bank's kind; a named control is refused
    assert parse_controls("cheap").for_kind("vector") == ("random-vectors", "temperature-1.0", "temperature-1.5")
    assert parse_controls("cheap").for_kind("adapter") == ("random-adapters", "temperature-1.0", "temperature-1.5")
    with pytest.raises(MelboError, match="'random-adapters' does not apply to vector banks; allowed for vector"):
        parse_controls("random-adapters").for_kind("vector")
    for bad, named in (("noise", "'noise'"), ("cheap,temperature-2", "'cheap'"), ("", "an empty name"), ("a,,b", "")):
        with pytest.raises(MelboError, match="allowed: cheap, all, or a comma list of random-vectors") as e:
            parse_controls(bad)
        assert named in str(e.value)


# ---------------------------------------------------------------- activation noise


def _block_outputs(lm, layer: int, ids: torch.Tensor, noise: NoiseHandle | None) -> torch.Tensor:
    """The output of block ``layer`` (after any noise hook, which was registered first)."""
    seen = []
    cap = lm.blocks[layer].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            lm.model(input_ids=ids)
    finally:
        cap.remove()
        if noise is not None:
            noise.remove()
    return seen[0]


def test_activation_noise_has_the_stated_norm_per_position_and_is_fresh(lm):
    layer, R = 1, 3.0
    sigma = R / math.sqrt(lm.d_model)
    ids = torch.randint(4, 100, (8, 25), generator=torch.Generator().manual_seed(0))
    clean = _block_outputs(lm, layer, ids, None)

    def noisy(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return _block_outputs(lm, layer, ids, NoiseHandle(lm.blocks[layer], sigma, g)) - clean

    added = noisy(0)
    sq = added.double().pow(2).sum(-1)  # [8, 25] squared norm of the added vector at each position
    assert (sq > 0).all()
    assert abs(float(sq.mean()) / R**2 - 1) < 0.1  # E‖ε‖² = R² (200 positions, sd of the mean ≈ 0.04)
    # fresh: another pass (a fresh generator stream) adds other vectors; the same seed the same ones
    g = torch.Generator().manual_seed(0)
    h = NoiseHandle(lm.blocks[layer], sigma, g)
    first = _block_outputs(lm, layer, ids, None)  # the hook is still attached here
    second = _block_outputs(lm, layer, ids, h)
    assert not torch.allclose(first - clean, second - clean)
    assert torch.allclose(first - clean, added, atol=1e-6)
    # after remove(), the block is clean again
    assert torch.equal(_block_outputs(lm, layer, ids, None), clean)


def test_activation_noise_is_fresh_for_every_generated_token(lm):
    sigma = 0.5
    block = lm.blocks[1]
    clean, noisy = [], []
    pre = block.register_forward_hook(lambda m, a, o: clean.append(o[0] if isinstance(o, tuple) else o))
    h = NoiseHandle(block, sigma, torch.Generator().manual_seed(1))
    post = block.register_forward_hook(lambda m, a, o: noisy.append(o[0] if isinstance(o, tuple) else o))
    try:
        generate_rows(lm, ["Hi"], 1, lambda rows: nullcontext(), GenerationConfig(max_new_tokens=5))
    finally:
        for hook in (pre, h, post):
            hook.remove()
    added = [n - c for n, c in zip(noisy, clean)]
    assert len(added) == 5 and all(a.shape[1] == 1 for a in added[1:])  # the prompt, then one call per token
    vecs = torch.cat([a.reshape(-1, lm.d_model) for a in added]).double()
    assert (vecs.norm(dim=-1) > 0).all()
    assert abs(float(vecs.pow(2).sum(-1).mean()) / (sigma**2 * lm.d_model) - 1) < 0.35
    for i in range(1, 5):  # each generated token got its own draw
        for j in range(i + 1, 5):
            assert not torch.allclose(added[i], added[j])


# ---------------------------------------------------------------- weight noise


def test_weight_noise_has_the_stated_frobenius_norm_and_restores_bit_exactly(lm):
    block = lm.blocks[2]
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    own = {n: p.detach().clone() for n, p in block.named_parameters()}
    rel = 0.07
    with weight_noise(block, rel, seed=5) as norms:
        mats = {n: p for n, p in block.named_parameters() if p.dim() == 2}
        assert set(norms) == set(mats) and len(mats) >= 4
        for name, p in mats.items():
            delta = (p.detach().double() - own[name].double()).norm()
            want = rel * own[name].double().norm()
            assert abs(float(delta / want) - 1) < 1e-5 and abs(norms[name] / float(want) - 1) < 1e-9
        for name, p in block.named_parameters():
            if p.dim() != 2:
                assert torch.equal(p, own[name])  # norms' weights and biases untouched
        changed_names = [n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])]
        assert len(changed_names) == len(mats)  # only this block's matrices
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]), n  # bit-exact
    with pytest.raises(RuntimeError, match="boom"), weight_noise(block, 0.5, seed=1):
        raise RuntimeError("boom")
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    with pytest.raises(MelboError, match="relative weight-noise size must be"):
        with weight_noise(block, -1.0, seed=1):
            pass


# ---------------------------------------------------------------- temperature, budgets, determinism


def test_temperature_samples_differ_across_seeds_and_tiny_temperature_is_greedy(lm, vector_bank, monkeypatch):
    a = run_controls(lm, vector_bank, PROMPTS, GEN, "temperature-1.0", seed=0)["temperature-1.0"]
    b = run_controls(lm, vector_bank, PROMPTS, GEN, "temperature-1.0", seed=1)["temperature-1.0"]
    assert a != b
    assert a == run_controls(lm, vector_bank, PROMPTS, GEN, "temperature-1.0", seed=0)["temperature-1.0"]
    assert len({c[0] for c in a}) > 1  # samples differ from each other too
    monkeypatch.setitem(ctl.TEMPERATURES, "temperature-1.5", 1e-6)
    greedy = generate_rows(lm, PROMPTS, 1, lambda rows: nullcontext(), GEN)[0]
    cold = run_controls(lm, vector_bank, PROMPTS, GEN, "temperature-1.5", seed=3)["temperature-1.5"]
    assert cold == [greedy] * len(vector_bank)


def test_budgets_are_matched_deterministic_and_weights_left_alone(lm, vector_bank):
    state = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    out = run_controls(lm, vector_bank, PROMPTS, GEN, "all", seed=2, count=2)
    assert list(out) == ["random-vectors", "activation-noise", "weight-noise", "temperature-1.0", "temperature-1.5"]
    for comps in out.values():
        assert len(comps) == 2 and all(len(c) == len(PROMPTS) for c in comps)
    assert out == run_controls(lm, vector_bank, PROMPTS, GEN, "all", seed=2, count=2)
    assert all(torch.equal(p, state[n]) for n, p in lm.model.named_parameters())
    # random-vectors are the bank's random baseline
    assert (
        out["random-vectors"]
        == list(vector_bank.generate(PROMPTS, random=True, unsteered=False, max_new_tokens=6).values())[:2]
    )
    assert effect_size(vector_bank) == pytest.approx(3.0, rel=1e-5)
    # the noise controls do perturb: at 10 times the size, some completion moves off the greedy one
    greedy = generate_rows(lm, PROMPTS, 1, lambda rows: nullcontext(), GEN)[0]
    loud = run_controls(lm, vector_bank, PROMPTS, GEN, "activation-noise,weight-noise", seed=2, scale=10.0)
    assert all(any(c != greedy for c in comps) for comps in loud.values())


def test_random_adapters_match_each_learned_adapters_frobenius_norm(lm, adapter_bank):
    out = run_controls(lm, adapter_bank, PROMPTS, GEN, "cheap", seed=0)
    assert list(out) == ["random-adapters", "temperature-1.0", "temperature-1.5"]
    assert all(len(c) == len(adapter_bank) for c in out.values())
    rand = adapter_bank.random
    radii = ctl._adapter_radii(adapter_bank, rand, len(adapter_bank))
    R = float(adapter_bank.meta["radius"])
    for j in range(len(adapter_bank)):
        learned = R * adapter_bank.tensors["omega_b"][j].double() @ adapter_bank.tensors["omega_a"][j].double().T
        random_ = float(radii[j]) * rand.tensors["omega_b"][j].double() @ rand.tensors["omega_a"][j].double().T
        assert float(random_.norm()) == pytest.approx(float(learned.norm()), rel=1e-5)
    with pytest.raises(MelboError, match="'random-vectors' does not apply to adapter banks"):
        run_controls(lm, adapter_bank, PROMPTS, GEN, "random-vectors")


# ---------------------------------------------------------------- statistics


def _hypergeometric_p(a: int, n1: int, c: int, n2: int) -> float:
    """P(X >= a), X the learned hits among all K = a + c hits when n1 of N = n1 + n2 trials are learned."""
    K, N = a + c, n1 + n2
    return sum(math.comb(K, x) * math.comb(N - K, n1 - x) for x in range(a, min(K, n1) + 1)) / math.comb(N, n1)


@pytest.mark.parametrize("a,n1,c,n2", [(6, 8, 2, 8), (0, 8, 0, 8), (5, 10, 9, 10), (30, 40, 12, 50), (1, 1, 0, 3)])
def test_fisher_p_value_is_the_hypergeometric_tail(a, n1, c, n2):
    assert fisher_vs_control(a, n1, c, n2) == pytest.approx(_hypergeometric_p(a, n1, c, n2), rel=1e-9, abs=1e-12)


def test_fisher_refuses_bad_counts_and_the_table_compares_each_control():
    with pytest.raises(MelboError, match="learned hits"):
        fisher_vs_control(9, 8, 0, 8)
    with pytest.raises(MelboError, match="control completions"):
        fisher_vs_control(1, 8, 0, 0)
    rows = control_table([True] * 6 + [False] * 2, {"a": [True, False] * 4, "b": [False] * 5})
    assert [r["group"] for r in rows] == ["learned", "a", "b"] and rows[0]["p_value"] is None
    assert (rows[1]["hits"], rows[1]["n"], rows[2]["hits"], rows[2]["n"]) == (4, 8, 0, 5)
    assert rows[2]["p_value"] == pytest.approx(_hypergeometric_p(6, 8, 0, 5))
    hits = hits_of(changed, ["p", "q"], ["x", "y"], [["x", "z"], ["w", "y"]])
    assert hits == [[False, True], [True, False]]
    assert changed([Completion("p", "a", "a")]) == [False]


# ---------------------------------------------------------------- wiring


def test_train_with_controls_writes_jsonl_and_the_table(lm, tmp_path):
    out = tmp_path / "run"
    bank = melbo.train(
        lm,
        PROMPTS[0],
        out=out,
        num_vectors=3,
        steps=2,
        radius="3",
        heldout=[PROMPTS[1]],
        generation=GEN,
        show_progress=False,
        controls="all",
        control_predicate=changed,
    )
    table = bank.evaluation["controls"]
    assert table["predicate"] == "changed" and table["budget"] == 3
    rows = [json.loads(x) for x in (out / "controls.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 3 * 2 and {r["split"] for r in rows} == {"train", "heldout"}
    # the learned and random-vectors hits are the `changed` flags of completions.jsonl
    comp = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    by = {r["group"]: r for r in table["rows"]}
    assert by["learned"]["hits"] == sum(r["changed"] for r in comp if r["kind"] == "learned")
    assert by["random-vectors"]["hits"] == sum(r["changed"] for r in comp if r["kind"] == "random")
    assert all(r["n"] == 6 for r in table["rows"])
    assert by["weight-noise"]["hits"] == sum(r["hit"] for r in rows if r["control"] == "weight-noise")
    assert json.loads((out / "summary.json").read_text())["controls"]["rows"] == table["rows"]
    assert "## Learned vs controls" in (out / "summary.md").read_text()
    with pytest.raises(MelboError, match="controls are compared on completions"):
        melbo.train(lm, PROMPTS[0], num_vectors=1, steps=1, radius="3", evaluate=False, controls="cheap")


def test_cli_refuses_bad_controls_with_exit_2(tmp_path, capsys):
    for args, message in [
        (["--controls", "bogus"], "unknown control 'bogus' in 'bogus'; allowed: cheap, all, or a comma list of"),
        (["--controls", "cheap,wat"], "unknown control 'cheap'"),
        (["--controls", "random-adapters"], "'random-adapters' does not apply to vector banks"),
        (["--method", "adapter", "--controls", "random-vectors"], "'random-vectors' does not apply to adapter"),
    ]:
        out = tmp_path / "o"
        with pytest.raises(SystemExit) as e:
            main(["train", "--model", str(tmp_path / "no-model"), "--prompt", "Hi", "--out", str(out), *args])
        assert e.value.code == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    with pytest.raises(SystemExit) as e:
        main(["bench", "backdoor", "--model", str(tmp_path), "--controls", "x", "--out", str(tmp_path / "b")])
    assert e.value.code == 2 and "unknown control 'x'" in capsys.readouterr().err


def test_bench_backdoor_controls_on_the_shipped_planted_model(tmp_path):
    folder = Path(melbo.__file__).parent / "data" / "planted-default"
    if not (folder / "config.json").is_file():
        pytest.skip(f"the shipped planted model is not at {folder}")
    plm, spec = load_planted_lm(folder)
    s = BenchSetting(method="melbo", num_vectors=2, steps=2, radius="1x", scales=(1.0, 3.0))
    rep = run_bench(
        plm, spec, s, gen=GenerationConfig(max_new_tokens=8), n_general=2, out=tmp_path / "b", controls="all"
    )
    c = rep["controls"]
    learned_labels = [r["label"] for rs in rep["completions"]["learned"] for r in rs]
    by = {r["group"]: r for r in c["rows"]}
    assert by["learned"]["n"] == len(learned_labels) == 2 * 1 * 2
    assert by["learned"]["hits"] == sum(lab.startswith("backdoor:") for lab in learned_labels)
    assert set(by) == {
        "learned",
        "random-vectors",
        "activation-noise",
        "weight-noise",
        "temperature-1.0",
        "temperature-1.5",
    }
    for name, recs in c["completions"].items():
        assert by[name]["n"] == len(recs) == 4 and by[name]["hits"] == sum(
            r["label"].startswith("backdoor:") for r in recs
        )
        assert 0 <= by[name]["recall"] <= 1
    assert "## Learned vs controls" in (tmp_path / "b" / "bench.md").read_text()


def test_real_model_cli_run_prints_the_table(tmp_path, capsys):
    model = shared_model_path("stories260k")
    out = tmp_path / "lily"
    argv = ["train", "--model", str(model), "--prompt", "Once upon a time, there was a little girl named Lily."]
    argv += ["--radius", "0.04x", "--num-vectors", "2", "--steps", "10", "--max-new-tokens", "12", "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--controls"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "| random-vectors |" in printed and "| temperature-1.5 |" in printed
    rows = json.loads((out / "summary.json").read_text())["controls"]["rows"]
    assert [r["group"] for r in rows] == ["learned", "random-vectors", "temperature-1.0", "temperature-1.5"]
    assert all(r["n"] == 2 for r in rows)
