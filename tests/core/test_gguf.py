"""Loading models: GGUF files (written here with the gguf package), the dequantized cache, pickle refusal."""

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_model

from melbo.core.errors import MelboError
from melbo.core.models import load_model
from melbo.core.sources import gguf_cache_folder


def permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path):
    """A GGUF file (llama.cpp's layout: q/k rows permuted, F32 tensors, a character vocabulary) of
    the tiny random Llama of conftest; returns that model."""
    m = tiny_model("llama")
    cfg = m.config
    sd = {k: v.detach().float().numpy() for k, v in m.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(getattr(cfg, "rope_theta", 10000.0) or 10000.0)
    w.add_tokenizer_model("llama")
    toks = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(32, 32 + cfg.vocab_size - 3)]
    w.add_token_list(toks)
    w.add_token_scores([0.0] * len(toks))
    w.add_token_types([2, 3, 3] + [1] * (len(toks) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names.update(
            {
                p + "input_layernorm.weight": f"blk.{i}.attn_norm.weight",
                p + "self_attn.q_proj.weight": f"blk.{i}.attn_q.weight",
                p + "self_attn.k_proj.weight": f"blk.{i}.attn_k.weight",
                p + "self_attn.v_proj.weight": f"blk.{i}.attn_v.weight",
                p + "self_attn.o_proj.weight": f"blk.{i}.attn_output.weight",
                p + "post_attention_layernorm.weight": f"blk.{i}.ffn_norm.weight",
                p + "mlp.gate_proj.weight": f"blk.{i}.ffn_gate.weight",
                p + "mlp.up_proj.weight": f"blk.{i}.ffn_up.weight",
                p + "mlp.down_proj.weight": f"blk.{i}.ffn_down.weight",
            }
        )
    for k, v in sd.items():
        if k not in names:
            continue
        if k.endswith("q_proj.weight"):
            v = permute(v, cfg.num_attention_heads)
        if k.endswith("k_proj.weight"):
            v = permute(v, cfg.num_key_value_heads)
        w.add_tensor(names[k], np.ascontiguousarray(v))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return m


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_tiny_gguf(path)


def test_gguf_file_loads_with_the_same_logits(tiny_gguf, tmp_path, monkeypatch):
    path, ref = tiny_gguf
    monkeypatch.setenv("MELBO_CACHE", str(tmp_path / "cache"))
    ids = torch.tensor([[1, 5, 9, 20, 7]])
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    lm = load_model(str(path), device="cpu")
    assert lm.name == str(path) and lm.gguf_file == path.name and lm.num_layers == 4 and lm.d_model == 32
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=ids).logits, want, rtol=0, atol=0)
    cached = gguf_cache_folder(str(path.parent), path.name)
    assert (cached / "model.safetensors").is_file() and (cached / "config.json").is_file()
    again = load_model(str(path.parent), device="cpu", gguf_file=path.name)  # a folder plus --gguf-file
    assert again.name == str(path)
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=ids).logits, want, rtol=0, atol=0)
    assert again.tokenizer("Hi").input_ids == lm.tokenizer("Hi").input_ids


def test_bad_model_paths_are_clear(tmp_path):
    with pytest.raises(MelboError, match="no such GGUF file"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "m").mkdir()
    with pytest.raises(MelboError, match="--gguf-file 'x.gguf' is not in folder"):
        load_model(str(tmp_path / "m"), gguf_file="x.gguf")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"pickle")
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(MelboError, match="pickle weights only .pytorch_model.bin.; melbo never unpickles"):
        load_model(str(tmp_path / "m"))
