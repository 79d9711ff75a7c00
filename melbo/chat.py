"""Multi-turn chat with a steered model (the post's red-teaming setting: conversations with a
model steered by one vector of a bank).

The conversation is rendered with the tokenizer's chat template (``apply_chat_template`` with the
generation prompt) before each reply; a tokenizer without one gets a plain ``User: ...`` /
``Assistant: ...`` layout. The steering vector is added after its source block at every position
of each reply's forward passes (``positions="all"``, METHOD.md section 1), so every generated
token is steered; ``positions="generated"`` steers only the reply's tokens.

Example:
    >>> chat = ChatSession(lm, bank, vector=3, scale=1.0)           # doctest: +SKIP
    >>> chat.say("How do I pick a lock?")                           # doctest: +SKIP
    >>> chat.set_steering(False); chat.say("And you?")              # doctest: +SKIP
    >>> chat.save("chat.jsonl")                                     # doctest: +SKIP
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import torch

from melbo.bank import Bank
from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig
from melbo.core.hooks import STEER_POSITIONS
from melbo.core.io import write_jsonl
from melbo.core.models import LoadedModel
from melbo.core.prompts import position_limit
from melbo.core.validate import check_choice, check_number
from melbo.vector import SteeringVector

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def render(tokenizer, messages: list[dict]) -> tuple[str, bool]:
    """``(text, templated)``: the conversation as the model sees it before the next reply, with
    the tokenizer's chat template when it has one, else a plain ``User:``/``Assistant:`` layout."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
    lines = [f"{PLAIN_ROLES.get(m['role'], m['role'])}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:", False


class ChatSession:
    """A conversation with ``lm`` steered by one vector of ``bank`` (or by none).

    Args:
        lm: the model (checked against the bank).
        bank: a vector bank (its random baseline is reachable with ``random=True``).
        vector: the row to steer with; None starts unsteered.
        scale: multiplier of the vector (1 = the bank's radius R).
        positions: ``all``, ``prompt`` or ``generated`` (:mod:`melbo.core.hooks`).
        generation: decoding settings (``max_new_tokens``, ``temperature``, ``top_p``, ``seed``).
        system: an optional system message.

    Attributes:
        messages: the conversation, ``[{"role", "content"}]``.
        transcript: one row per message with the steering in force (``vector``, ``random``,
            ``scale``, ``steered``), what :meth:`save` writes.

    Raises:
        MelboError: an adapter bank, a bank from another model, an unknown vector index, a bad
            scale or positions, ``max_new_tokens`` past the positions the model reads.
    """

    def __init__(
        self,
        lm: LoadedModel,
        bank: Bank,
        vector: int | None = 0,
        scale: float = 1.0,
        positions: str = "all",
        generation: GenerationConfig | None = None,
        system: str | None = None,
        random: bool = False,
    ):
        if bank.kind != "vector":
            raise MelboError("melbo chat steers with vectors; this bank holds adapters")
        bank.check_model(lm)
        self.lm, self.bank = lm, bank
        self.positions = check_choice("steering positions", positions, STEER_POSITIONS)
        self.generation = generation or GenerationConfig(max_new_tokens=128)
        self.system = system
        self.messages: list[dict] = []
        self.transcript: list[dict] = []
        self.turn = 0
        self.scale = 1.0
        self.steering = vector is not None
        self.vector: SteeringVector | None = None
        self.index: int | None = None
        self.random = False
        self.set_scale(scale)
        if vector is not None:
            self.set_vector(vector, random)
        self.reset()
        self._check_fits(self.messages + [{"role": "user", "content": "?"}])  # a reply must fit at all

    # ------------------------------------------------------------ steering controls

    def set_vector(self, index: int, random: bool = False) -> SteeringVector:
        """Steer with row ``index`` of the bank (or of its random baseline); steering turns on.

        Raises:
            MelboError: an index outside the bank, or no random baseline.
        """
        src = self.bank.random if random else self.bank
        if src is None:
            raise MelboError("the bank holds no random baseline")
        v = src[index]
        assert isinstance(v, SteeringVector)
        self.vector, self.index, self.random, self.steering = v, index, random, True
        return v

    def set_scale(self, scale: float) -> None:
        """Multiply the vector by ``scale`` from the next reply on (finite; 0 is unsteered)."""
        self.scale = check_number("scale", scale)

    def set_steering(self, on: bool) -> None:
        """Turn steering on (with the current vector) or off, from the next reply on.

        Raises:
            MelboError: on, but no vector was chosen.
        """
        if on and self.vector is None:
            raise MelboError("no vector chosen; pick one first (set_vector, or /vector K in melbo chat)")
        self.steering = bool(on)

    @property
    def label(self) -> str:
        """What steers the next reply: ``vector 3 x 1.5``, ``random 2 x 1``, or ``unsteered``."""
        if not self.steering or self.vector is None:
            return "unsteered"
        return f"{'random' if self.random else 'vector'} {self.index} x {self.scale:g}"

    def reset(self) -> None:
        """Start a new conversation (the transcript keeps the old one)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    # ------------------------------------------------------------ talking

    def _record(self, role: str, content: str) -> None:
        on = self.steering and self.vector is not None
        self.transcript.append(
            {
                "turn": self.turn,
                "role": role,
                "content": content,
                "steered": on,
                "vector": self.index if on else None,
                "random": self.random if on else None,
                "scale": self.scale if on else None,
                "positions": self.positions if on else None,
            }
        )

    def say(self, text: str) -> str:
        """Add a user message, generate the (steered) reply, add it, and return it.

        Raises:
            MelboError: an empty message; a conversation too long for the model's positions.
        """
        if not isinstance(text, str) or not text.strip():
            raise MelboError("an empty message; type some text")
        self._check_fits(self.messages + [{"role": "user", "content": text}])
        self.messages.append({"role": "user", "content": text})
        self._record("user", text)
        reply = self._reply()
        self.messages.append({"role": "assistant", "content": reply})
        self._record("assistant", reply)
        self.turn += 1
        return reply

    def _check_fits(self, messages: list[dict]) -> None:
        """Refuse a conversation that, with a reply of ``max_new_tokens``, needs more positions than
        the model reads (past them the replies are not the model's: see
        :func:`melbo.core.prompts.check_length`).

        Raises:
            MelboError: naming the lengths; ``/reset`` starts a shorter conversation.
        """
        tok, limit = self.lm.tokenizer, position_limit(self.lm.tokenizer)
        if limit is None:
            return
        text, templated = render(tok, messages)
        n = len(tok(text, add_special_tokens=not templated)["input_ids"])
        m = self.generation.max_new_tokens
        if n + m > limit:
            raise MelboError(
                f"the conversation is {n} tokens and a reply up to {m} (--max-new-tokens): {n + m} positions, "
                f"but the model reads at most {limit} (max_position_embeddings); lower --max-new-tokens or start "
                f"a new conversation (/reset)"
            )

    def _reply(self) -> str:
        lm, cfg, tok = self.lm, self.generation, self.lm.tokenizer
        text, templated = render(tok, self.messages)
        enc = tok(text, return_tensors="pt", add_special_tokens=not templated)
        ids = enc["input_ids"].to(lm.device)
        kwargs: dict = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        if cfg.temperature > 0:
            kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p)
            torch.manual_seed(cfg.seed + self.turn)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        steer = (
            self.vector.apply(lm, self.scale, self.positions)
            if self.steering and self.vector is not None
            else nullcontext()
        )
        with torch.no_grad(), steer:
            out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        reply = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        if not templated:  # the plain layout has no end-of-turn token: cut at the next speaker
            for role in PLAIN_ROLES.values():
                reply = reply.split(f"\n{role}:")[0]
        return reply.strip()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the transcript as JSONL (one message per line), atomically."""
        return write_jsonl(path, self.transcript)
