"""Prompts and token positions: parsing, padding, the chat template."""

from contextlib import nullcontext

import pytest
from conftest import tiny_loaded

from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig, check_fits, generate_rows
from melbo.core.prompts import encode_prompts, format_prompt, parse_positions


def test_positions_parsing_and_errors():
    assert parse_positions("last:3").select(5) == [2, 3, 4]
    assert parse_positions("0,-1").select(4) == [0, 3]
    assert parse_positions("all").select(2) == [0, 1]
    for bad in ("last:0", "last:x", "first", "1,,2"):
        with pytest.raises(MelboError, match="positions"):
            parse_positions(bad)
    with pytest.raises(MelboError, match=r"beyond prompt 'Hi'.*2 tokens"):
        encode_prompts(tiny_loaded("llama").tokenizer, ["Hi"], "last:3")
    with pytest.raises(MelboError, match="token position 7 is beyond"):
        encode_prompts(tiny_loaded("llama").tokenizer, ["Hi"], "7")
    with pytest.raises(MelboError, match="empty"):
        encode_prompts(tiny_loaded("llama").tokenizer, ["Hi", "  "], "all")
    with pytest.raises(MelboError, match="no prompt"):
        encode_prompts(tiny_loaded("llama").tokenizer, [], "all")


def test_chat_template_applied_when_present():
    tok = tiny_loaded("llama").tokenizer
    with pytest.warns(UserWarning, match="no chat template"):
        assert format_prompt(tok, "Hi", chat=True) == "Hi"
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    assert format_prompt(tok, "Hi", chat=True) == "<user>Hi<assistant>"
    assert format_prompt(tok, "Hi", chat=False) == "Hi"
    batch = encode_prompts(tok, ["Hi"], "all", chat=True)
    assert batch.texts == ["<user>Hi<assistant>"] and batch.input_ids.shape[1] == len("<user>Hi<assistant>")


def test_prompts_and_completions_past_the_models_positions_are_refused():
    lm = tiny_loaded("gpt2")  # learned positions: 128; past them the embedding lookup fails
    assert lm.tokenizer.model_max_length == 128
    long = "a" * 200
    with pytest.raises(
        MelboError, match=r"prompt 1 \('aaaa.*\.\.\.\) needs 200 tokens = 200 positions, .* at most 128"
    ):
        encode_prompts(lm.tokenizer, ["Hi", long])
    cfg = GenerationConfig(max_new_tokens=127)
    with pytest.raises(MelboError, match=r"needs 2 tokens \+ 127 new tokens \(--max-new-tokens\) = 129 positions"):
        generate_rows(lm, ["Hi"], 1, lambda rows: nullcontext(), cfg)
    check_fits(lm, ["Hi"], GenerationConfig(max_new_tokens=126))  # exactly 128: fits
