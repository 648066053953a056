"""Retrieval at corpus scale: JAX exact search = numpy exact search; ScaNN tuned to a recall target."""

import json
import logging

import numpy as np
import pytest

from trainers.evaluators import retrieval as R

# the module and session fixtures are built once: this file runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_retrieval_scale")


def _clustered(rng, n, d, centres, noise):
    lab = rng.integers(0, centres.shape[0], n)
    return R.l2_normalize(centres[lab] + noise * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d))


@pytest.fixture(scope="module")
def hard_corpus():
    """30k x 64 around 300 centres with noise 1.5: the size rule's ScaNN misses the 0.99 target here."""
    rng = np.random.default_rng(7)
    centres = R.l2_normalize(rng.standard_normal((300, 64)).astype(np.float32))
    return _clustered(rng, 30_000, 64, centres, 1.5), _clustered(rng, 600, 64, centres, 1.5)


# ----------------------------------------------------------------------------- JAX exact search


@pytest.mark.parametrize("k,chunk,block,devices", [(5, 1000, 16, 1), (15, 512, 7, 8), (1, 4000, 64, 8),
                                                   (60, 333, 40, 1), (10, 700, 5, 3)])
def test_jax_exact_equals_numpy_with_ties(k, chunk, block, devices):
    """Small-integer scores (exact in float32, many ties): identical ids, tie order and scores, across
    chunk and query-block paddings, on 1, 3 and 8 (fake) devices."""
    import jax

    from trainers.evaluators.exact_search import JaxExactSearch

    rng = np.random.default_rng(k)
    qs = rng.integers(-2, 3, (41, 4)).astype(np.float32)
    gs = rng.integers(-2, 3, (4001, 4)).astype(np.float32)
    ref = R.exact_search(qs, gs, k)
    stable = np.argsort(-(qs @ gs.T), axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ref[0], stable)
    got = JaxExactSearch(gs, gallery_chunk=chunk, query_block=block, devices=jax.devices()[:devices]).search(qs, k)
    assert got[0].dtype == np.int64 and got[0].shape == (41, k)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])


def test_jax_exact_k_above_n_and_empty():
    from trainers.evaluators.exact_search import jax_exact_search

    rng = np.random.default_rng(0)
    qs, gs = rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((7, 8)).astype(np.float32)
    idx, val = jax_exact_search(qs, gs, 50, gallery_chunk=4)
    ref = R.exact_search(qs, gs, 50)
    assert idx.shape == (5, 7)
    np.testing.assert_array_equal(idx, ref[0])
    np.testing.assert_allclose(val, ref[1], rtol=1e-6)
    assert jax_exact_search(qs[:0], gs, 3)[0].shape == (0, 3)


def test_jax_exact_equals_numpy_on_embeddings():
    """Real-valued clustered embeddings: same ids wherever the scores are not tied to rounding."""
    from trainers.evaluators.exact_search import jax_exact_search

    rng = np.random.default_rng(1)
    centres = R.l2_normalize(rng.standard_normal((50, 32)).astype(np.float32))
    gs, qs = _clustered(rng, 20_000, 32, centres, 0.7), _clustered(rng, 300, 32, centres, 0.7)
    idx, val = jax_exact_search(qs, gs, 10)
    ref_idx, ref_val = R.exact_search(qs, gs, 10)
    np.testing.assert_allclose(val, ref_val, atol=1e-6)
    differ = idx != ref_idx
    assert differ.mean() < 1e-3
    # any swap is between items whose exact (float64) scores agree to float32 rounding
    s64 = qs.astype(np.float64) @ gs.astype(np.float64).T
    gap = np.abs(np.take_along_axis(s64, idx, 1) - np.take_along_axis(s64, ref_idx, 1))
    assert (gap[differ] < 1e-6).all()


def test_exact_searcher_backends_agree():
    rng = np.random.default_rng(2)
    gs = rng.integers(-3, 4, (3000, 6)).astype(np.float32)
    qs = rng.integers(-3, 4, (50, 6)).astype(np.float32)
    a = R.ExactSearcher(gs, backend="jax", max_block_elems=4096, gallery_chunk=700).search(qs, 12)
    b = R.ExactSearcher(gs, backend="numpy").search(qs, 12)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert R.exact_backend_for(50, 3000, 6) == "numpy"  # tiny: no compile
    assert R.exact_backend_for(10_000, 100_000, 6) == "jax"
    with pytest.raises(ValueError, match="exact backend"):
        R.ExactSearcher(gs, backend="gpu")


