"""Chat with a steered model: the library session, and ``melbo chat`` driven through a
pseudo-terminal on a tiny chat-templated model (two turns steered, one unsteered)."""

import json
import os
import sys
from pathlib import Path

import pexpect
import pytest
import torch
from conftest import char_tokenizer, tiny_model

import melbo
from melbo.bank import Bank
from melbo.chat import ChatSession, render
from melbo.core.errors import MelboError

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A tiny random llama with a chat template, and a bank of 3 vectors after block 1 (norm 40)."""
    d = tmp_path_factory.mktemp("tiny-chat")
    tiny_model("llama").save_pretrained(d)
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(d)
    lm = melbo.load_model(str(d), device="cpu")
    torch.manual_seed(1)
    v = torch.nn.functional.normalize(torch.randn(3, lm.d_model), dim=1) * 40
    meta = {**lm.identity(), "method": "melbo", "source_layer": 1, "target_layer": 3, "radius": 40.0}
    Bank({"vectors": v, "random_vectors": -v}, meta).save(d / "run")
    return d


def session(chat_dir, **kw):
    lm = melbo.load_model(str(chat_dir), device="cpu")
    bank = Bank.load(chat_dir / "run")
    return ChatSession(lm, bank, generation=melbo.GenerationConfig(max_new_tokens=12), **kw)


def test_render_uses_the_template_or_a_plain_layout(chat_dir):
    s = session(chat_dir)
    msgs = [{"role": "user", "content": "hi"}]
    assert render(s.lm.tokenizer, msgs) == ("<s>user: hi\n<s>assistant:", True)
    plain = char_tokenizer()
    assert render(plain, msgs) == ("User: hi\nAssistant:", False)


def test_steering_changes_replies_and_is_recorded(chat_dir):
    steered = session(chat_dir, vector=0, scale=1.0)
    plain = session(chat_dir, vector=None)
    a, b = steered.say("Hello there"), plain.say("Hello there")
    assert a != b  # a norm-40 vector after block 1 changes the tiny model's greedy reply
    assert steered.transcript[-1]["steered"] and steered.transcript[-1]["vector"] == 0
    assert not plain.transcript[-1]["steered"]
    steered.set_steering(False)
    steered.set_scale(2.0)
    steered.say("More")
    assert steered.label == "unsteered" and steered.transcript[-1]["scale"] is None
    with pytest.raises(MelboError, match="vector index 5 is outside"):
        steered.set_vector(5)
    with pytest.raises(MelboError, match="no vector chosen"):
        plain.set_steering(True)
    with pytest.raises(MelboError, match="empty message"):
        plain.say("   ")
    with pytest.raises(MelboError, match="scale"):
        plain.set_scale(float("inf"))


def test_other_model_is_refused(chat_dir):
    lm = melbo.wrap_model(tiny_model("gpt2"), char_tokenizer(), name="other")
    with pytest.raises(MelboError, match="bank was made for model"):
        ChatSession(lm, Bank.load(chat_dir / "run"))


def test_melbo_chat_in_a_pseudo_terminal(chat_dir, tmp_path):
    transcript = tmp_path / "chat.jsonl"
    exe = str(Path(sys.executable).with_name("melbo"))
    args = ["chat", "--bank", str(chat_dir / "run"), "--vector", "1", "--max-new-tokens", "12"]
    args += ["--device", "cpu", "--transcript", str(transcript)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"}
    child = pexpect.spawn(exe, args, env=env, encoding="utf-8", timeout=120)
    try:
        child.expect(r"\[next reply: vector 1 x 1\]")
        child.expect("you> ")
        child.sendline("Hello there")
        child.expect(r"\[vector 1 x 1\] ")
        child.expect("you> ")
        child.sendline("/bogus")
        child.expect("unknown command '/bogus'")
        child.expect("you> ")
        child.sendline("/vector 99")
        child.expect("vector index 99 is outside the bank")
        child.expect("you> ")
        child.sendline("/off")
        child.expect(r"\[next reply: unsteered\]")
        child.expect("you> ")
        child.sendline("How are you")
        child.expect(r"\[unsteered\] ")
        child.expect("you> ")
        child.sendline("/on")
        child.sendline("/scale 0.5")
        child.expect(r"\[next reply: vector 1 x 0.5\]")
        child.expect("you> ")
        child.sendline("Bye now")
        child.expect(r"\[vector 1 x 0.5\] ")
        child.expect("you> ")
        child.sendline("/quit")
        child.expect("transcript: ")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    rows = [json.loads(line) for line in transcript.read_text(encoding="utf-8").splitlines()]
    assert [r["role"] for r in rows] == ["user", "assistant"] * 3
    assert [r["steered"] for r in rows[1::2]] == [True, False, True]
    assert [r["scale"] for r in rows[1::2]] == [1.0, None, 0.5]
    # the same conversation in the library gives the same replies
    s = session(chat_dir, vector=1)
    replies = [s.say("Hello there")]
    s.set_steering(False)
    replies.append(s.say("How are you"))
    s.set_steering(True)
    s.set_scale(0.5)
    replies.append(s.say("Bye now"))
    assert [r["content"] for r in rows[1::2]] == replies


def test_melbo_chat_bad_inputs(chat_dir, tmp_path, capsys):
    from melbo.cli import main

    def run(*argv):
        with pytest.raises(SystemExit) as e:
            main(["chat", *argv])
        return e.value.code, capsys.readouterr().err

    code, err = run("--bank", str(tmp_path))
    assert code == 2 and "holds no bank.safetensors" in err
    code, err = run("--bank", str(chat_dir / "run"), "--vector", "7", "--device", "cpu")
    assert code == 2 and "vector index 7 is outside the bank" in err
    code, err = run("--bank", str(chat_dir / "run"), "--transcript", str(tmp_path), "--device", "cpu")
    assert code == 2 and "is a folder" in err
    other = tmp_path / "other"
    tiny_model("gpt2").save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    code, err = run("--bank", str(chat_dir / "run"), "--model", str(other), "--device", "cpu")
    assert code == 2 and "bank was made for model" in err


def test_replies_past_the_models_positions_are_refused(chat_dir):
    lm = melbo.load_model(str(chat_dir), device="cpu")  # 128 positions
    bank = Bank.load(chat_dir / "run")
    with pytest.raises(MelboError, match=r"a reply up to 200 \(--max-new-tokens\): \d+ positions, but the model"):
        ChatSession(lm, bank, generation=melbo.GenerationConfig(max_new_tokens=200))
    s = ChatSession(lm, bank, generation=melbo.GenerationConfig(max_new_tokens=100))
    with pytest.raises(MelboError, match=r"the conversation is \d+ tokens .*start a new conversation \(/reset\)"):
        s.say("x" * 40)
    assert s.messages == [] and s.transcript == []  # the refused message is not half recorded
