"""Prompts and token positions: the prompt set of METHOD.md ("Notation").

A prompt set is ``n`` prompts, prompt ``i`` with a chosen set of token positions ``I_i``: all
positions, the last ``k``, or an explicit list of indices (negative ones count from the end).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from melbo.core.errors import MelboError


@dataclass(frozen=True)
class Positions:
    """Which token positions of each prompt count in the objective.

    ``kind`` is ``"all"``, ``"last"`` (the last ``k``) or ``"indices"`` (``indices``, negative
    ones from the end of the prompt). Build it with :func:`parse_positions`.
    """

    kind: str
    k: int = 0
    indices: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.kind == "all":
            return "all"
        if self.kind == "last":
            return f"last:{self.k}"
        return ",".join(str(i) for i in self.indices)

    def select(self, length: int, prompt: str = "") -> list[int]:
        """Indices ``0..length-1`` chosen in a prompt of ``length`` tokens.

        Raises:
            MelboError: a position lies beyond the prompt.
        """
        if self.kind == "all":
            return list(range(length))
        if self.kind == "last":
            if self.k > length:
                raise MelboError(
                    f"positions last:{self.k} go beyond prompt {prompt!r}, which has {length} tokens; "
                    f"allowed: last:1..last:{length}"
                )
            return list(range(length - self.k, length))
        out = []
        for i in self.indices:
            if not -length <= i < length:
                raise MelboError(
                    f"token position {i} is beyond prompt {prompt!r}, which has {length} tokens; "
                    f"allowed: 0..{length - 1} or -{length}..-1"
                )
            out.append(i % length)
        return sorted(set(out))


def parse_positions(text: str) -> Positions:
    """Parse ``all``, ``last:K`` or ``I,J,K`` (integers, negative from the end).

    Raises:
        MelboError: anything else, or ``K < 1``.
    """
    s = str(text).strip()
    allowed = "allowed: all, last:K (K >= 1), or a comma-separated list of token indices like 0,3,-1"
    if s == "all":
        return Positions("all")
    if s.startswith("last:"):
        try:
            k = int(s[5:])
        except ValueError:
            raise MelboError(f"bad positions {text!r}; {allowed}") from None
        if k < 1:
            raise MelboError(f"bad positions {text!r}: K must be >= 1; {allowed}")
        return Positions("last", k=k)
    try:
        idx = tuple(int(x) for x in s.split(","))
    except ValueError:
        raise MelboError(f"bad positions {text!r}; {allowed}") from None
    return Positions("indices", indices=idx)


def format_prompt(tokenizer, prompt: str, chat: bool = False) -> str:
    """The text the model sees: the prompt itself, or a user turn in the tokenizer's chat
    template (with the generation prompt) when ``chat`` is set and the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    if chat:
        warnings.warn(
            "--chat asked for, but the tokenizer has no chat template: prompts are used as they are", stacklevel=2
        )
    return prompt


def check_prompts(prompts: list[str]) -> list[str]:
    """Raises MelboError when there is no prompt or one is empty."""
    if not prompts:
        raise MelboError("no prompt given; pass at least one --prompt TEXT or --prompts-file")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise MelboError(f"prompt {i} is empty ({p!r}); every prompt needs some text")
    return prompts


@dataclass
class PromptBatch:
    """Tokenized prompts, right-padded, with the positions that count.

    Attributes:
        input_ids: ``[n, T]`` token ids (right padding, so every real token keeps the position
            it has when the prompt runs alone).
        attention_mask: ``[n, T]``, 1 on real tokens.
        target_mask: ``[n, T]`` bool, True on the chosen positions ``I_i`` (never on padding).
        prompts: the prompts as given.
        texts: the texts tokenized (after the chat template, if any).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    prompts: list[str]
    texts: list[str]

    def to(self, device) -> PromptBatch:
        return PromptBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.target_mask.to(device),
            self.prompts,
            self.texts,
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def position_limit(tokenizer: Any) -> int | None:
    """How many token positions the model reads: ``tokenizer.model_max_length`` (which
    :func:`melbo.core.models.load_model` sets from the config's ``max_position_embeddings``), or
    None where it is unknown (transformers' "no limit" placeholder, about 1e30)."""
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n < 10**8 else None


def check_length(
    tokenizer: Any, prompts: list[str], lengths: list[int], new_tokens: int = 0, new_what: str = "--max-new-tokens"
) -> None:
    """Refuse a prompt of ``lengths[i]`` tokens (plus ``new_tokens`` generated after it) that needs
    more positions than the model reads: past them a model with learned positions fails and one
    with rotary positions writes text it was never trained to read. ``new_what`` names the setting
    that asks for the new tokens.

    Raises:
        MelboError: naming the prompt, its length, the new tokens and the model's limit.
    """
    limit = position_limit(tokenizer)
    if limit is None:
        return
    for i, n in enumerate(lengths):
        if n + new_tokens > limit:
            need = f"{n} tokens" + (f" + {new_tokens} new tokens ({new_what})" if new_tokens else "")
            raise MelboError(
                f"prompt {i} ({prompts[i][:40]!r}{'...' if len(prompts[i]) > 40 else ''}) needs {need} = "
                f"{n + new_tokens} positions, but the model reads at most {limit} (max_position_embeddings); "
                f"shorten the prompt" + (f" or lower {new_what}" if new_tokens else "")
            )


def encode_prompts(
    tokenizer, prompts: list[str], positions: Positions | str = "all", chat: bool = False
) -> PromptBatch:
    """Tokenize a prompt set into a right-padded :class:`PromptBatch`.

    Raises:
        MelboError: empty prompt list or prompt, a prompt with no tokens, positions beyond a
            prompt, a prompt longer than the model reads (:func:`check_length`).
    """
    check_prompts(prompts)
    if isinstance(positions, str):
        positions = parse_positions(positions)
    texts = [format_prompt(tokenizer, p, chat) for p in prompts]
    special = not (chat and getattr(tokenizer, "chat_template", None))
    ids = [tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts]
    check_length(tokenizer, list(prompts), [len(x) for x in ids])
    T = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(ids), T), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), T), dtype=torch.long)
    target_mask = torch.zeros((len(ids), T), dtype=torch.bool)
    for i, x in enumerate(ids):
        if not x:
            raise MelboError(f"prompt {prompts[i]!r} has no tokens")
        input_ids[i, : len(x)] = torch.tensor(x)
        attention_mask[i, : len(x)] = 1
        target_mask[i, positions.select(len(x), prompts[i])] = True
    return PromptBatch(input_ids, attention_mask, target_mask, list(prompts), texts)
