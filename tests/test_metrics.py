"""trainers.evaluators.metrics against scikit-learn and against a pure-python retrieval reference."""

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from trainers.evaluators import metrics as M

SEEDS = [0, 1, 2, 3, 4]


def _binary_case(seed: int, n: int = 500):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    # coarse scores (one decimal) -> many ties; shifted by the label so the AUC is not ~0.5
    scores = np.round(rng.random(n) + 0.3 * labels, 1)
    return labels, scores


@pytest.mark.parametrize("seed", SEEDS)
def test_roc_auc_matches_sklearn_with_ties(seed):
    labels, scores = _binary_case(seed)
    assert len(np.unique(scores)) < len(scores) // 10  # really tied
    assert M.roc_auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    cont = np.random.default_rng(seed).standard_normal(labels.size)
    assert M.roc_auc(labels.astype(bool), cont) == pytest.approx(skm.roc_auc_score(labels, cont), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_pr_auc_matches_sklearn_average_precision(seed):
    labels, scores = _binary_case(seed)
    assert M.pr_auc(labels, scores) == pytest.approx(skm.average_precision_score(labels, scores), abs=1e-12)
    rng = np.random.default_rng(seed + 100)
    rare = (rng.random(300) < 0.05).astype(int)
    rare[0] = 1
    cont = rng.standard_normal(300)
    assert M.pr_auc(rare, cont) == pytest.approx(skm.average_precision_score(rare, cont), abs=1e-12)


def test_auc_degenerate_inputs():
    with pytest.warns(RuntimeWarning, match="one class"):
        assert np.isnan(M.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    with pytest.warns(RuntimeWarning, match="no positive"):
        assert np.isnan(M.pr_auc([0, 0], [0.1, 0.2]))
    with pytest.raises(ValueError, match="labels must be 0/1"):
        M.roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        M.pr_auc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="entries"):
        M.roc_auc([0, 1, 1], [0.1, 0.2])
    assert M.roc_auc([0, 1], [0.5, 0.5]) == 0.5
    assert M.pr_auc([1, 1, 0], [0.9, 0.8, 0.1]) == 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_logloss_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 400)
    probs = np.round(rng.random(400), 2)
    probs[:5] = [0.0, 1.0, 0.0, 1.0, 0.5]  # exercises the clipping
    assert M.logloss(labels, probs) == pytest.approx(skm.log_loss(labels, probs), rel=1e-12)
    assert M.logloss(labels, probs, eps=1e-7) == pytest.approx(
        skm.log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7)), rel=1e-9)
    c = 5
    y = rng.integers(0, c, 400)
    logits = rng.standard_normal((400, c))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert M.logloss(y, p) == pytest.approx(skm.log_loss(y, p, labels=np.arange(c)), rel=1e-12)


def test_logloss_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.logloss([0, 1], [0.2, 1.5])
    with pytest.raises(ValueError, match="integers in"):
        M.logloss([0, 3], np.full((2, 3), 1 / 3))


