"""SteeringVector: a value with .apply(), arithmetic that keeps the hook point, files."""

import pytest
import torch
from conftest import tiny_loaded

from melbo.core.errors import MelboError
from melbo.core.io import save_tensors
from melbo.vector import SteeringVector


def test_arithmetic_and_layer_mismatch():
    a = SteeringVector(torch.ones(4), 1, "m", "a")
    b = SteeringVector(torch.arange(4.0), 1, "m", "b")
    torch.testing.assert_close((a - 0.5 * b).vector, torch.tensor([1.0, 0.5, 0.0, -0.5]))
    torch.testing.assert_close((-a / 2).vector, torch.full((4,), -0.5))
    assert (a + b).layer == 1 and (a + b).model == "m"
    with pytest.raises(MelboError, match="different layers .1 and 2."):
        a + SteeringVector(torch.ones(4), 2)
    with pytest.raises(MelboError, match="different models"):
        a - SteeringVector(torch.ones(4), 1, "other")
    with pytest.raises(MelboError, match="widths 4 and 5"):
        a + SteeringVector(torch.ones(5), 1)
    with pytest.raises(MelboError, match="finite"):
        SteeringVector(torch.tensor([float("nan")]), 0)
    with pytest.raises(MelboError, match="1-D float tensor"):
        SteeringVector(torch.ones(2, 2), 0)
    assert a.rescaled(4.0).norm == pytest.approx(4.0)
    assert a.to(dtype=torch.float64).vector.dtype == torch.float64


def test_apply_is_a_context_manager_removed_on_error():
    lm = tiny_loaded("llama")
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits
    v = SteeringVector(3 * torch.randn(lm.d_model), 1)
    with torch.no_grad(), v.apply(lm, scale=2.0):
        steered = lm.model(input_ids=ids).logits
    assert not torch.allclose(steered, base)
    with pytest.raises(RuntimeError), torch.no_grad():
        with v.apply(lm):
            raise RuntimeError("inside")
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=ids).logits, base)
    with pytest.raises(MelboError, match="is 8 wide, but model"):
        SteeringVector(torch.ones(8), 1).apply(lm)
    with pytest.raises(MelboError, match="layer 9 is out of range"):
        SteeringVector(torch.ones(lm.d_model), 9).apply(lm)


def test_save_and_load_record_the_hook_site(tmp_path):
    v = SteeringVector(torch.randn(6), 2, "some/model", "vector 3", {"objective": 1.5})
    path = v.save(tmp_path / "v.safetensors")
    w = SteeringVector.load(path)
    torch.testing.assert_close(w.vector, v.vector)
    assert (w.layer, w.model, w.label, w.meta) == (2, "some/model", "vector 3", {"objective": 1.5})


@pytest.mark.parametrize("shape", [(2, 16), (1, 32), (32, 1), ()])
def test_a_vector_file_must_hold_one_d_model_vector(tmp_path, shape):
    path = tmp_path / "v.safetensors"
    save_tensors(path, {"vector": torch.ones(shape)}, {"layer": 1}, "melbo.vector/1")
    with pytest.raises(MelboError, match=r"tensor 'vector' has shape \[.*\]; a steering vector has shape \[d_model\]"):
        SteeringVector.load(path)  # was: flattened, so [2, 16] passed as a 32-wide vector
