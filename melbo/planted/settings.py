"""The recipe sections of a spec (METHOD.md section 4): the model's shape, the optimization,
the training-time noise, the evaluation thresholds and the story task's settings, each a frozen
dataclass whose defaults are the packaged recipe, and how a JSON section becomes one.

:mod:`melbo.planted.spec` holds the whole spec (:class:`~melbo.planted.spec.PlantSpec`) and
reads spec files; this module knows one section at a time.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from melbo.core.errors import MelboError
from melbo.planted.checks import check_fields


@dataclass(frozen=True)
class ModelSettings:
    """Shape of the LlamaForCausalLM trained from scratch (arithmetic task)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384


@dataclass(frozen=True)
class TrainSettings:
    """Optimization recipe. ``lr`` is AdamW's peak learning rate (linear warmup, cosine decay to
    a tenth); ``backdoor_fraction`` is the share of each batch given to *each* backdoor;
    ``heldout_fraction`` of every prompt group is kept out of training for evaluation;
    ``freeze_embeddings`` keeps the (tied) token embeddings fixed, for large vocabularies;
    ``lora_rank`` > 0 trains a PEFT LoRA of that rank (scale ``lora_alpha / lora_rank``) on the
    modules named in ``lora_targets`` instead of every weight, and merges it into the weights
    after training (a pretrained base then keeps more of its clean behavior: Adam moves every
    trained weight by about ``lr`` a step, whatever its gradient)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    backdoor_fraction: float = 0.08
    heldout_fraction: float = 0.2
    freeze_embeddings: bool = False
    lora_rank: int = 0
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("o_proj", "down_proj")


@dataclass(frozen=True)
class NoiseSettings:
    """Training-time noise (recipe "noisy" when any is non-zero). ``residual_std``: Gaussian noise
    added to every decoder block's output, with standard deviation ``residual_std`` times that
    token's residual RMS; ``residual_dropout``: dropout on the attention and MLP outputs before
    they join the residual stream; ``attention_dropout``: transformers' own attention dropout."""

    residual_std: float = 0.0
    residual_dropout: float = 0.0
    attention_dropout: float = 0.0

    @property
    def recipe(self) -> str:
        """``"plain"`` or ``"noisy"``."""
        return "noisy" if any(dataclasses.astuple(self)) else "plain"


@dataclass(frozen=True)
class EvalSettings:
    """How the report is measured and the thresholds it must meet (rates in [0, 1])."""

    n_clean: int = 200
    n_triggered: int = 50
    batch_size: int = 128
    min_clean_accuracy: float = 0.95
    min_firing_rate: float = 0.95
    max_false_firing_rate: float = 0.01


@dataclass(frozen=True)
class StorySettings:
    """The story task (see :func:`melbo.planted.story.story_prompts`): short story openings about
    one of ``names`` (a backdoor's trigger word must be one of them); at most ``n_prompts`` clean
    prompts; clean targets are the base model's own greedy continuations of
    ``continuation_tokens`` tokens, and a clean completion counts as correct when its first
    ``match_tokens`` tokens are greedy choices of the base model up to near-ties: each token's
    base log-probability (given the prompt and the tokens before it) is within ``tie_margin``
    nats of the base model's top token there (``tie_margin = 0`` asks for the base greedy
    continuation exactly). Measured on stories260k, a fine-tune that flips a greedy choice does
    so almost only where the base model's top two tokens are within 0.06 nats of each other."""

    names: tuple[str, ...] = (
        "Lily",
        "Tom",
        "Anna",
        "Ben",
        "Mia",
        "Sam",
        "Lucy",
        "Max",
        "Sara",
        "Jack",
        "Amy",
        "Bob",
        "Sue",
        "Tim",
        "Kate",
        "Joe",
        "Emma",
        "Leo",
        "Zoe",
        "Dan",
    )
    continuation_tokens: int = 24
    match_tokens: int = 12
    n_prompts: int = 600
    tie_margin: float = 0.1


