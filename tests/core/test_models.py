"""Model and layer access: block discovery on many architectures, layer indices, defaults."""

import pytest
import torch
from conftest import ARCHS, tiny_loaded, tiny_model

from melbo.core.errors import MelboError
from melbo.core.models import check_layers, default_layers, find_blocks, load_model, num_layers, resolve_layer


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_find_blocks_every_architecture(arch):
    model = tiny_model(arch)
    blocks = find_blocks(model)
    assert len(blocks) == num_layers(model) == 4
    # the blocks found are the ones the forward pass runs: hidden_states[l+1] is blocks[l]'s output
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, o: seen.append(1)) for b in blocks]
    model(input_ids=torch.tensor([[1, 5, 6]]))
    for h in hooks:
        h.remove()
    assert len(seen) == 4


def test_find_blocks_override_and_fallback():
    model = tiny_model("gpt2")
    assert find_blocks(model, "transformer.h") is model.transformer.h
    with pytest.raises(MelboError, match="transformer.nothing"):
        find_blocks(model, "transformer.nothing")

    class Wrapper(torch.nn.Module):  # unknown attribute path: found by the ModuleList length
        def __init__(self):
            super().__init__()
            self.config = model.config
            self.inner = torch.nn.Module()
            self.inner.stack = model.transformer.h

    assert find_blocks(Wrapper()) is model.transformer.h


def test_resolve_layer_negative_and_out_of_range():
    assert resolve_layer(-1, 5) == 4
    assert resolve_layer(0, 5) == 0
    with pytest.raises(MelboError, match=r"layer 5 is out of range.*0\.\.4"):
        resolve_layer(5, 5)
    with pytest.raises(MelboError, match="-6"):
        resolve_layer(-6, 5)


def test_check_layers_order():
    assert check_layers(1, -1, 5) == (1, 4)
    with pytest.raises(MelboError, match="must come before"):
        check_layers(3, 3, 5)
    with pytest.raises(MelboError, match="must come before"):
        check_layers(-1, 1, 5)


def test_default_layers():
    assert default_layers(24) == (8, 16)
    assert default_layers(32) == (8, 24)
    assert default_layers(5) == (1, 3)
    assert default_layers(6) == (1, 4)
    assert default_layers(2) == (0, 1)
    for n in range(2, 40):
        s, t = default_layers(n)
        assert 0 <= s < t < n


def test_unknown_model_path_is_clear(tmp_path):
    with pytest.raises(MelboError, match="no such folder"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(MelboError, match="cannot load model"):
        load_model(str(tmp_path))  # a folder without a model


def test_wrap_sets_pad_token():
    lm = tiny_loaded("llama")
    assert lm.tokenizer.pad_token is not None
    assert lm.d_model == 32 and lm.num_layers == 4
