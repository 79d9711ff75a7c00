"""Learned perturbations against negative controls: per-completion predicates ("hits"), the
one-sided Fisher exact test, and the learned-vs-controls table of the reports.

A *predicate* labels completions in a batch: it takes :class:`Completion` rows (prompt, completion,
the unsteered completion of that prompt) and returns one bool per row. The runs' panel uses
:func:`judge_new` (the behavior judge, :mod:`melbo.eval.judge`, labels the completion ``new``);
:func:`changed` and :func:`coherent_and_different` are the older flags of ``completions.jsonl``
(:mod:`melbo.quality`; the latter counts a digit loop as coherent).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from scipy.stats import fisher_exact

from melbo.core.errors import MelboError
from melbo.core.models import LoadedModel
from melbo.core.validate import check_int
from melbo.embed import distance_to, embed
from melbo.eval.judge import judge
from melbo.eval.labels import HIT, ORDER
from melbo.quality import DIFFERENT, is_coherent, token_logprobs

TEST = (
    "one-sided Fisher exact test, learned fires more than the control (scipy.stats.fisher_exact, "
    "alternative='greater'), each completion one trial"
)


class Completion(NamedTuple):
    """One completion to label: its prompt, the text, and the unsteered completion of the prompt."""

    prompt: str
    completion: str
    unsteered: str


Predicate = Callable[[list[Completion]], list[bool]]


@dataclass(frozen=True)
class Labelled:
    """A predicate with the name the reports print for it."""

    label: str
    fn: Predicate

    def __call__(self, rows: list[Completion]) -> list[bool]:
        return self.fn(rows)


def _changed(rows: list[Completion]) -> list[bool]:
    return [r.completion != r.unsteered for r in rows]


changed = Labelled("changed", _changed)
"""Hit: the completion differs from the unsteered one (the ``changed`` flag of ``completions.jsonl``)."""


def coherent_and_different(lm: LoadedModel, chat: bool = False, embedder: str | None = None) -> Predicate:
    """A predicate: hit when the completion is coherent (:func:`melbo.quality.is_coherent`, scored
    by the unsteered ``lm``) and its sentence embedding is more than :data:`melbo.quality.DIFFERENT`
    (cosine distance) from the unsteered completion's: the ``coherent and different`` of the summary.

    Raises:
        MelboError: (when called) no sentence-embedding model installed.
    """

    def predicate(rows: list[Completion]) -> list[bool]:
        if not rows:
            return []
        refs = list(dict.fromkeys(r.unsteered for r in rows))
        emb = embed([r.completion for r in rows] + refs, embedder)
        ref_emb = {t: emb[len(rows) + j] for j, t in enumerate(refs)}
        out = []
        for j, r in enumerate(rows):
            far = float(distance_to(emb[j : j + 1], ref_emb[r.unsteered])[0]) > DIFFERENT
            out.append(far and is_coherent(r.completion, token_logprobs(lm, r.prompt, r.completion, chat)))
        return out

    return Labelled("coherent and different", predicate)


def judge_new(lm: LoadedModel | None = None, chat: bool = False, embedder: str | None = None) -> Predicate:
    """A predicate: hit when the behavior judge (:func:`melbo.eval.judge.judge`, with the unsteered
    ``lm`` for its log-probability criteria; None: text only) labels the completion ``new`` against
    the unsteered completion of its prompt; all rows in one judge call. The default of the runs'
    controls panel.

    Raises:
        MelboError: (when called) a named ``embedder`` that cannot be loaded.
    """

    def predicate(rows: list[Completion]) -> list[bool]:
        judged = judge(
            [{"prompt": r.prompt, "unsteered": r.unsteered, "completion": r.completion} for r in rows],
            lm=lm,
            embedder=embedder,
            chat=chat,
        )
        return [j["label"] == "new" for j in judged]

    return Labelled(HIT, predicate)


def predicate_label(predicate: Predicate) -> str:
    """The name a report prints for ``predicate`` (a :class:`Labelled` one's label, else its ``__name__``)."""
    return predicate.label if isinstance(predicate, Labelled) else str(getattr(predicate, "__name__", "predicate"))


def hits_of(
    predicate: Predicate, prompts: Sequence[str], unsteered: Sequence[str], completions: Sequence[Sequence[str]]
) -> list[list[bool]]:
    """``hits[j][i]``: the predicate on completion ``completions[j][i]`` of prompt ``i``.

    Raises:
        MelboError: the predicate returned the wrong number of labels.
    """
    rows = [Completion(p, comp[i], unsteered[i]) for comp in completions for i, p in enumerate(prompts)]
    flags = list(predicate(rows))
    if len(flags) != len(rows):
        raise MelboError(f"the predicate labelled {len(flags)} completions, expected {len(rows)}")
    n = len(prompts)
    return [[bool(f) for f in flags[j * n : (j + 1) * n]] for j in range(len(completions))]


def fisher_vs_control(hits_learned: int, n_learned: int, hits_control: int, n_control: int) -> float:
    """One-sided Fisher exact p-value that the learned perturbations hit more often than the
    control: the 2×2 table ``[[hits_learned, n_learned − hits_learned], [hits_control, n_control −
    hits_control]]``, ``scipy.stats.fisher_exact(alternative="greater")``; with all margins fixed,
    ``p = P(X ≥ hits_learned)`` for ``X`` hypergeometric (Fisher 1935). Treats every completion as
    an independent trial: completions of one perturbation on several prompts are not, so read p as
    a screening number.

    Raises:
        MelboError: counts that are not whole numbers with ``0 ≤ hits ≤ n`` and ``n ≥ 1``.
    """
    n_l = check_int("learned completions", n_learned, 1)
    n_c = check_int("control completions", n_control, 1)
    h_l = check_int("learned hits", hits_learned, 0, n_l)
    h_c = check_int("control hits", hits_control, 0, n_c)
    _, p = fisher_exact([[h_l, n_l - h_l], [h_c, n_c - h_c]], alternative="greater")
    return float(min(1.0, max(0.0, p)))


def control_table(learned_hits: Sequence[bool], controls: Mapping[str, Sequence[bool]]) -> list[dict]:
    """Rows ``{"group", "hits", "n", "rate", "p_value"}``: the learned perturbations' completions
    first (``p_value`` None), then each control's, with :func:`fisher_vs_control` against learned.

    Raises:
        MelboError: no learned completion, or a control without completions.
    """
    h_l, n_l = sum(map(bool, learned_hits)), len(learned_hits)
    if n_l == 0:
        raise MelboError("no learned completion to compare the controls with")
    rows = [{"group": "learned", "hits": h_l, "n": n_l, "rate": h_l / n_l, "p_value": None}]
    for name, hits in controls.items():
        h_c, n_c = sum(map(bool, hits)), len(hits)
        if n_c == 0:
            raise MelboError(f"control {name!r} has no completion")
        rows.append(
            {"group": name, "hits": h_c, "n": n_c, "rate": h_c / n_c, "p_value": fisher_vs_control(h_l, n_l, h_c, n_c)}
        )
    return rows


def controls_markdown(result: dict) -> list[str]:
    """The learned-vs-controls table (``result``: ``{"predicate", "rows", "descriptions", ...}``
    as :mod:`melbo.eval.panel` builds it) as Markdown lines, with how to read it."""
    rows = result["rows"]
    recall = any("recall" in r for r in rows)
    desc = result.get("descriptions") or {}
    n_ctl = max(1, len(rows) - 1)
    scaled = ", at each scale of the learned ones; sizes below at scale 1" if result.get("scales") else ""
    labelled = all("labels" in r for r in rows)
    lines = [
        "",
        "## Learned vs controls",
        "",
        f"Hit: {result['predicate']}. Each control writes as many completions as the learned perturbations "
        f"({result.get('budget', '?')} per prompt{scaled}, seed "
        f"{result.get('seed', '?')}); p: {TEST}. Several controls are tested: against all {n_ctl} at once, "
        f"compare p with {0.05 / n_ctl:.3g} (Bonferroni at 0.05).",
        "",
        "| group | what | hits / n | rate |"
        + (" recall |" if recall else "")
        + (" judge: new / degenerate / unchanged |" if labelled else "")
        + " Fisher p (learned > control) |",
        "|---|---|---|---|" + ("---|" if recall else "") + ("---|" if labelled else "") + "---|",
    ]
    for r in rows:
        p = "" if r["p_value"] is None else f"{r['p_value']:.3g}"
        rec = f" {100 * r['recall']:.0f}% |" if recall and r.get("recall") is not None else (" - |" if recall else "")
        lab = (" " + " / ".join(str(r["labels"].get(k, 0)) for k in ORDER) + " |") if labelled else ""
        group = f"| {r['group']} | {desc.get(r['group'], '')} |"
        lines.append(f"{group} {r['hits']}/{r['n']} | {100 * r['rate']:.0f}% |{rec}{lab} {p} |")
    return lines
