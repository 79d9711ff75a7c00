"""Features of one steered completion, for the behavior judge (:mod:`melbo.eval.judge`).

Every feature is a plain number computed from the text alone, from the model's tokens, or from
the unsteered model's per-token log-probabilities; the judge's thresholds on them are in
:mod:`melbo.eval.judge`. Sources of the measures:

- *compression ratio*: zlib (DEFLATE, level 9) bytes over UTF-8 bytes, the fixed zlib framing
  (:data:`ZLIB_OVERHEAD` bytes, the size of an empty stream) subtracted so that short texts are not
  pushed above 1; loops compress far below fluent text (the "compression ratio" filter of
  Lee et al. 2022, "Deduplicating training data makes language models better").
- *repeated n-gram share* (1 − distinct-n, Li et al. 2016, "A diversity-promoting objective")
  over the model's tokens when a tokenizer is given, else over words and punctuation marks.
- *tail loop*: the longest suffix of the text that is periodic, for every period p (character
  level): the text is a loop at its end when ``s[i] == s[i + p]`` over a long stretch reaching the
  end; a loop of any granularity (``aaaa``, ``3.3.3.``, ``day day``, a repeated sentence) is
  periodic in characters.
- *script mix*: the Unicode script of each letter (the first word of its Unicode name, Japanese
  kana counted with CJK ideographs, fullwidth Latin with Latin); a fluent text has one dominant
  script.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
import zlib
from collections import Counter
from typing import Any

import numpy as np
import torch

ZLIB_OVERHEAD = len(zlib.compress(b"", 9))
"""Bytes of an empty zlib stream (header and checksum), subtracted from every compressed size."""
NGRAMS = (1, 2, 4, 8)
"""Orders n of the repeated-n-gram shares."""
SURPRISE = -6.0
"""Log-probability (nats) under which a token is surprising to the unsteered model (as
:data:`melbo.quality.SURPRISE`: e^-6 ≈ 0.25%)."""
LOGPROB_FLOOR = -20.0
"""Floor of each token's log-probability in the mean, so that one impossible token does not decide."""
MIN_LOOP_CHARS = 12
"""A tail loop counts only when its periodic stretch is at least this many characters long."""
MIN_LOOP_REPEATS = 2.2
"""A tail loop counts only when its periodic stretch holds at least this many periods: three
repeats make a loop (a sentence said twice is not one), the third one may be cut by the token
limit (tune half of the labelled set: κ flat from 2.2 to 3.0, lower at 2.0)."""
_UNITS = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_WORDS = re.compile(r"\w+", re.UNICODE)
_NUMBERS = re.compile(r"\d+(?:\.\d+)?")
_ROLE = re.compile(r"^\s*\w{1,12}:\s*")
_EDGE = ".,;:!?\"'()[]{}<>*`"
_ODD = re.compile(r"[^\W\d_]\d|\d[^\W\d_]")
_SCRIPT_ALIASES = {"HIRAGANA": "CJK", "KATAKANA": "CJK", "FULLWIDTH": "LATIN", "HALFWIDTH": "CJK"}


def compression_ratio(text: str) -> float:
    """zlib-compressed bytes (minus :data:`ZLIB_OVERHEAD`) over UTF-8 bytes; 0 for an empty text.
    Fluent English of a few hundred bytes: about 0.55-0.8; a loop: well below 0.3."""
    raw = text.encode("utf-8")
    if not raw:
        return 0.0
    return max(0, len(zlib.compress(raw, 9)) - ZLIB_OVERHEAD) / len(raw)


def text_units(text: str) -> list[str]:
    """Words and single punctuation marks of ``text`` (the units without a tokenizer)."""
    return _UNITS.findall(text)


def repeated_share(units: list[Any], n: int) -> float:
    """Share of the n-grams of ``units`` that already occurred earlier: ``1 − distinct/total``
    (0 when there is no n-gram: fewer than n units)."""
    grams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def repeated_mask(units: list[Any], n: int) -> list[bool]:
    """``[len(units)]``: whether each unit lies inside an n-gram that occurred earlier in ``units``."""
    seen: set[tuple] = set()
    mask = [False] * len(units)
    for i in range(len(units) - n + 1):
        g = tuple(units[i : i + n])
        if g in seen:
            for j in range(i, i + n):
                mask[j] = True
        seen.add(g)
    return mask