# ----------------------------------------------------------------------------- tuning to a target


def test_tuning_reaches_target_on_hard_corpus(hard_corpus, tmp_path):
    gallery, queries = hard_corpus
    ids = np.arange(gallery.shape[0])
    relevant = R.exact_search(queries, gallery, 1)[0][:, 0]  # each query's nearest item
    res = R.evaluate_retrieval(queries, gallery, ids, relevant, ks=(1, 10), ann="scann", out_dir=tmp_path,
                               tune_sample=300)
    tuning = res["ann_tuning"]
    rule = tuning["trials"][0]
    assert rule["num_leaves_to_search"] == R.scann_params_for(30_000, 10).num_leaves_to_search
    assert rule["recall"] < 0.99, "the corpus must be hard enough for the rule to miss"
    assert res["ann_target_met"] is True and tuning["met"] and tuning["recall"] >= 0.99
    assert tuning["sample_size"] in (300, 600)
    assert res["ann_recall_vs_exact@10"] >= 0.99  # on all 600 queries, not only the sample
    assert "ann/recall@10" in res and not any(k.startswith("ann_rejected/") for k in res)
    assert res["ann_metrics_source"] == "scann"
    assert (tuning["num_leaves_to_search"], tuning["reorder"]) != (rule["num_leaves_to_search"], rule["reorder"])
    # the saved index records the tuning and searches with the tuned parameters
    info = json.loads((tmp_path / "index" / "index_params.json").read_text())
    assert info["tuning"]["met"] and info["params"]["num_leaves_to_search"] == tuning["num_leaves_to_search"]
    assert info["params"]["reorder"] == tuning["reorder"]
    loaded = R.load_index(tmp_path)
    got, _ = loaded.search_indices(queries, 10)
    exact_idx, _ = R.exact_search(queries, gallery, 10)
    assert R._overlap_at_k(got, exact_idx, 10, gallery.shape[0]) == pytest.approx(res["ann_recall_vs_exact@10"])


def test_tuning_refuses_when_budget_too_small(hard_corpus, caplog):
    gallery, queries = hard_corpus
    ids = np.arange(gallery.shape[0])
    relevant = R.exact_search(queries, gallery, 1)[0][:, 0]
    rule = R.scann_params_for(30_000, 10)
    with caplog.at_level(logging.WARNING, logger="trainers.evaluators.retrieval"):
        res = R.evaluate_retrieval(queries, gallery, ids, relevant, ks=(10,), ann="scann",
                                   tune_budget={"max_leaves_to_search": rule.num_leaves_to_search,
                                                "max_reorder": rule.reorder})
    assert res["ann_target_met"] is False
    assert res["ann_tuning"]["recall"] < 0.99 and len(res["ann_tuning"]["trials"]) == 1
    assert "did NOT reach the target" in res["ann_status"] and "budget spent" in res["ann_status"]
    assert "did NOT reach the target" in caplog.text
    # ScaNN's numbers are not presented as final: ann/ holds the exact ones, ScaNN's are set apart
    assert res["ann_metrics_source"] == "exact"
    assert res["ann/recall@10"] == res["exact/recall@10"] == pytest.approx(1.0)
    assert res["ann_rejected/recall@10"] < 1.0


def test_tune_scann_direct_and_untuned_rule(hard_corpus):
    gallery, queries = hard_corpus
    exact_idx, _ = R.exact_search(queries, gallery, 10)
    base = R.ScannSearcher(gallery, R.scann_params_for(30_000, 10))
    tuned, t = R.tune_scann(base, queries[:200], exact_idx[:200], 10, 0.995, max_trials=30)
    assert t.met and t.recall >= 0.995 and t.sample_size == 200
    assert tuned.params_.num_leaves_to_search == t.num_leaves_to_search and tuned.size == base.size
    assert base.params_ == R.scann_params_for(30_000, 10)  # the base searcher is left as it was
    # max_trials stops the loop and says so
    _, t2 = R.tune_scann(base, queries[:200], exact_idx[:200], 10, 0.99999, max_trials=2)
    assert not t2.met and len(t2.trials) == 2 and "2 trials ran" in t2.message
