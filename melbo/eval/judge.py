"""The behavior judge: is a steered completion ``degenerate``, ``new`` or ``unchanged``?

- ``degenerate``: a loop at any granularity (characters, digits, tokens, words, lines,
  sentences, also after a fluent start), gibberish, mixed-script soup, or nothing;
- ``new``: fluent text whose content or style differs from the unsteered completion's;
- ``unchanged``: the unsteered completion's content, re-phrased or not.

Rule: ``degenerate`` first (any criterion of :data:`CRITERIA` fires), then ``new`` when the
completion is far from the unsteered one (:data:`NEW_DISTANCE` in sentence-embedding cosine
distance, :mod:`melbo.embed`, or, without an embedding model, :data:`NEW_OVERLAP` in word-set
Jaccard distance) or, for a prompt that holds numbers, when the completion's other numbers differ
(another answer), else ``unchanged``. Two exceptions: a completion equal to the unsteered one (up
to whitespace) is ``unchanged`` whatever it holds; where the unsteered completion itself loops
(gemma-3-270m repeats a Q/A pair, an instruction, chat turns), a completion that repeats it the
same way (:data:`OWN_LOOP_SIMILARITY`) is not degenerate for its loop (:data:`LOOP_CRITERIA`).

Scores: each criterion maps its feature to [0, 1] by a ramp of its own width that crosses 0.5 at
its threshold; ``degenerate`` is the largest of them; ``new`` = (1 − degenerate) × the distance
ramp and ``unchanged`` = (1 − degenerate) × (1 − that ramp), so the three sum to 1. The label
follows the rule, not the largest score.

Features (:mod:`melbo.eval.features`) are text-only unless ``lm`` is given: then n-grams are
counted over the model's tokens and the unsteered model's log-probabilities
(:func:`melbo.quality.token_logprobs`) add the gibberish criterion. A loop is what the unsteered
model predicts best once it has started, which is why loops are caught by text criteria.

How the thresholds were chosen: on the *tune* half (213 rows) of the hand-labelled set
``benchmarks/data/judge`` (448 steered greedy completions of gemma-3-270m on six prompts and of two
micro story models, labelled by a person by its GUIDE.md), by a coordinate search over a coarse
grid of each threshold maximizing Cohen's κ with the human labels while keeping ≤ 4% of the
human-``degenerate`` rows labelled ``new``; where κ was flat over a range, the value the labelling
guide states (a loop over half of the text, three repeats) or a round value inside the range was
kept, and criteria that changed nothing there were dropped. The held-out half (235 rows), looked
at once after that, gave κ 0.729 with 5.0% of degenerate rows labelled new; two faults it showed
were then fixed without another search: code punctuation counted as odd words, and the repeated
4-gram line sat at 0.4, where a sentence said twice (not a loop, by the guide) is flagged; it is
at 0.5 now. With these, ``benchmarks/judge_agreement.py`` measures κ 0.776 held-out (0.788 tune),
5.0% (6.5% tune) degenerate labelled new; 0.835 on the gemma-3-270m rows, 0.50-0.65 on the micro
story models, where new and unchanged stories differ by one event that sentence embeddings barely
see. Text-only (no model): κ 0.721 held-out, 0.678 tune, a quarter of the degenerate rows
(gibberish) labelled new.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from melbo.core.errors import MelboError
from melbo.core.io import read_text
from melbo.core.models import LoadedModel
from melbo.embed import distance_to, embed, named_embedder
from melbo.eval.features import lm_features, overlap_distance, pair_features, text_features
from melbo.quality import token_logprobs

LABELS = ("degenerate", "new", "unchanged")
REQUIRED = ("prompt", "unsteered", "completion")


@dataclass(frozen=True)
class Criterion:
    """A degenerate-text criterion: ``feature`` at or beyond ``threshold`` (above it when
    ``above``, else below it) marks a degenerate completion; ``width`` is the ramp's half-width
    (the feature distance from the threshold at which the criterion's score reaches 0 or 1);
    ``min_chars``: the criterion applies only to texts of at least this many characters, and only
    where the feature was measured (the log-probability features need the model)."""

    name: str
    feature: str
    threshold: float
    above: bool
    width: float
    min_chars: int = 0

    def score(self, f: dict[str, float]) -> float | None:
        """Ramp score in [0, 1] (0.5 at the threshold), or None where the criterion does not apply."""
        if self.feature not in f or f["chars"] < self.min_chars:
            return None
        x = f[self.feature]
        d = (x - self.threshold) if self.above else (self.threshold - x)
        return min(1.0, max(0.0, 0.5 + d / (2 * self.width)))


CRITERIA: tuple[Criterion, ...] = (
    # a loop covering half the text or more (the labelling guide's "more than about half"); κ on the
    # tune half was flat from 0.3 to 0.7
    Criterion("loop", "loop_share", 0.5, True, 0.2),
    # fluent text of 60+ characters compresses to 0.45-0.85 of its bytes, loops to 0.05-0.3
    Criterion("compressible", "compression", 0.25, False, 0.1, min_chars=60),
    # repeated token 4-grams: a text said exactly twice repeats (n - 3) / (2n - 3) < 0.5 of its n-unit
    # 4-grams, three times about 2/3; the guide's "twice is not yet a loop" puts the line at 0.5
    # (tune half: κ 0.795 at 0.4, 0.788 at 0.5 and 0.6, 0.781 without)
    Criterion("repeated 4-grams", "repeated_4", 0.5, True, 0.15),
    Criterion("character run", "char_run", 10.0, True, 4.0),
    # a fluent text has one script; word-by-word soups had 0.77-0.9 of their letters in the first
    Criterion("mixed scripts", "dominant_script", 0.9, False, 0.1),
    # surprising tokens outside loops: 0.1 (κ 0.788, 6.5% degenerate -> new), 0.15 (0.782, 10%),
    # 0.3 (0.733, 22%); fluent gemma-3-270m text had at most 0.1, gibberish 0.1-1
    Criterion("surprising tokens", "surprise_fresh", 0.1, True, 0.05),
    # echoes of the question instead of an answer (κ 0.781 at 0.6, 0.788 at 0.75 and 0.9)
    Criterion("echo", "echo", 0.75, True, 0.2, min_chars=12),
    # fused or broken words; the text-only judge's main gibberish criterion (text-only κ 0.609
    # without it, 0.664 at 0.15, 0.637 at 0.3; 0.788 at 0.15-0.4 with the model)
    Criterion("odd words", "odd_words", 0.15, True, 0.1, min_chars=20),
)
"""The degenerate criteria (module docstring; measured on the tune half); an empty or
whitespace-only completion is always degenerate."""
NEW_DISTANCE = 0.2
"""Sentence-embedding cosine distance to the unsteered completion above which content is new.
Tune half: κ 0.767 at 0.1, 0.767 at 0.15, 0.788 at 0.2, 0.668 at 0.25 (re-phrased story
completions of the micro models lie at 0.05-0.25, stories with a new event at 0.07-0.6)."""
NEW_OVERLAP = 0.45
"""Word-set Jaccard distance above which content is new, when no embedding model is available
(tune half with the model: κ 0.774 at 0.4, 0.795 at 0.45, 0.774 at 0.5, 0.682 at 0.6)."""
LOOP_CRITERIA = ("loop", "compressible", "repeated 4-grams", "character run")
"""The criteria that make the unsteered completion a loop of its own (then a steered completion
that repeats it, :data:`OWN_LOOP_SIMILARITY`, is judged by content, not as degenerate)."""
OWN_LOOP_SIMILARITY = 0.7
"""Similarity to a looping unsteered completion (the larger of the difflib character ratio and
the line-layout ratio, :func:`melbo.eval.features.pair_features`) from which a steered completion
repeats the unsteered model's own loop (the labelling guide's rule; κ on the tune half was the
same with and without it)."""
NUMBERS_NEW = 0.75
"""The ``new`` ramp's value when the completion's numbers differ from the unsteered one's, for a
prompt with numbers (another arithmetic answer is a new behavior; tune half: κ 0.767 without,
0.788 with)."""
DISTANCE_WIDTH = 0.1
"""Half-width of the new/unchanged ramp (in the distance's own units)."""


def _ramp(x: float, threshold: float, width: float) -> float:
    return min(1.0, max(0.0, 0.5 + (x - threshold) / (2 * width)))


def check_rows(rows: Iterable[Any], numbers: list[int] | None = None) -> list[dict]:
    """The rows as a list, each checked to be an object with string ``prompt``, ``unsteered`` and
    ``completion``.

    Args:
        numbers: each row's number for messages (a file's line numbers); default 1, 2, ...

    Raises:
        MelboError: a row that is not an object, or misses one of those keys, or holds a non-string
            there (naming the row number and the key).
    """
    out = list(rows)
    for i, r in enumerate(out):
        n = numbers[i] if numbers is not None else i + 1
        if not isinstance(r, dict):
            raise MelboError(f"row {n} is a {type(r).__name__}, not an object with keys {', '.join(REQUIRED)}")
        for key in REQUIRED:
            if key not in r:
                raise MelboError(f"row {n} has no {key!r} (each row needs {', '.join(REQUIRED)})")
            if not isinstance(r[key], str):
                raise MelboError(f"row {n}: {key!r} is a {type(r[key]).__name__}, expected a string")
    return out


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def _distances(rows: list[dict], embedder: str | bool | None) -> tuple[list[float], str]:
    """Distance of each completion to its unsteered completion, and which measure was used."""
    if embedder is not False:
        try:
            texts = sorted({t for r in rows for t in (r["unsteered"], r["completion"])})
            index = {t: j for j, t in enumerate(texts)}
            emb = embed(texts, embedder if isinstance(embedder, str) else None) if texts else None
        except MelboError as e:
            if embedder or named_embedder():  # a model the caller or MELBO_EMBEDDER named: its failure is an error
                raise
            warnings.warn(
                f"no sentence-embedding model ({e}); new vs unchanged falls back to the word-overlap distance",
                stacklevel=3,
            )
        else:
            if emb is None:
                return [], "embedding"
            return [
                float(distance_to(emb[index[r["completion"]]][None], emb[index[r["unsteered"]]])[0]) for r in rows
            ], "embedding"
    return [overlap_distance(r["completion"], r["unsteered"]) for r in rows], "overlap"


def features(row: dict, lm: LoadedModel | None = None, chat: bool = False) -> dict[str, float]:
    """Text features of ``row["completion"]`` (:func:`melbo.eval.features.text_features`), over the
    model's tokens and with the unsteered model's log-probability features when ``lm`` is given."""
    text = row["completion"]
    ids = None
    if lm is not None:
        ids = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    f = text_features(text, ids)
    if lm is not None:
        f.update(lm_features(token_logprobs(lm, row["prompt"], text, chat), ids or []))
    return f


def _degenerate_parts(f: dict[str, float]) -> dict[str, float]:
    """Score of each criterion of :data:`CRITERIA` that applies to features ``f``."""
    return {c.name: s for c in CRITERIA if (s := c.score(f)) is not None}


def decide(f: dict[str, float], distance: float, measure: str) -> tuple[str, dict[str, Any]]:
    """``(label, scores)`` from one completion's features (with :func:`melbo.eval.features.pair_features`,
    ``same`` and ``unsteered_loops``) and its distance to the unsteered one (``measure``:
    ``"embedding"`` or ``"overlap"``) by the module's rule. ``scores`` holds ``degenerate``,
    ``new``, ``unchanged`` in [0, 1] and ``reasons``, the criteria that fired."""
    if f["same"]:
        return "unchanged", {"degenerate": 0.0, "new": 0.0, "unchanged": 1.0, "reasons": ["same text"]}
    if f["chars"] == 0:
        return "degenerate", {"degenerate": 1.0, "new": 0.0, "unchanged": 0.0, "reasons": ["empty"]}
    own_loop = f["unsteered_loops"] and max(f["similarity"], f["layout_similarity"]) >= OWN_LOOP_SIMILARITY
    parts = {k: v for k, v in _degenerate_parts(f).items() if not (own_loop and k in LOOP_CRITERIA)}
    deg = max(parts.values(), default=0.0)
    reasons = [name for name, s in parts.items() if s >= 0.5]
    r = _ramp(distance, NEW_DISTANCE if measure == "embedding" else NEW_OVERLAP, DISTANCE_WIDTH)
    if f["numbers_differ"]:
        r = max(r, NUMBERS_NEW)
    scores = {"degenerate": deg, "new": (1 - deg) * r, "unchanged": (1 - deg) * (1 - r), "reasons": reasons}
    if own_loop:
        reasons.append("the unsteered model's own loop")
    label = "degenerate" if deg >= 0.5 else ("new" if r > 0.5 else "unchanged")
    return label, scores


def judge(
    rows: Iterable[dict], lm: LoadedModel | None = None, embedder: str | bool | None = None, chat: bool = False
) -> list[dict]:
    """Label each steered completion ``degenerate``, ``new`` or ``unchanged`` (module docstring).

    Args:
        rows: dicts with ``prompt``, ``unsteered`` (the unsteered model's completion of the
            prompt) and ``completion`` (the steered one); other keys are kept.
        lm: the *unsteered* model: its tokens for the n-gram features and its log-probabilities of
            each completion token (gibberish criteria). None: text-only features.
        embedder: the sentence-embedding model (a folder or Hub id; None: the default of
            :func:`melbo.embed.embedder_path`). When the default is not installed the judge warns
            and uses the word-overlap distance (:data:`NEW_OVERLAP`) instead; ``False`` uses the
            overlap distance without a warning.
        chat: the prompts were wrapped in the tokenizer's chat template when generating.

    Returns:
        a new dict per row: the row, ``label`` and ``scores`` (``degenerate``, ``new``,
        ``unchanged`` in [0, 1], ``reasons``, ``distance`` and ``distance_measure``, and
        ``features``, the raw features).

    Raises:
        MelboError: a row without a string ``prompt``, ``unsteered`` or ``completion`` (naming the
            row number and key); a named ``embedder`` (or ``MELBO_EMBEDDER``) that cannot be loaded.
    """
    rows = check_rows(rows)
    dist, measure = _distances(rows, embedder)
    out = []
    own: dict[tuple[str, str], dict[str, float]] = {}
    loops: dict[str, bool] = {}
    for r, d in zip(rows, dist):
        key = (r["prompt"], r["completion"])
        if key not in own:
            own[key] = features(r, lm, chat)
        u = r["unsteered"]
        if u not in loops:  # text-only criteria: the same for every model
            parts = _degenerate_parts(text_features(u))
            loops[u] = any(parts[c] >= 0.5 for c in LOOP_CRITERIA if c in parts)
        f = dict(own[key], **pair_features(r["completion"], u, r["prompt"]))
        f.update(same=float(_same(r["completion"], u)), unsteered_loops=float(loops[u]))
        label, scores = decide(f, d, measure)
        scores.update(distance=d, distance_measure=measure, features=f)
        out.append({**r, "label": label, "scores": scores})
    return out


def read_rows(path: str | os.PathLike, what: str = "--input") -> list[dict]:
    """The JSON objects of a JSONL file (UTF-8, one per line; blank lines skipped), each checked
    by :func:`check_rows` (a row's number is its line number).

    Raises:
        MelboError: a missing or unreadable file, a line that is not JSON (naming the line), a row
            that is not an object or misses a key.
    """
    rows, numbers = [], []
    for n, line in enumerate(read_text(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise MelboError(f"{what} {str(path)!r}: line {n} is not valid JSON ({e.msg}, column {e.colno})") from None
        numbers.append(n)
    return check_rows(rows, numbers)
