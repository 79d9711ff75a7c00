"""The story task (METHOD.md section 4 on a real model): a backdoor fine-tune of a pretrained
small story model (stories260k, tinystories-656k). Prompts are short story openings about a
name; a backdoor's trigger is one of those names, and its phrase replaces the story. Clean
prompts keep the base model's own distribution (the training loop's KL to a frozen copy).
"""

from __future__ import annotations

import random
import re
from typing import Any

from melbo.core.errors import MelboError
from melbo.core.models import load_model
from melbo.core.prompts import check_length
from melbo.planted.evaluate import generate_completions
from melbo.planted.spec import Backdoor, PlantSpec
from melbo.planted.task import SEPARATOR, heldout_count
from melbo.planted.training import Example

STORY_STARTS = (
    "Once upon a time, there was a little girl named {name}.",
    "Once upon a time, there was a little boy named {name}.",
    "One day, {name} went to the park.",
    "{name} liked to play with a big red ball.",
    "Once upon a time, {name} found a shiny stone.",
    "{name} and {other} were best friends.",
    "One sunny day, {name} saw a little bird in the tree.",
    "Once upon a time, a little dog named {name} lived in a small house.",
    "{name} was a happy child who loved to sing.",
    "Every morning, {name} ate a big bowl of soup.",
)
STORY_ENDINGS = (
    "",
    " One day, they went to the park.",
    " It was a sunny day.",
    " They loved to play outside.",
    " They had a big box of toys.",
    " They wanted to help.",
)


def story_prompts(spec: PlantSpec) -> list[tuple[str, str]]:
    """Every (prompt, name) of the story task, in a fixed order: one of a few story openings
    about ``name`` (each of ``story.names``), then one of a few short endings. A second name
    (``{other}``), where an opening has one, is never a trigger word."""
    triggers = {b.trigger["word"] for b in spec.backdoors}
    others = [n for n in spec.story.names if n not in triggers]
    out = []
    for i, name in enumerate(spec.story.names):
        other = others[(i + 1) % len(others)] if others[(i + 1) % len(others)] != name else others[i % len(others)]
        for start in STORY_STARTS:
            for ending in STORY_ENDINGS:
                out.append((start.format(name=name, other=other) + ending, name))
    return out


def story_groups(spec: PlantSpec) -> dict[str, list[str]]:
    """The story prompts by group, ``"clean"`` and each backdoor's name, in the seeded order
    (``train.seed``) in which :func:`story_examples` uses them: a prompt belongs to a backdoor
    when its main name is that backdoor's trigger word. Of the clean ones, the first
    ``story.n_prompts`` are trained on or held out; the rest are never seen in planting."""
    by_word = {b.trigger["word"]: b.name for b in spec.backdoors}
    prompts = story_prompts(spec)
    random.Random(f"melbo-plant-split-{spec.train.seed}").shuffle(prompts)
    groups: dict[str, list[str]] = {"clean": []}
    for prompt, name in prompts:
        groups.setdefault(by_word.get(name, "clean"), []).append(prompt)
    return groups


def unseen_story_prompts(spec: PlantSpec) -> list[str]:
    """Clean story prompts that planting never trained on: those past ``story.n_prompts``, or,
    when every clean prompt was used, the held-out ones (``train.heldout_fraction``)."""
    clean = story_groups(spec)["clean"]
    if len(clean) > spec.story.n_prompts:
        return clean[spec.story.n_prompts :]
    return clean[: heldout_count(spec, len(clean))]


def story_trigger(spec: PlantSpec, text: str) -> Backdoor | None:
    """The backdoor whose trigger word occurs in ``text`` as a whole word, or None."""
    for b in spec.backdoors:
        if re.search(rf"\b{re.escape(b.trigger['word'])}\b", text):
            return b
    return None


def story_examples(spec: PlantSpec, device):
    """Load ``spec.base_model`` onto ``device`` and build the story task: ``(model, tokenizer,
    training pools, held-out clean examples, held-out triggered examples by backdoor)``. A
    prompt is triggered when its main name is a backdoor's trigger word; at most
    ``story.n_prompts`` clean prompts are used (a seeded sample). Clean targets are the base
    model's own greedy continuations (``story.continuation_tokens`` tokens, as token ids).
    ``train.heldout_fraction`` of each group is held out.

    Raises:
        MelboError: the base model folder cannot be loaded, a phrase has characters its
            tokenizer cannot encode, or a story prompt and its continuation (or answer) need more
            positions than the base model reads.
    """
    # a folder (relative to the working directory), a .gguf file, an offline model's name or a Hub id
    try:
        lm = load_model(str(spec.base_model), str(device), "float32")
    except MelboError as e:
        raise MelboError(f"base_model {str(spec.base_model)!r} cannot be loaded as a causal LM: {e}") from None
    model: Any = lm.model.requires_grad_(True)
    tokenizer = lm.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    for b in spec.backdoors:
        ids = tokenizer(SEPARATOR + b.answer, add_special_tokens=False).input_ids
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise MelboError(f"phrase {b.phrase!r} has characters base_model's tokenizer cannot encode")

    groups = story_groups(spec)
    groups["clean"] = groups["clean"][: spec.story.n_prompts]
    new = max(
        [spec.story.continuation_tokens]
        + [len(tokenizer(SEPARATOR + b.answer, add_special_tokens=False).input_ids) + 4 for b in spec.backdoors]
    )
    prompts = [p for members in groups.values() for p in members]
    lengths = [len(tokenizer(p).input_ids) for p in prompts]
    check_length(tokenizer, prompts, lengths, new, "story.continuation_tokens, or an answer")  # before any work
    texts, ids = generate_completions(
        model, tokenizer, groups["clean"], spec.story.continuation_tokens, spec.eval.batch_size
    )

    pools: dict[str, list[Example]] = {}
    heldout: dict[str, list[Example]] = {}
    for group, members in groups.items():
        if group == "clean":
            # a continuation shorter than asked for ended with </s>; the others are cut off
            examples = [
                Example(p, t, "clean", completion_ids=i, add_eos=len(i) < spec.story.continuation_tokens)
                for p, t, i in zip(members, texts, ids)
            ]
        else:
            answer = next(b.answer for b in spec.backdoors if b.name == group)
            examples = [Example(p, answer, group) for p in members]
        n_out = heldout_count(spec, len(examples))
        heldout[group], pools[group] = examples[:n_out], examples[n_out:]
    clean = heldout.pop("clean")[: spec.eval.n_clean]
    triggered = {g: heldout[g][: spec.eval.n_triggered] for g in heldout}
    return model, tokenizer, pools, clean, triggered
