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
                                                   (60, 333, 40, 1), (10, 700, 5, 3), (10, 1280, 64, 8),
                                                   (3, 2048, 16, 1)])
def test_jax_exact_equals_numpy_with_ties(k, chunk, block, devices):
    """Small-integer scores (exact in float32, many ties): identical ids, tie order and scores, across
    chunk and query-block paddings, on 1, 3 and 8 (fake) devices, through both the plain per-tile top-k
    and the two-stage block top-k (chunks 4000, 1280, 2048: multiples of 32 at least 4 * k * 32 wide)."""
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


@pytest.mark.parametrize("k,levels", [(1, 2), (5, 3), (8, 1000)])
def test_two_stage_tile_topk_equals_stable_argsort(k, levels):
    """The block top-k of one score tile: same columns and values as a stable descending argsort, with
    heavy ties (2 or 3 distinct values) and without."""
    import jax.numpy as jnp

    from trainers.evaluators.exact_search import TOPK_BLOCK, _tile_topk

    s = np.random.default_rng(k).integers(0, levels, (9, 64 * TOPK_BLOCK)).astype(np.float32)
    v, c = _tile_topk(jnp.asarray(s), k)
    want = np.argsort(-s, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.asarray(c), want)
    np.testing.assert_array_equal(np.asarray(v), np.take_along_axis(s, want, 1))


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


def test_leaf_count_search_rebuilds_with_fewer_leaves(hard_corpus, monkeypatch):
    """Where the tuned search needs > 10% of the leaves, the tree is rebuilt with half as many, each
    rebuild tuned the same way; the fastest index meeting the target is kept and the search stops at
    the first rebuild that is not faster. QPS is replaced by a cost model (centroids plus items
    scored) so the choice does not depend on this machine's load."""
    gallery, queries = hard_corpus
    n = gallery.shape[0]
    exact_idx, _ = R.exact_search(queries, gallery, 10)

    def cost_model_qps(searcher, qs, k):
        p = searcher.params_
        return 1e9 / (p.num_leaves * 64 + n * p.num_leaves_to_search / p.num_leaves)

    monkeypatch.setattr(R, "_sample_qps", cost_model_qps)
    searcher, t, build_s = R.build_tuned_scann(gallery, queries, exact_idx, 10, ann="scann", tune_sample=300,
                                               keep_rule=True)
    leaves = [e["num_leaves"] for e in t.indexes]
    assert t.indexes[0]["num_leaves_to_search"] > 0.1 * 173, "the rule must search many leaves here"
    assert len(leaves) >= 2 and leaves == [173 >> i for i in range(len(leaves))]
    score = [(e["met"], e["sample_qps"] if e["met"] else e["recall"]) for e in t.indexes]
    chosen = leaves.index(t.num_leaves)
    assert searcher.params_.num_leaves == t.num_leaves and t.met
    assert score[chosen] == max(score)
    assert all(a < b for a, b in zip(score[:chosen], score[1:chosen + 1]))  # each kept rebuild was faster
    assert len(leaves) == R.DEFAULT_MAX_REBUILDS + 1 or chosen == len(leaves) - 2 or (
        t.num_leaves_to_search <= 0.1 * t.num_leaves)  # why it stopped
    assert t.rule_searcher.params_ == R.scann_params_for(n, 10, force_tree=True)
    assert "leaf count searched" in t.message
    # the returned build seconds are the returned index's; the rebuilds' sum excludes the rule's build
    assert build_s == t.indexes[chosen]["build_s"]
    assert t.rebuild_s == pytest.approx(sum(e["build_s"] for e in t.indexes[1:]))
    assert t.tune_s == pytest.approx(sum(e["tune_s"] for e in t.indexes))
    json.dumps(t.as_dict())  # plain JSON, the rule's searcher left out
    _, t0, _ = R.build_tuned_scann(gallery, queries, exact_idx, 10, ann="scann", tune_sample=300,
                                   tune_budget={"max_rebuilds": 0, "max_trials": np.int64(30)})
    assert [e["num_leaves"] for e in t0.indexes] == [173] and t0.rule_searcher is None
    json.dumps(t0.as_dict())  # numpy scalars in the budget still give plain JSON


def test_leaf_count_search_keeps_a_narrow_rule():
    """Tight clusters: the rule's index meets the target searching <= 10% of its leaves; no rebuild."""
    rng = np.random.default_rng(3)
    centres = R.l2_normalize(rng.standard_normal((40, 64)).astype(np.float32))
    gallery, queries = _clustered(rng, 30_000, 64, centres, 0.6), _clustered(rng, 300, 64, centres, 0.6)
    exact_idx, _ = R.exact_search(queries, gallery, 10)
    _, t, _ = R.build_tuned_scann(gallery, queries, exact_idx, 10, ann="scann")
    assert t.met and [e["num_leaves"] for e in t.indexes] == [173] and t.num_leaves_to_search <= 17


def test_tuning_refuses_when_budget_too_small(hard_corpus, caplog):
    gallery, queries = hard_corpus
    ids = np.arange(gallery.shape[0])
    relevant = R.exact_search(queries, gallery, 1)[0][:, 0]
    rule = R.scann_params_for(30_000, 10)
    with caplog.at_level(logging.WARNING, logger="trainers.evaluators.retrieval"):
        res = R.evaluate_retrieval(queries, gallery, ids, relevant, ks=(10,), ann="scann",
                                   tune_budget={"max_leaves_to_search": rule.num_leaves_to_search,
                                                "max_reorder": rule.reorder, "max_rebuilds": 1})
    assert res["ann_target_met"] is False
    assert [(e["num_leaves"], e["met"]) for e in res["ann_tuning"]["indexes"]] == [(173, False), (86, False)]
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
