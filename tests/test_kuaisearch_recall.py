"""KuaiSearch recall: example rules, DPR loss, towers, a real tiny run against popularity, lite compiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_test_config
from data_pipelines.kuaisearch import examples as ex
from trainers.evaluators.baselines import bm25_search
from trainers.loop import Trainer
from trainers.losses import dpr_loss
from trainers.tasks import get_task


def _row(sid, clicked, purchased, split="train", query="q"):
    return {"user_id": 1, "session_id": sid, "impressed_item_ids": sorted(set(clicked) | set(purchased) | {99}),
            "clicked_item_ids": clicked, "purchased_item_ids": purchased, "time_index": sid, "query": query,
            "split": split}


def test_relevant_is_clicked_union_purchased_and_sessions_without_interaction_dropped():
    rows = [
        _row(1, [3, 4], [], query="a"),
        _row(2, [], [7], query="b"),              # purchase only still counts
        _row(3, [5], [5, 6], query="c"),          # union, no duplicates
        _row(4, [], [], query="d"),               # no interaction: dropped
        _row(5, [8], [], split="test", query="e"),
        _row(6, [], [], split="test", query="f"),  # dropped
        _row(1, [9], [], query="a2"),             # same session again: union, last query text
    ]
    q = ex.recall_queries(rows)
    assert sorted(q) == ["test", "train"]
    assert [(x.session_id, x.query, x.relevant) for x in q["train"]] == [
        (1, "a2", (3, 4, 9)), (2, "b", (7,)), (3, "c", (5, 6))]
    assert [(x.session_id, x.relevant) for x in q["test"]] == [(5, (8,))]


def test_recall_examples_on_the_real_demo(kuaisearch_demo_dir):
    rows = ex.read_rows(kuaisearch_demo_dir, "recall")
    queries = ex.recall_queries(rows)
    expected: dict[tuple[str, int], set[int]] = {}
    for r in rows:
        items = set(r["clicked_item_ids"]) | set(r["purchased_item_ids"])
        if items and r["query"].strip():
            expected.setdefault((r["split"], r["session_id"]), set()).update(items)
    assert any(not (r["clicked_item_ids"] or r["purchased_item_ids"]) for r in rows)  # the demo has some to drop
    got = {(split, q.session_id): set(q.relevant) for split, qs in queries.items() for q in qs}
    assert got == expected and got
    corpus = ex.ItemCorpus.from_rows(ex.read_rows(kuaisearch_demo_dir, "items"))
    assert len(corpus) == 200 and all(corpus.texts)
    assert "UNKNOWN" not in " ".join(corpus.texts).split()


def test_negative_sampling_avoids_positives_and_transform_shapes():
    rng = np.random.default_rng(0)
    negs = {ex.sample_negative(rng, 5, (0, 1, 2, 3)) for _ in range(200)}
    assert negs == {4}
    config = load_test_config("configs/kuaisearch_recall.py:tiny")
    task = get_task(config)
    pairs, transform = task.train_source()
    example = transform(pairs[0], np.random.default_rng(1))
    spec = task.batch_spec(4)
    assert {k: (4, *v.shape) for k, v in example.items()} == {k: v.shape for k, v in spec.items()}
    assert all(example[k].dtype == spec[k].dtype for k in spec)
    assert example["query_ids"][0] == 2 and example["query_mask"].sum() >= 3  # <s> query </s>


def test_dpr_loss_matches_numpy():
    rng = np.random.default_rng(0)
    q, p, n = (rng.normal(size=(4, 8)).astype(np.float32) for _ in range(3))
    loss, acc = dpr_loss(jnp.asarray(q), jnp.asarray(p), jnp.asarray(n), 0.5)
    logits = 0.5 * q @ np.concatenate([p, n]).T
    ref = np.mean(np.log(np.exp(logits).sum(1)) - np.diag(logits[:, :4]))
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    assert float(acc) == pytest.approx(np.mean(np.argmax(logits, 1) == np.arange(4)))


def test_bm25_ranks_exact_term_matches_first():
    docs = np.array([[5, 6, 0], [7, 8, 9], [5, 7, 0]], np.int32)
    queries = np.array([[7, 8], [6, 0]], np.int32)
    rows = bm25_search(queries, queries > 0, docs, docs > 0, k=2)
    assert rows[0, 0] == 1 and rows[1, 0] == 0


def test_towers_embed_with_their_input_shapes():
    for name, shared in (("dpr_ade", False),):  # SDE's towers run in the tiny training test's evaluation
        task = get_task(load_test_config("configs/kuaisearch_recall.py:tiny", f"model.name={name}"))
        with nnx.use_eager_sharding(False):
            model = task.build_model(nnx.Rngs(0))
        assert (model.item_encoder is None) == shared
        for tower in task.towers().values():
            args = [jnp.ones((3, *s.shape), s.dtype) for s in tower.inputs.values()]
            out = jax.jit(tower.fn)(model, *args)
            assert out.shape == (3, task.config.model.hidden)
            np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)  # cosine in tiny
    corpus = task.export_corpus("eval", 10)
    ids, (tok, mask) = next(corpus.batches)
    assert corpus.tower == "item" and ids.tolist() == task.world.corpus.ids[:10].tolist()
    assert tok.shape == mask.shape == (10, task.config.data.item_len)


def test_tiny_dual_encoder_beats_popularity(tmp_path):
    config = load_test_config("configs/kuaisearch_recall.py:tiny", "train.steps=120", "train.log_every=60",
                              "train.checkpoint_every=1000")
    result = Trainer.create(config, tmp_path, jax.devices()[:2]).run()
    m = result.eval_metrics
    assert m["num_gallery"] == 800 and m["num_queries"] > 300
    for k in (10, 20, 50):
        assert m[f"recall@{k}"] > m[f"popularity/recall@{k}"] + 0.2, m
        assert m[f"hit_rate@{k}"] > m[f"popularity/hit_rate@{k}"] + 0.2, m
    assert m["recall@50"] > 0.6


def test_lite_config_lowers_at_paper_shapes(tmp_path):
    """BERT-base SDE, batch 64, length 64, on 8 fake devices, with no data present: lowered (shapes and
    shardings; the XLA compile of the same step is exercised by the relevance and ranking lite tests)."""
    config = load_test_config("configs/kuaisearch_recall.py:lite", f"data.root={tmp_path}")
    trainer = Trainer.create(config, tmp_path)
    spec = trainer.task.batch_spec(config.train.batch_size)
    assert spec["query_ids"].shape == (64, 64) and spec["pos_ids"].shape == (64, 64)
    assert 100e6 < trainer.spec.num_params < 104e6  # BERT-base with a 21128-token vocabulary, no pooler
    assert trainer.lower() is not None
    ade = Trainer.create(load_test_config("configs/kuaisearch_recall.py:lite", f"data.root={tmp_path}",
                                          "model.name=dpr_ade"), tmp_path)
    assert ade.spec.num_params == 2 * trainer.spec.num_params
