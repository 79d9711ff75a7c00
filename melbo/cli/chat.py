"""``melbo chat``: talk to a steered model, switching vector, scale or steering mid-conversation."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from melbo.chat import ChatSession
from melbo.cli.common import load_bank, model_options, open_model, steer_option
from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig
from melbo.core.outputs import bank_file, check_output_file

HELP = """commands:
  /vector K     steer with vector K of the bank      /random K   with random baseline vector K
  /scale X      multiply the vector by X             /off, /on   steering off / back on
  /reset        start a new conversation             /help       this list
  /quit         end (Ctrl-D too); the transcript is saved after every reply"""


def _command(session: ChatSession, line: str) -> bool:
    """Run one /command; False to end the chat. Bad commands print an error and go on."""
    parts = line.split()
    name, args = parts[0].lower(), parts[1:]
    try:
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            click.echo(HELP)
        elif name in ("/vector", "/random"):
            if len(args) != 1:
                raise MelboError(f"{name} needs one vector index, like {name} 3")
            try:
                k = int(args[0])
            except ValueError:
                raise MelboError(f"bad vector index {args[0]!r}; give an integer 0..{len(session.bank) - 1}") from None
            session.set_vector(k, random=name == "/random")
        elif name == "/scale":
            if len(args) != 1:
                raise MelboError("/scale needs one number, like /scale 1.5")
            try:
                x = float(args[0])
            except ValueError:
                raise MelboError(f"bad scale {args[0]!r}; give a finite number like 1.5") from None
            session.set_scale(x)
        elif name in ("/off", "/on"):
            session.set_steering(name == "/on")
        elif name == "/reset":
            session.reset()
        else:
            raise MelboError(f"unknown command {name!r}; type /help for the list")
    except MelboError as e:
        click.echo(f"error: {e}")
        return True
    click.echo(f"[next reply: {session.label}]")
    return True


@click.command()
@click.option("--bank", required=True, type=click.Path(), help="A run folder or bank.safetensors (steering vectors).")
@click.option("--vector", "vector", type=int, default=0, help="The vector to start with.")
@click.option("--random", "use_random", is_flag=True, help="Start with the bank's random baseline vector instead.")
@click.option("--scale", type=float, default=1.0, help="Multiply the vector by this (1 = the bank's radius R).")
@steer_option
@click.option("--system", default=None, help="A system message to start the conversation with.")
@click.option(
    "--transcript",
    default=None,
    type=click.Path(),
    help="JSONL file for the conversation (default: chat-<time>.jsonl in the bank's folder).",
)
@click.option("--overwrite", is_flag=True, help="Replace the --transcript file if it exists (never the bank).")
@click.option("--model", default=None, help="Model (default: the one in the bank's metadata).")
@click.option("--max-new-tokens", type=int, default=128, help="Tokens per reply at most.")
@click.option("--temperature", type=float, default=0.0, help="0 = greedy decoding; > 0 samples.")
@click.option("--top-p", type=float, default=1.0, help="Nucleus sampling threshold (with --temperature > 0).")
@click.option("--seed", type=int, default=0, help="Sampling seed.")
@model_options
def chat(
    bank: str,
    vector: int,
    use_random: bool,
    scale: float,
    steer_positions: str,
    system: str | None,
    transcript: str | None,
    overwrite: bool,
    model: str | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    device: str,
    dtype: str,
    blocks_path: str | None,
    gguf_file: str | None,
) -> None:
    """Multi-turn chat with the model steered by one vector of a bank, in the tokenizer's chat
    template. Type /help for the commands that switch vector, scale or steering mid-conversation."""
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    b, _ = load_bank(bank)  # refuses a bank with no vectors
    folder = Path(bank) if Path(bank).is_dir() else Path(bank).parent
    out = Path(transcript) if transcript else folder / f"chat-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    inputs = [("the bank (--bank)", bank_file(bank)), ("the model", model or b.meta.get("model"))]
    check_output_file(out, "--transcript", inputs=inputs, overwrite=overwrite)
    lm = open_model(model, device, dtype, blocks_path, gguf_file, b)
    if sys.stdin is None or sys.stdin.closed:  # started with stdin closed: nothing can be said
        click.echo("melbo chat: stdin is closed, so there is nothing to chat about; no transcript written", err=True)
        return
    session = ChatSession(lm, b, vector, scale, steer_positions, gen, system, use_random)
    if not getattr(lm.tokenizer, "chat_template", None):
        click.echo("note: the tokenizer has no chat template; turns are laid out as 'User: ...' / 'Assistant: ...'")
    click.echo(f"chatting with {lm.name}, {len(b)} vectors at R = {b.meta.get('radius')}; /help for commands")
    click.echo(f"[next reply: {session.label}]")
    while True:
        try:
            line = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
        except (EOFError, click.exceptions.Abort, OSError, RuntimeError):  # end of input, or stdin lost
            click.echo("")
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _command(session, line):
                break
            continue
        label = session.label
        reply = session.say(line)
        click.echo(f"[{label}] {reply}")
        session.save(out)
    if session.transcript:
        session.save(out)
        click.echo(f"transcript: {out}")
