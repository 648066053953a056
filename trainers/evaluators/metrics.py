"""Evaluation metrics on numpy arrays: classification scores and ranked-retrieval scores.

Pure numpy, no JAX: evaluators pull predictions to the host once and score them here.

Classification (binary unless stated; every function returns a Python float):

* ``roc_auc(labels, scores)``: area under the ROC curve via the Mann-Whitney U statistic with
  average ranks for tied scores (equals ``sklearn.metrics.roc_auc_score``). NaN, with a
  ``RuntimeWarning``, when only one class is present (sklearn does the same).
* ``pr_auc(labels, scores)``: average precision, ``sum_n (R_n - R_{n-1}) P_n`` over the distinct
  score thresholds (equals ``sklearn.metrics.average_precision_score``). NaN, with a warning, when
  there is no positive (sklearn returns 0.0 there; an undefined score should not read as "bad").
* ``logloss(labels, probs, eps=None)``: mean negative log-likelihood; ``probs`` is ``[n]``
  (probability of class 1) or ``[n, C]`` (rows of class probabilities, labels in ``[0, C)``).
  Probabilities are clipped to ``[eps, 1 - eps]``, ``eps`` defaulting to the machine epsilon of
  the probabilities' float type, as ``sklearn.metrics.log_loss`` does.
* ``accuracy(labels, preds)``: fraction of equal entries; ``preds`` may be ``[n, C]`` scores
  (argmax taken).
* ``macro_f1(labels, preds)``: unweighted mean over classes of ``2 tp / (2 tp + fp + fn)``, the
  classes being those present in ``labels`` or ``preds`` (equals sklearn's
  ``f1_score(average="macro")``).
* ``classification_metrics(labels, logits)``: all of the above for a binary classifier's logits
  (threshold: probability 0.5); ``majority_metrics(labels, majority)``: the same scores of the
  constant predictor (the majority-class baseline).

Retrieval: ``retrieved`` is ``[q, K]`` ids ranked best-first per query; ``relevant`` is either a
sequence of ``q`` collections of ids (sets, lists, arrays; variable sizes) or a 1-D array ``[q]``
holding the single relevant id of each query. Ids are integers or strings.

* ``recall_at_k``: ``|relevant ∩ top-k| / |relevant|``, averaged over queries.
* ``hit_rate_at_k``: 1 if any relevant id is in the top-k, averaged over queries.
* ``mrr``: reciprocal rank of the first relevant id within the whole retrieved list, 0 when none.

An id repeated inside one retrieved row counts once, at its best rank. A retrieved value that is
not a relevant id never counts, so rows can be padded with any id that is not relevant.

**Queries with no relevant id** (an empty collection) are excluded from every average; the
counts come back from ``retrieval_metrics`` as ``num_queries_evaluated`` and
``num_queries_no_relevant``. When no query has a relevant id the averages are NaN.

``retrieval_metrics(retrieved, relevant, ks)`` computes all of them from one hit matrix. The
building blocks (``flatten_relevant``, ``hits_from_codes``, ``metrics_from_hits``) are public so
that ``trainers.evaluators.retrieval`` can score gallery indices without re-encoding ids.
Everything is vectorised: 100k queries × top-50 takes well under a second of numpy sorting.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "accuracy",
    "classification_metrics",
    "check_k",
    "flatten_relevant",
    "hit_matrix",
    "hit_rate_at_k",
    "hits_from_codes",
    "id_kind",
    "logloss",
    "macro_f1",
    "majority_metrics",
    "metrics_from_hits",
    "mrr",
    "pr_auc",
    "recall_at_k",
    "retrieval_metrics",
    "roc_auc",
]


# ----------------------------------------------------------------------------- classification


def _binary_inputs(labels: Any, scores: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validates ``[n]`` binary labels and ``[n]`` finite scores; returns (bool labels, f64 scores)."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{name}: labels has {y.size} entries but scores has {s.size}")
    if y.size == 0:
        raise ValueError(f"{name}: empty inputs")
    if y.dtype != bool:
        bad = ~np.isin(y, (0, 1))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name}: labels must be 0/1 or bool; labels[{i}] = {y[i]!r}")
        y = y.astype(bool)
    if not np.isfinite(s).all():
        i = int(np.flatnonzero(~np.isfinite(s))[0])
        raise ValueError(f"{name}: scores must be finite; scores[{i}] = {s[i]}")
    return y, s


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` (ascending); tied values share the mean of their ranks. ``[n] -> [n]``."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_group = np.empty(xs.size, dtype=bool)
    new_group[0] = True
    np.not_equal(xs[1:], xs[:-1], out=new_group[1:])
    starts = np.flatnonzero(new_group)
    counts = np.diff(np.append(starts, xs.size))
    group_rank = starts + (counts + 1) / 2.0  # mean of ranks start+1 .. start+count
    ranks = np.empty(xs.size, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, counts)
    return ranks


def roc_auc(labels: Any, scores: Any) -> float:
    """ROC AUC = (sum of positive ranks - P(P+1)/2) / (P N), ties at average rank. ``[n], [n] -> float``."""
    y, s = _binary_inputs(labels, scores, "roc_auc")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        warnings.warn("roc_auc: only one class present in labels; ROC AUC is undefined (NaN)",
                      RuntimeWarning, stacklevel=2)
        return float("nan")
    rank_sum = float(_average_ranks(s)[y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def pr_auc(labels: Any, scores: Any) -> float:
    """Average precision (area under the step PR curve, no interpolation). ``[n], [n] -> float``."""
    y, s = _binary_inputs(labels, scores, "pr_auc")
    n_pos = int(y.sum())
    if n_pos == 0:
        warnings.warn("pr_auc: no positive label; average precision is undefined (NaN)",
                      RuntimeWarning, stacklevel=2)
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # last index of each group of equal scores = one threshold
    last = np.flatnonzero(np.append(s_sorted[1:] != s_sorted[:-1], True))
    tps = np.cumsum(y_sorted)[last].astype(np.float64)
    precision = tps / (last + 1)
    recall = tps / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def logloss(labels: Any, probs: Any, eps: float | None = None) -> float:
    """Mean cross-entropy. ``[n] labels, [n] P(y=1)`` or ``[n] int labels, [n, C] probs -> float``."""
    p = np.asarray(probs)
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
    if eps is None:
        eps = float(np.finfo(p.dtype).eps)
    y = np.asarray(labels).reshape(-1)
    if p.ndim == 1:
        y, _ = _binary_inputs(y, p, "logloss")
        p = np.stack([1.0 - p, p], axis=1)
        y = y.astype(np.int64)
    elif p.ndim == 2:
        if y.shape[0] != p.shape[0]:
            raise ValueError(f"logloss: labels has {y.shape[0]} entries but probs has {p.shape[0]} rows")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]:
            raise ValueError(f"logloss: labels must be integers in [0, {p.shape[1]}) for [n, C] probs")
    else:
        raise ValueError(f"logloss: probs must be [n] or [n, C], got shape {p.shape}")
    if p.size and (np.nanmin(p) < 0 or np.nanmax(p) > 1 or np.isnan(p).any()):
        raise ValueError("logloss: probs must lie in [0, 1]")
    p_true = np.clip(p[np.arange(y.size), y], eps, 1.0 - eps).astype(np.float64)
    return float(-np.mean(np.log(p_true)))


def accuracy(labels: Any, preds: Any) -> float:
    """Fraction of ``preds == labels``; ``[n, C]`` preds are argmaxed first. ``-> float``."""
    y = np.asarray(labels)
    p = np.asarray(preds)
    if p.ndim == y.ndim + 1:
        p = np.argmax(p, axis=-1)
    if p.shape != y.shape:
        raise ValueError(f"accuracy: labels shape {y.shape} != preds shape {p.shape}")
    if y.size == 0:
        return float("nan")
    return float(np.mean(p == y))


def macro_f1(labels: Any, preds: Any) -> float:
    """Unweighted mean over classes (those in labels ∪ preds) of 2tp / (2tp + fp + fn). ``-> float``."""
    y = np.asarray(labels).reshape(-1)
    p = np.asarray(preds).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"macro_f1: labels has {y.size} entries but preds has {p.size}")
    if y.size == 0:
        return float("nan")
    classes, codes = np.unique(np.concatenate([y, p]), return_inverse=True)
    yc, pc = codes[: y.size], codes[y.size:]
    c = classes.size
    true_count = np.bincount(yc, minlength=c)
    pred_count = np.bincount(pc, minlength=c)
    tp = np.bincount(yc[yc == pc], minlength=c)
    # every class is in labels or preds, so true_count + pred_count > 0
    f1 = 2.0 * tp / (true_count + pred_count)
    return float(np.mean(f1))


def classification_metrics(labels: Any, logits: Any) -> dict[str, float]:
    """labels [n] in {0, 1}, logits [n] -> roc_auc, pr_auc, accuracy, macro_f1 (at p = 0.5), logloss."""
    logits = np.asarray(logits)
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    preds = (logits > 0).astype(np.int64)
    return {"roc_auc": roc_auc(labels, logits), "pr_auc": pr_auc(labels, logits),
            "accuracy": accuracy(labels, preds), "macro_f1": macro_f1(labels, preds),
            "logloss": logloss(labels, probs)}


def majority_metrics(labels: Any, majority: int) -> dict[str, float]:
    """The constant predictor ``majority`` on ``labels [n]``: accuracy, macro_f1, roc_auc (0.5), pr_auc
    (the prevalence of class 1)."""
    labels = np.asarray(labels)
    const = np.full(labels.shape, majority, np.int64)
    return {"accuracy": accuracy(labels, const), "macro_f1": macro_f1(labels, const),
            "roc_auc": roc_auc(labels, const.astype(np.float64)),
            "pr_auc": pr_auc(labels, const.astype(np.float64))}


# ----------------------------------------------------------------------------- retrieval


def id_kind(a: np.ndarray) -> str:
    """'int' or 'str' for an id array; raises on anything else (floats, mixed objects)."""
    if a.dtype.kind in "iub":
        return "int"
    if a.dtype.kind in "US":
        return "str"
    if a.dtype.kind == "O":
        if a.size == 0:
            return "int"
        kinds = {"str" if isinstance(v, str) else "int" if isinstance(v, (int, np.integer)) else "?"
                 for v in a.ravel()}
        if len(kinds) == 1 and "?" not in kinds:
            return kinds.pop()
    raise TypeError(f"ids must be integers or strings, got dtype {a.dtype}")


def flatten_relevant(relevant: Any, num_queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relevance as flat pairs.

    ``relevant``: ``[q]`` array of single positive ids, or a length-``q`` sequence of collections.
    Returns ``(rel_query [m] int64, rel_id [m], num_relevant [q] int64)`` with each (query, id)
    pair once (duplicates inside a collection are dropped and not counted).
    """
    if not isinstance(relevant, (np.ndarray, list, tuple)) and hasattr(relevant, "__array__"):
        relevant = np.asarray(relevant)  # e.g. a jax.Array of single positives
    if isinstance(relevant, np.ndarray) and relevant.ndim == 1 and relevant.dtype.kind != "O":
        if relevant.shape[0] != num_queries:
            raise ValueError(f"relevant has {relevant.shape[0]} entries for {num_queries} queries")
        id_kind(relevant)
        return (np.arange(num_queries, dtype=np.int64), relevant,
                np.ones(num_queries, dtype=np.int64))
    relevant = list(relevant)
    if len(relevant) != num_queries:
        raise ValueError(f"relevant has {len(relevant)} entries for {num_queries} queries")
    groups: list[Iterable[Any]] = []
    for i, r in enumerate(relevant):
        if isinstance(r, (str, bytes, int, np.integer)):
            groups.append((r,))
        elif isinstance(r, np.ndarray):
            groups.append(r.reshape(-1).tolist())
        elif isinstance(r, Iterable):
            groups.append(r if isinstance(r, (set, frozenset)) else list(r))
        else:
            raise TypeError(f"relevant[{i}] must be an id or a collection of ids, got {type(r).__name__}")
    lens = np.fromiter((len(g) for g in groups), dtype=np.int64, count=num_queries)  # type: ignore[arg-type]
    rel_query = np.repeat(np.arange(num_queries, dtype=np.int64), lens)
    flat = list(itertools.chain.from_iterable(groups))
    rel_id = np.array(flat) if flat else np.zeros(0, dtype=np.int64)
    if rel_id.ndim != 1:
        raise TypeError("relevant ids must be scalars (int or str)")
    kind = id_kind(rel_id)
    if kind == "str" and rel_id.dtype.kind == "O":
        rel_id = rel_id.astype(str)
    # drop repeated (query, id) pairs and recount
    if rel_id.size:
        _, codes = np.unique(rel_id, return_inverse=True)
        keys = rel_query * (int(codes.max()) + 1) + codes.reshape(-1)
        _, first = np.unique(keys, return_index=True)
        if first.size != keys.size:
            first.sort()
            rel_query, rel_id = rel_query[first], rel_id[first]
            lens = np.bincount(rel_query, minlength=num_queries).astype(np.int64)
    return rel_query, rel_id, lens