@pytest.mark.parametrize("seed", SEEDS)
def test_accuracy_and_macro_f1_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, 300)
    preds = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 7, 300))  # class 6 only predicted
    labels[labels == 5] = 4  # class 5 only (maybe) predicted, never true
    assert M.accuracy(labels, preds) == pytest.approx(skm.accuracy_score(labels, preds), abs=1e-15)
    scores = rng.standard_normal((300, 7))
    assert M.accuracy(labels, scores) == pytest.approx(skm.accuracy_score(labels, scores.argmax(1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = skm.f1_score(labels, preds, average="macro")
    assert M.macro_f1(labels, preds) == pytest.approx(ref, abs=1e-12)
    str_labels = np.array(["a", "b", "c"])[labels % 3]
    str_preds = np.array(["a", "b", "c", "d"])[preds % 4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = skm.f1_score(str_labels, str_preds, average="macro")
    assert M.macro_f1(str_labels, str_preds) == pytest.approx(ref, abs=1e-12)


# ----------------------------------------------------------------------------- retrieval


def _reference(retrieved, relevant, ks):
    """Pure-python definitions; queries without relevant ids skipped."""
    rec = {k: [] for k in ks}
    hr = {k: [] for k in ks}
    rr = []
    for row, rel in zip(retrieved, relevant, strict=True):
        rel = set(rel) if isinstance(rel, (set, list, tuple)) else {rel}
        if not rel:
            continue
        row = list(row)
        for k in ks:
            top = set(row[:k])
            rec[k].append(len(top & rel) / len(rel))
            hr[k].append(float(bool(top & rel)))
        first = next((i for i, x in enumerate(row) if x in rel), None)
        rr.append(0.0 if first is None else 1.0 / (first + 1))
    out = {}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean(rec[k]))
        out[f"hit_rate@{k}"] = float(np.mean(hr[k]))
    out["mrr"] = float(np.mean(rr))
    out["num_queries_evaluated"] = len(rr)
    out["num_queries_no_relevant"] = len(retrieved) - len(rr)
    return out


def _retrieval_case(seed, q=300, depth=20, universe=200, duplicates=False):
    rng = np.random.default_rng(seed)
    if duplicates:
        retrieved = rng.integers(0, universe // 4, (q, depth))
    else:
        retrieved = np.stack([rng.choice(universe, depth, replace=False) for _ in range(q)])
    relevant = []
    for i in range(q):
        n_rel = int(rng.integers(0, 6))  # 0 -> excluded query
        ids = set(rng.choice(universe, n_rel, replace=False).tolist())
        if n_rel and rng.random() < 0.5:  # make hits likely
            ids |= {int(retrieved[i, rng.integers(0, depth)])}
        relevant.append(ids)
    return retrieved, relevant


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("duplicates", [False, True])
def test_retrieval_metrics_match_reference(seed, duplicates):
    retrieved, relevant = _retrieval_case(seed, duplicates=duplicates)
    ks = (1, 3, 10, 20, 50)
    got = M.retrieval_metrics(retrieved, relevant, ks)
    ref = _reference(retrieved, relevant, ks)
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
    assert ref["num_queries_no_relevant"] > 0
    assert M.recall_at_k(retrieved, relevant, 3) == pytest.approx(ref["recall@3"], abs=1e-12)
    assert M.hit_rate_at_k(retrieved, relevant, 10) == pytest.approx(ref["hit_rate@10"], abs=1e-12)
    assert M.mrr(retrieved, relevant) == pytest.approx(ref["mrr"], abs=1e-12)
    # string ids and lists (with a repeated id) give the same numbers
    str_ret = retrieved.astype(str)
    str_rel = [[str(x) for x in r] + ([str(next(iter(r)))] if r else []) for r in relevant]
    got_s = M.retrieval_metrics(str_ret, str_rel, ks)
    for key in ref:
        assert got_s[key] == pytest.approx(ref[key], abs=1e-12), key


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_single_positive_array_matches_reference(seed):
    rng = np.random.default_rng(seed)
    retrieved, _ = _retrieval_case(seed, duplicates=True)
    positive = np.where(rng.random(len(retrieved)) < 0.7, retrieved[:, 5], rng.integers(0, 200, len(retrieved)))
    ks = (1, 5, 20)
    got = M.retrieval_metrics(retrieved, positive, ks)
    ref = _reference(retrieved, positive.tolist(), ks)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key


def test_retrieval_edge_cases():
    assert np.isnan(M.recall_at_k([[1, 2]], [set()], 1))
    out = M.retrieval_metrics([[1, 2], [3, 4]], [set(), {9}], (1,))
    assert out["num_queries_evaluated"] == 1 and out["num_queries_no_relevant"] == 1
    assert out["recall@1"] == 0.0 and out["mrr"] == 0.0
    with pytest.raises(TypeError, match="ints but relevant ids are strs"):
        M.retrieval_metrics([[1, 2]], [{"a"}], (1,))
    with pytest.raises(ValueError, match="2 entries for 1 queries"):
        M.retrieval_metrics([[1, 2]], [{1}, {2}], (1,))
    with pytest.raises(ValueError, match="positive integer"):
        M.recall_at_k([[1, 2]], [{1}], 0)


def test_hits_from_codes_huge_codes():
    """Codes so large that query-major keys overflow int64 are re-encoded, not wrapped."""
    big = 2**61
    r = np.array([[big + 5, 3, -1], [3, big + 5, big + 5]], dtype=np.int64)
    hits = M.hits_from_codes(r, np.array([0, 1, 1]), np.array([big + 5, big + 5, 3]))  # 2 * span > 2**62
    assert hits.tolist() == [[True, False, False], [True, True, False]]
    r8 = np.tile(r, (4, 1))
    rel_q = np.array([0, 1, 1] + [2, 3, 3] + [4, 5, 5] + [6, 7, 7])
    hits8 = M.hits_from_codes(r8, rel_q, np.tile([big + 5, big + 5, 3], 4))
    assert hits8.tolist() == [[True, False, False], [True, True, False]] * 4
