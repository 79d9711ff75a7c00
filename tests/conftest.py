"""Shared fixtures: tiny random models of several architectures, built from configs in code,
a character-level tokenizer built in code, and the real models of ../shared/models."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

from melbo.core.models import wrap_model

# Tiny models: one thread is faster than several (and CI has 2 cores).
torch.set_num_threads(1)

SHARED_MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"

# Tiny configs: 4 blocks, d_model 32. Keys are transformers model_type names.
TINY = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=128,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
ARCHS = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(num_key_value_heads=2),
    "qwen3": dict(num_key_value_heads=2, head_dim=8),
    "gemma": dict(num_key_value_heads=1, head_dim=8),
    "gemma2": dict(num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=8),
    "gpt2": dict(n_embd=32, n_layer=4, n_head=4, n_positions=128),
    "gpt_neox": dict(),
    "gptj": dict(n_embd=32, n_layer=4, n_head=4, n_positions=128, rotary_dim=4),
    "phi": dict(),
    "phi3": dict(num_key_value_heads=4, pad_token_id=0),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "falcon": dict(new_decoder_architecture=False, multi_query=True),
    "olmo": dict(),
    "olmo2": dict(num_key_value_heads=2),
    "bloom": dict(n_embed=32, n_layer=4, n_head=4),
    "gemma3_text": dict(num_key_value_heads=1, head_dim=8, sliding_window=4, query_pre_attn_scalar=8),
    "stablelm": dict(num_key_value_heads=2),
    "starcoder2": dict(num_key_value_heads=2),
    "cohere": dict(num_key_value_heads=2),
    "mpt": dict(d_model=32, n_heads=4, n_layers=4),
    "gpt_bigcode": dict(n_embd=32, n_layer=4, n_head=4, n_positions=128),
    "codegen": dict(n_embd=32, n_layer=4, n_head=4, n_positions=128, rotary_dim=4),
    "gpt_neo": dict(num_layers=4, num_heads=4, attention_types=[[["global", "local"], 2]], window_size=4),
    "mixtral": dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
}
FAST_ARCHS = ["llama", "qwen2", "gemma2", "gpt2", "gpt_neox", "opt"]


def char_tokenizer():
    """A character-level fast tokenizer (printable ASCII, BOS/EOS/PAD), built in memory."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_model(arch: str, seed: int = 0):
    """A random ``arch`` causal LM with 4 blocks of width 32, float32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(TINY)
    kw.update(ARCHS[arch])
    cfg = AutoConfig.for_model(arch, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


CUSTOM_CODE_AUTO_MAP = {
    "AutoConfig": "evil.EvilConfig",
    "AutoModelForCausalLM": "evil.EvilModel",
    "AutoModel": "evil.EvilModel",
    "AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"],
}
"""What a model folder that needs custom code names in its ``config.json`` ``auto_map``."""


def plant_custom_code(folder: Path, sentinel: Path, config_update: dict) -> None:
    """Write ``folder/evil.py`` (it writes ``sentinel`` when imported) and name it in the folder's
    configs: ``config_update`` goes into ``config.json``, an ``AutoTokenizer`` ``auto_map`` into
    ``tokenizer_config.json`` (when there is one)."""
    (folder / "evil.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('the model folder ran its code')\n"
        "from transformers import PretrainedConfig, PreTrainedModel\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evilmodel'\n"
        "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n"
        "class EvilTokenizer:\n    pass\n"
        "class EvilModule:\n    pass\n"
    )
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg.update(config_update)
    cfg_path.write_text(json.dumps(cfg))
    tok_path = folder / "tokenizer_config.json"
    if tok_path.is_file():
        tok = json.loads(tok_path.read_text())
        tok["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
        tok_path.write_text(json.dumps(tok))


def tiny_loaded(arch: str, seed: int = 0):
    return wrap_model(tiny_model(arch, seed), char_tokenizer(), name=f"tiny-{arch}")


def tiny_run(out: Path, prompt: str, num_vectors: int, lm=None):
    """A small evaluated MELBO run into ``out`` (3 steps, R = 2, one held-out prompt, 6 new
    tokens) on ``lm`` (default: the tiny llama). Returns the bank."""
    import melbo

    return melbo.train(
        lm if lm is not None else tiny_loaded("llama"),
        prompt,
        out=out,
        num_vectors=num_vectors,
        steps=3,
        radius="2",
        heldout=["A dog."],
        generation=melbo.GenerationConfig(max_new_tokens=6),
        show_progress=False,
    )


@pytest.fixture(params=FAST_ARCHS)
def loaded(request):
    return tiny_loaded(request.param)


def shared_model_path(name: str) -> Path:
    path = SHARED_MODELS / name
    if not (path / "config.json").exists():
        pytest.skip(
            f"real model {name} not found at {path} (../shared/models is absent outside the project's machines)"
        )
    return path


def save_tiny_planted(folder: Path) -> Path:
    """A random (untrained) model of the default planted spec's shape (32 wide, 2 blocks), saved into
    ``folder`` like `melbo plant` saves one (weights, character tokenizer, the spec file)."""
    from melbo.planted.plant import SPEC_FILE
    from melbo.planted.spec import load_spec, parse_spec, spec_to_dict
    from melbo.planted.tokenizer import build_char_tokenizer
    from melbo.planted.training import build_model

    obj = spec_to_dict(load_spec(None))
    obj["model"] = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}
    spec = parse_spec(obj, "tiny")
    torch.manual_seed(0)
    tok = build_char_tokenizer()
    build_model(spec, tok, max_positions=128).save_pretrained(folder)
    tok.save_pretrained(folder)
    (Path(folder) / SPEC_FILE).write_text(json.dumps(spec_to_dict(spec)))
    return Path(folder)


def fake_embed(texts, embedder=None):
    """Bag-of-characters embeddings: enough to tell texts apart without a model."""
    out = torch.zeros(len(texts), 128)
    for i, t in enumerate(texts):
        for ch in t:
            out[i, ord(ch) % 128] += 1
    return torch.nn.functional.normalize(out + 1e-6, dim=-1)