def tail_loop(text: str, min_repeats: float = MIN_LOOP_REPEATS) -> dict[str, float]:
    """The longest periodic suffix of ``text`` over all periods (whitespace counts: a text that ends
    in blank lines ``\n  \n  \n`` ends in a loop).

    For each period p the suffix ``s[k:]`` is periodic when ``s[i] == s[i + p]`` for every
    ``i ≥ k``; its length is the number of trailing matches plus p. Among the periods whose
    periodic suffix holds at least ``min_repeats`` periods (:data:`MIN_LOOP_REPEATS`) and
    :data:`MIN_LOOP_CHARS` characters, the one covering the most text wins (the shortest such
    period on ties).

    Returns:
        ``loop_share`` (covered characters over all characters, 0..1), ``loop_period``
        (characters, 0 when there is no loop) and ``loop_repeats`` (covered length over the period).
    """
    s = text
    n = len(s)
    best = {"loop_share": 0.0, "loop_period": 0.0, "loop_repeats": 0.0}
    if n < MIN_LOOP_CHARS:
        return best
    a = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32)
    cover_best = 0
    for p in range(1, n // 2 + 1):
        eq = a[:-p] == a[p:]
        misses = np.flatnonzero(~eq)
        run = len(eq) - 1 - int(misses[-1]) if misses.size else len(eq)
        cover = run + p
        if cover >= min_repeats * p and cover >= MIN_LOOP_CHARS and cover > cover_best:
            cover_best = cover
            best = {"loop_share": cover / n, "loop_period": float(p), "loop_repeats": cover / p}
    return best


def longest_char_run(text: str) -> int:
    """Length of the longest run of one non-space character repeated (``aaaa`` → 4)."""
    best, run, prev = 0, 0, ""
    for ch in text:
        run = run + 1 if ch == prev and not ch.isspace() else 1
        prev = ch
        best = max(best, run)
    return best if text.strip() else 0


def odd_word_share(text: str) -> float:
    """Share of the words (whitespace-separated chunks with a letter, surrounding punctuation
    stripped, 2+ characters) that no fluent text writes often: a lower-to-upper case change inside
    (fused tokens, ``suchenichtlichVIEWS``), a letter next to a digit (``0HOMIm``), or 16 or more
    characters. Punctuation inside a word does not count: code writes ``fibonacci(n-1)``. 0 for no
    word."""
    words = [w.strip(_EDGE) for w in text.split()]
    words = [w for w in words if len(w) >= 2 and any(c.isalpha() for c in w)]
    return sum(_odd(w) for w in words) / len(words) if words else 0.0


def _odd(word: str) -> bool:
    return (
        len(word) >= 16 or bool(_ODD.search(word)) or any(a.islower() and b.isupper() for a, b in zip(word, word[1:]))
    )


def script(ch: str) -> str:
    """Script-ish class of a letter: the first word of its Unicode name (``LATIN``, ``CYRILLIC``,
    ``CJK``, ``HANGUL``, ``DEVANAGARI``, ...), kana as ``CJK``, fullwidth Latin as ``LATIN``."""
    name = unicodedata.name(ch, "UNKNOWN")
    first = name.split(" ")[0]
    if first in ("FULLWIDTH", "HALFWIDTH") and "LATIN" in name:
        return "LATIN"
    return _SCRIPT_ALIASES.get(first, first)


def script_mix(text: str) -> dict[str, float]:
    """``dominant_script``: share of the letters in the most common script (1 for no letter);
    ``scripts``: how many scripts hold at least 5% of the letters."""
    counts = Counter(script(ch) for ch in text if ch.isalpha())
    total = sum(counts.values())
    if not total:
        return {"dominant_script": 1.0, "scripts": 0.0}
    return {
        "dominant_script": max(counts.values()) / total,
        "scripts": float(sum(c >= 0.05 * total for c in counts.values())),
    }


def char_shares(text: str) -> dict[str, float]:
    """Shares of the non-space characters: ``letter_share`` (letters), ``digit_share`` (digits),
    ``symbol_share`` (neither: punctuation, symbols, control characters); and ``nonword_share``, the
    share of whitespace-separated chunks holding no letter (``3.3.3``, ``!!!``, ``10000``)."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return {"letter_share": 0.0, "digit_share": 0.0, "symbol_share": 0.0, "nonword_share": 0.0}
    letters = sum(c.isalpha() for c in chars)
    digits = sum(c.isdigit() for c in chars)
    chunks = text.split()
    return {
        "letter_share": letters / len(chars),
        "digit_share": digits / len(chars),
        "symbol_share": (len(chars) - letters - digits) / len(chars),
        "nonword_share": sum(not any(c.isalpha() for c in w) for w in chunks) / len(chunks),
    }


def overlap_distance(a: str, b: str) -> float:
    """``1 − |A ∩ B| / |A ∪ B|`` over the sets of lower-cased words of ``a`` and ``b`` (Jaccard
    distance; 0 for two texts without words)."""
    wa, wb = set(_WORDS.findall(a.lower())), set(_WORDS.findall(b.lower()))
    union = wa | wb
    return 1.0 - len(wa & wb) / len(union) if union else 0.0


def lm_features(logprobs: torch.Tensor, token_ids: list[int]) -> dict[str, float]:
    """Features of the unsteered model's log-probabilities ``[k]`` of the completion's tokens.

    Returns:
        ``surprise``: share of tokens under :data:`SURPRISE`; ``surprise_fresh``: the same among
        tokens outside a repeated token 4-gram (a loop is predictable once started and would
        dilute it); ``mean_logprob``: mean log-probability with each token floored at
        :data:`LOGPROB_FLOOR` (nats). An empty completion gets 1, 1 and the floor.
    """
    k = logprobs.numel()
    if not k:
        return {"surprise": 1.0, "surprise_fresh": 1.0, "mean_logprob": LOGPROB_FLOOR}
    low = (logprobs < SURPRISE).tolist()
    fresh = [lo for lo, rep in zip(low, repeated_mask(token_ids[:k], 4)) if not rep]
    return {
        "surprise": sum(low) / k,
        "surprise_fresh": sum(fresh) / len(fresh) if fresh else 0.0,
        "mean_logprob": float(logprobs.clamp(min=LOGPROB_FLOOR).mean()),
    }


def text_features(text: str, token_ids: list[int] | None = None) -> dict[str, float]:
    """Every text feature of one completion (module docstring): ``chars``, ``units``,
    ``compression``, ``repeated_<n>`` and ``distinct_<n>`` for n in :data:`NGRAMS` (over
    ``token_ids`` when given, else over :func:`text_units`), ``word_repeated_3`` (word 3-grams, as
    :func:`melbo.quality.repetition`), the :func:`tail_loop`, ``char_run``, ``odd_words``
    (:func:`odd_word_share`), :func:`script_mix` and :func:`char_shares`."""
    units: list[Any] = list(token_ids) if token_ids is not None else text_units(text)
    out: dict[str, float] = {"chars": float(len(text.strip())), "units": float(len(units))}
    out["compression"] = compression_ratio(text.strip())
    for n in NGRAMS:
        out[f"repeated_{n}"] = repeated_share(units, n)
        out[f"distinct_{n}"] = 1.0 - out[f"repeated_{n}"] if len(units) >= n else 1.0
    out["word_repeated_3"] = repeated_share(text.split(), 3)
    out.update(tail_loop(text))
    out["char_run"] = float(longest_char_run(text))
    out["odd_words"] = odd_word_share(text)
    out.update(script_mix(text))
    out.update(char_shares(text))
    return out


def numbers(text: str) -> set[str]:
    """The numbers (digit runs, with a decimal part) of ``text``, less one that ends the text: a
    completion stopped by the token limit may have cut it."""
    found = [(m.group(), m.end()) for m in _NUMBERS.finditer(text.rstrip())]
    end = len(text.rstrip())
    return {s for s, e in found if e != end}


def skeleton(text: str) -> list[str]:
    """The first word of each non-blank line, lower-cased: the layout of a text of lines
    (``["hi", "user", "assistant", "user", ...]`` for a chat-turn loop)."""
    return [w[0].lower() for line in text.splitlines() if (w := _WORDS.findall(line))]


def echo_share(completion: str, prompt: str) -> float:
    """Share of the completion's lines (less a leading ``Role:`` tag; lines under 8 characters
    skipped) that are found verbatim in the prompt, case and whitespace ignored: the model echoes
    the question (``Q: What is 17 times 3?`` / ``User: Hi! How are you today?``) instead of
    answering. 0 when no line is left."""
    p = " ".join(prompt.split()).lower()
    lines = [" ".join(_ROLE.sub("", line).split()).lower() for line in completion.splitlines()]
    lines = [x for x in lines if len(x) >= 8]
    return sum(x in p for x in lines) / len(lines) if lines else 0.0


def pair_features(completion: str, unsteered: str, prompt: str = "") -> dict[str, float]:
    """Features of a completion against the unsteered completion of ``prompt``:
    ``overlap_distance`` (:func:`overlap_distance`), ``similarity`` (difflib's ratio of matching
    characters, ``2·M / (len(a) + len(b))``, Ratcliff-Obershelp, whitespace runs as one space) and
    ``numbers_differ``: 1 when the prompt holds a number (it asks about numbers) and the numbers of
    the two completions that are not in the prompt differ (another answer), else 0;
    ``layout_similarity``: difflib's ratio of the two :func:`skeleton` sequences when both texts
    have at least 3 lines, else 0; ``echo``: :func:`echo_share` of the completion in ``prompt``."""
    a, b = " ".join(completion.split()), " ".join(unsteered.split())
    sa, sb = skeleton(completion), skeleton(unsteered)
    asked = numbers(prompt + " ")
    return {
        "overlap_distance": overlap_distance(completion, unsteered),
        "similarity": difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() if a or b else 1.0,
        "numbers_differ": float(bool(asked) and numbers(completion) - asked != numbers(unsteered) - asked),
        "layout_similarity": difflib.SequenceMatcher(None, sa, sb, autojunk=False).ratio()
        if len(sa) >= 3 and len(sb) >= 3
        else 0.0,
        "echo": echo_share(completion, prompt),
    }