def _first_occurrence(hits: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Keeps only the first (best-ranked) True per repeated key in each row. ``[q, K] -> [q, K]``."""
    flat_pos = np.flatnonzero(hits)  # row-major: ascending rank within each row
    _, first = np.unique(keys.reshape(-1)[flat_pos], return_index=True)
    if first.size == flat_pos.size:
        return hits
    out = np.zeros(hits.size, dtype=bool)
    out[flat_pos[first]] = True
    return out.reshape(hits.shape)


def hits_from_codes(retrieved_codes: np.ndarray, rel_query: np.ndarray, rel_code: np.ndarray) -> np.ndarray:
    """Hit matrix from non-negative integer item codes; negative retrieved codes never hit.

    ``retrieved_codes [q, K] int, rel_query [m], rel_code [m] (>= 0) -> hits [q, K] bool``,
    True where the item at that rank is relevant to the query (first occurrence per item only).
    """
    r = np.asarray(retrieved_codes, dtype=np.int64)
    if r.ndim != 2:
        raise ValueError(f"retrieved must be [q, K], got shape {r.shape}")
    q, k = r.shape
    rel_query = np.asarray(rel_query, dtype=np.int64)
    rel_code = np.asarray(rel_code, dtype=np.int64)
    if rel_code.size == 0 or r.size == 0:
        return np.zeros((q, k), dtype=bool)
    span = int(max(r.max(), rel_code.max())) + 1
    if q * span >= 2**62:  # re-encode densely so that query-major keys fit in int64
        _, inv = np.unique(np.concatenate([r.reshape(-1), rel_code]), return_inverse=True)
        inv = inv.reshape(-1)
        r = np.where(r >= 0, inv[: r.size].reshape(q, k), -1)
        rel_code = inv[r.size:]
        span = int(inv.max()) + 1
    keys = np.arange(q, dtype=np.int64)[:, None] * span + r
    cand = np.flatnonzero(r.reshape(-1) >= 0)  # usually a small share of the matrix
    rel_keys = np.sort(rel_query * span + rel_code)
    cand_keys = keys.reshape(-1)[cand]
    pos = np.minimum(np.searchsorted(rel_keys, cand_keys), rel_keys.size - 1)
    hits = np.zeros(q * k, dtype=bool)
    hits[cand[rel_keys[pos] == cand_keys]] = True
    return _first_occurrence(hits.reshape(q, k), keys)


def hit_matrix(retrieved: Any, relevant: Any) -> tuple[np.ndarray, np.ndarray]:
    """``retrieved [q, K] ids, relevant -> (hits [q, K] bool, num_relevant [q] int64)``."""
    ret = np.asarray(retrieved)
    if ret.ndim != 2:
        raise ValueError(f"retrieved must be [q, K], got shape {ret.shape}")
    q = ret.shape[0]
    if not isinstance(relevant, (np.ndarray, list, tuple)) and hasattr(relevant, "__array__"):
        relevant = np.asarray(relevant)
    rel_query, rel_id, num_relevant = flatten_relevant(relevant, q)
    ret_kind, rel_kind = id_kind(ret), id_kind(rel_id)
    if ret.dtype.kind == "O":
        ret = ret.astype(np.int64 if ret_kind == "int" else str)
    if rel_id.size and ret.size and ret_kind != rel_kind:
        raise TypeError(f"retrieved ids are {ret_kind}s but relevant ids are {rel_kind}s")
    if isinstance(relevant, np.ndarray) and relevant.ndim == 1 and relevant.dtype.kind != "O":
        hits = ret == relevant[:, None]  # single positive per query: no encoding needed
        return hits & (np.cumsum(hits, axis=1) == 1), num_relevant
    if rel_id.size == 0:
        return np.zeros(ret.shape, dtype=bool), num_relevant
    # code = position among the distinct relevant ids; retrieved ids relevant to no query -> -1
    if ret_kind == "str":
        ret, rel_id = ret.astype(str), rel_id.astype(str)
    uniq, rel_code = np.unique(rel_id, return_inverse=True)
    flat = ret.reshape(-1)
    pos = np.minimum(np.searchsorted(uniq, flat), uniq.size - 1)
    codes = np.where(uniq[pos] == flat, pos, -1).reshape(ret.shape)
    return hits_from_codes(codes, rel_query, rel_code.reshape(-1)), num_relevant


def check_k(k: int, name: str) -> int:
    if int(k) != k or k < 1:
        raise ValueError(f"{name}: k must be a positive integer, got {k!r}")
    return int(k)


def metrics_from_hits(hits: np.ndarray, num_relevant: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """``hits [q, K] bool, num_relevant [q] -> {"recall@k", "hit_rate@k" for k in ks, "mrr", counts}``.

    Queries with ``num_relevant == 0`` are excluded. ``k`` larger than ``K`` uses all ``K`` columns.
    """
    hits = np.asarray(hits, dtype=bool)
    num_relevant = np.asarray(num_relevant, dtype=np.int64)
    keep = num_relevant > 0
    h, nr = hits[keep], num_relevant[keep]
    n_eval = int(keep.sum())
    out: dict[str, float] = {}
    cum = np.cumsum(h, axis=1, dtype=np.int64) if h.shape[1] else np.zeros((h.shape[0], 0), np.int64)
    for k in ks:
        k = check_k(k, "metrics_from_hits")
        found = cum[:, min(k, h.shape[1]) - 1] if h.shape[1] else np.zeros(h.shape[0], np.int64)
        out[f"recall@{k}"] = float(np.mean(found / nr)) if n_eval else float("nan")
        out[f"hit_rate@{k}"] = float(np.mean(found > 0)) if n_eval else float("nan")
    any_hit = h.any(axis=1)
    first = np.argmax(h, axis=1) if h.shape[1] else np.zeros(h.shape[0], np.int64)
    out["mrr"] = float(np.mean(np.where(any_hit, 1.0 / (first + 1), 0.0))) if n_eval else float("nan")
    out["num_queries_evaluated"] = n_eval
    out["num_queries_no_relevant"] = int(keep.size - n_eval)
    return out


def retrieval_metrics(retrieved: Any, relevant: Any, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """All retrieval metrics from one hit matrix; see the module docstring for the definitions."""
    hits, num_relevant = hit_matrix(retrieved, relevant)
    return metrics_from_hits(hits, num_relevant, ks)


def recall_at_k(retrieved: Any, relevant: Any, k: int) -> float:
    """Mean over queries with relevant ids of |relevant ∩ top-k| / |relevant|."""
    return retrieval_metrics(retrieved, relevant, (check_k(k, "recall_at_k"),))[f"recall@{k}"]


def hit_rate_at_k(retrieved: Any, relevant: Any, k: int) -> float:
    """Fraction of queries (with relevant ids) with at least one relevant id in the top-k."""
    return retrieval_metrics(retrieved, relevant, (check_k(k, "hit_rate_at_k"),))[f"hit_rate@{k}"]


def mrr(retrieved: Any, relevant: Any) -> float:
    """Mean reciprocal rank of the first relevant id in the retrieved list (0 when none)."""
    hits, num_relevant = hit_matrix(retrieved, relevant)
    return metrics_from_hits(hits, num_relevant, ())["mrr"]


def ndcg_at_k(hits: np.ndarray, num_relevant: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Binary-relevance NDCG@k (Järvelin & Kekäläinen 2002): ``DCG = sum_i hit_i / log2(i + 2)`` over the top
    ``k``, over the ideal ``sum_{i < min(R, k)} 1 / log2(i + 2)``; ``hits [q, K] bool, num_relevant [q]`` ->
    ``{"ndcg@k"}``, queries with no relevant item excluded."""
    hits, num_relevant = np.asarray(hits, bool), np.asarray(num_relevant)
    keep = num_relevant > 0
    hits, num_relevant = hits[keep], num_relevant[keep]
    discount = 1.0 / np.log2(np.arange(hits.shape[1]) + 2.0)
    out = {}
    for k in ks:
        dcg = (hits[:, :k] * discount[:k]).sum(1)
        ideal = np.cumsum(discount[:k])[np.minimum(num_relevant, k) - 1]
        out[f"ndcg@{k}"] = float((dcg / ideal).mean()) if len(hits) else 0.0
    return out
