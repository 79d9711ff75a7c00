"""Agreement of the judge with human labels: the confusion matrix and Cohen's kappa.

Cohen's κ (Cohen 1960, "A coefficient of agreement for nominal scales"):
``κ = (p_o − p_e) / (1 − p_e)`` with ``p_o`` the share of rows where both agree and
``p_e = Σ_k p_human(k) · p_judge(k)`` the agreement expected by chance from the two label
frequencies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from melbo.core.errors import MelboError
from melbo.eval.judge import LABELS


def confusion(human: Sequence[str], judged: Sequence[str], labels: Sequence[str] = LABELS) -> list[list[int]]:
    """``[len(labels)][len(labels)]`` counts: row = the human label, column = the judge's.

    Raises:
        MelboError: the sequences differ in length or hold a label outside ``labels``.
    """
    if len(human) != len(judged):
        raise MelboError(f"{len(human)} human labels but {len(judged)} judged ones")
    index = {k: i for i, k in enumerate(labels)}
    m = [[0] * len(labels) for _ in labels]
    for h, j in zip(human, judged):
        if h not in index or j not in index:
            raise MelboError(f"label {h if h not in index else j!r} is not one of {', '.join(labels)}")
        m[index[h]][index[j]] += 1
    return m


def cohen_kappa(matrix: list[list[int]]) -> float:
    """Cohen's κ of a square confusion matrix (module docstring); 1.0 when both raters put every
    row in one and the same label (p_e = 1), nan for an empty matrix."""
    n = sum(map(sum, matrix))
    if n == 0:
        return float("nan")
    k = len(matrix)
    p_o = sum(matrix[i][i] for i in range(k)) / n
    p_e = sum(sum(matrix[i]) * sum(matrix[r][i] for r in range(k)) for i in range(k)) / n**2
    return 1.0 if p_e == 1 else (p_o - p_e) / (1 - p_e)


def split_of(row_id: str) -> str:
    """``"tune"`` when the last hexadecimal digit of sha1(``row_id``) is even, else ``"heldout"``
    (the labelled set's split, benchmarks/data/judge/GUIDE.md)."""
    return "tune" if int(hashlib.sha1(row_id.encode("utf-8")).hexdigest()[-1], 16) % 2 == 0 else "heldout"


def format_confusion(matrix: list[list[int]], labels: Sequence[str] = LABELS) -> str:
    """The matrix as a text table (rows: human, columns: judge)."""
    w = max(len(x) for x in labels) + 2
    lines = ["human \\ judge".ljust(w + 4) + "".join(x.rjust(w) for x in labels)]
    lines += [f"{h:<{w + 4}}" + "".join(str(c).rjust(w) for c in row) for h, row in zip(labels, matrix)]
    return "\n".join(lines)