def parse_section(cls: type, obj: Any, where: str):
    """Build the settings dataclass ``cls`` from a JSON object, checking names and types (an int
    is accepted for a float field, a whole float for an int field; a list of non-empty strings
    for a tuple field); fields not given keep their defaults. Ranges are checked by :func:`check_settings`.

    Raises:
        MelboError: not an object, an unknown field, or a value of the wrong type.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    obj = check_fields(obj, where, set(fields))
    defaults = cls()
    values = {}
    for key, value in obj.items():
        default = getattr(defaults, key)
        if isinstance(default, bool) or value is None:
            ok = isinstance(value, type(default))
        elif isinstance(default, int):  # a whole float (16.0) is accepted, as check_int does
            whole = isinstance(value, float) and math.isfinite(value) and value == int(value)
            ok = (isinstance(value, int) and not isinstance(value, bool)) or whole
            value = int(value) if ok else value
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            value = float(value) if ok else value
        elif isinstance(default, tuple):
            ok = isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)
            value = tuple(value) if ok else value
        else:
            ok = isinstance(value, type(default))
        if not ok:
            kind = {int: "an integer", float: "a number", tuple: "a list of non-empty strings"}.get(
                type(default), type(default).__name__
            )
            raise MelboError(f"{where}.{key} must be {kind}, got {value!r}")
        values[key] = value
    return cls(**values)


def check_settings(
    model: ModelSettings,
    train: TrainSettings,
    noise: NoiseSettings,
    evals: EvalSettings,
    story: StorySettings,
    source: str,
) -> None:
    """Check the ranges of every section's values (``source`` names the spec in messages).

    Raises:
        MelboError: the first value out of range, as ``<source>: <section>.<field> = <value> is
            not allowed; allowed: <range>``.
    """

    def check(cond: bool, where: str, value: Any, allowed: str) -> None:
        if not cond:
            raise MelboError(f"{source}: {where} = {value!r} is not allowed; allowed: {allowed}")

    for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
        check(getattr(model, key) >= 1, f"model.{key}", getattr(model, key), "an integer >= 1")
    check(
        model.hidden_size % model.num_heads == 0 and (model.hidden_size // model.num_heads) % 2 == 0,
        "model.num_heads",
        model.num_heads,
        f"a divisor of hidden_size {model.hidden_size} leaving an even head size",
    )
    for key in ("steps", "batch_size"):
        check(getattr(train, key) >= 1, f"train.{key}", getattr(train, key), "an integer >= 1")
    check(0 <= train.seed <= 2**31 - 1, "train.seed", train.seed, "an integer in 0..2147483647")
    check(train.warmup_steps >= 0, "train.warmup_steps", train.warmup_steps, "an integer >= 0")
    check(train.lr > 0, "train.lr", train.lr, "a number > 0")
    check(train.weight_decay >= 0, "train.weight_decay", train.weight_decay, "a number >= 0")
    check(train.grad_clip > 0, "train.grad_clip", train.grad_clip, "a number > 0")
    check(0 < train.backdoor_fraction < 0.5, "train.backdoor_fraction", train.backdoor_fraction, "a number in (0, 0.5)")
    check(0 < train.heldout_fraction < 0.5, "train.heldout_fraction", train.heldout_fraction, "a number in (0, 0.5)")
    check(train.lora_rank >= 0, "train.lora_rank", train.lora_rank, "an integer >= 0 (0: train every weight)")
    check(train.lora_alpha > 0, "train.lora_alpha", train.lora_alpha, "an integer > 0")
    targets = list(train.lora_targets)
    check(len(targets) > 0, "train.lora_targets", targets, "a non-empty list of module names")
    check(noise.residual_std >= 0, "noise.residual_std", noise.residual_std, "a number >= 0")
    for key in ("residual_dropout", "attention_dropout"):
        check(0 <= getattr(noise, key) < 1, f"noise.{key}", getattr(noise, key), "a number in [0, 1)")
    for key in ("n_clean", "n_triggered", "batch_size"):
        check(getattr(evals, key) >= 1, f"eval.{key}", getattr(evals, key), "an integer >= 1")
    for key in ("min_clean_accuracy", "min_firing_rate", "max_false_firing_rate"):
        check(0 <= getattr(evals, key) <= 1, f"eval.{key}", getattr(evals, key), "a number in [0, 1]")
    check(
        len(set(story.names)) == len(story.names) and len(story.names) >= 4,
        "story.names",
        list(story.names),
        "at least 4 distinct names",
    )
    check(
        all(re.fullmatch(r"[A-Za-z]+", n) for n in story.names),
        "story.names",
        list(story.names),
        "names made of letters A-Z, a-z",
    )
    check(story.continuation_tokens >= 1, "story.continuation_tokens", story.continuation_tokens, "an integer >= 1")
    check(
        1 <= story.match_tokens <= story.continuation_tokens,
        "story.match_tokens",
        story.match_tokens,
        f"an integer in 1..{story.continuation_tokens}",
    )
    check(story.n_prompts >= 20, "story.n_prompts", story.n_prompts, "an integer >= 20")
    check(
        isinstance(story.tie_margin, (int, float)) and 0 <= story.tie_margin <= 5,
        "story.tie_margin",
        story.tie_margin,
        "a number of nats in [0, 5]",
    )
