"""Evaluation of steered completions: the behavior judge (:func:`melbo.eval.judge.judge`) labels
each one ``degenerate``, ``new`` or ``unchanged`` from text features, the unsteered model's
log-probabilities and sentence embeddings (:mod:`melbo.eval.features`)."""

from melbo.eval.judge import LABELS, judge

__all__ = ["LABELS", "judge"]
