"""Answer normalisation, exact match and token F1: the SQuAD v1.1 evaluation script, as Search-R1 uses it.

``normalize_answer(s)``: lowercase, drop ASCII punctuation (``string.punctuation``), drop the articles
"a", "an", "the" as whole words, collapse whitespace (the SQuAD order: lower, punctuation, articles,
whitespace). ``exact_match(prediction, golds)`` is 1.0 when the normalised prediction equals some
normalised gold; ``f1(prediction, golds)`` is the token F1 of the normalised bags of words, max over the
golds (SQuAD: a prediction or a gold that normalises to nothing scores 0 F1 unless both are empty,
which the SQuAD script scores 0 too: precision needs at least one common token). ``golds`` may be one
string or a sequence of strings; an empty sequence scores 0.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: ``"The  Eiffel-Tower!"`` -> ``"eiffeltower"``."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _golds(golds: str | Sequence[str]) -> list[str]:
    if isinstance(golds, str):
        return [golds]
    return list(golds)


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 if ``normalize_answer(prediction)`` equals the normalisation of some gold, else 0.0."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in _golds(golds)))


def _token_f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    common = collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, golds: str | Sequence[str]) -> float:
    """Token F1 of the normalised prediction against each normalised gold, the max over the golds."""
    p = normalize_answer(prediction).split()
    return max((_token_f1(p, normalize_answer(g).split()) for g in _golds(golds)), default=0.0)
