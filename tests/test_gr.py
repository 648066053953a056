"""Generative retrieval: SID vocabulary, DSI and LTRGR losses, the SID table of a KuaiSearch world, the
DSI task trained end to end on the synthetic world, and the paper-scale config lowered on 8 devices."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, load_test_config, logged_losses

from data_pipelines.sid.embeddings import text_vectors
from data_pipelines.sid.table import codes_of
from models.gr import SIDVocab, code_log_probs, sequence_log_prob
from trainers.losses import dsi_loss, ltrgr_pair_loss, ltrgr_rank_loss

# the tests of one DSI run (a module fixture) share a pytest-xdist worker; the rest spread out
ON_THE_DSI_RUN = pytest.mark.xdist_group("test_gr_dsi_run")


@pytest.fixture(scope="session")
def tiny_sids(tmp_path_factory):
    """The SID table of the tiny synthetic KuaiSearch world (``ecomax gr sids``), built once per session."""
    from launch.gr import build_sids

    out = tmp_path_factory.mktemp("gr_sids")
    metrics = build_sids(f"{REPO}/configs/gr.py:tiny", out)
    return out, metrics


def test_text_vectors_put_items_that_share_words_together():
    ids = np.array([[2, 10, 11, 12, 3], [2, 10, 11, 13, 3], [2, 40, 41, 42, 3], [2, 40, 41, 43, 3]])
    v = text_vectors(ids, ids > 0, vocab_size=64, dim=8)
    assert v.shape == (4, 8) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    sim = v @ v.T
    assert sim[0, 1] > 0.5 and sim[2, 3] > 0.5 and abs(sim[0, 2]) < 0.1


def test_codes_of_maps_item_ids_and_marks_missing_items():
    table = np.array([[1, 2], [3, 4], [5, 6]], np.int32)
    got = codes_of(np.array([30, 10, 99]), table, np.array([10, 20, 30]))
    np.testing.assert_array_equal(got, [[5, 6], [1, 2], [-1, -1]])


def test_sid_vocab_layout_and_teacher_forcing():
    vocab = SIDVocab(text=10, sizes=(4, 3, 2))
    assert vocab.start == 10 and vocab.size == 10 + 1 + 9 and [vocab.offset(level) for level in range(3)] == [11, 15, 18]
    codes = jnp.array([[3, 0, 1]])
    np.testing.assert_array_equal(vocab.tokens(codes), [[14, 15, 19]])
    np.testing.assert_array_equal(vocab.decoder_inputs(codes), [[10, 14, 15]])
    logits = jax.random.normal(jax.random.key(0), (1, 3, vocab.size))
    lps = code_log_probs(vocab, logits)
    assert [lp.shape for lp in lps] == [(1, 4), (1, 3), (1, 2)]
    expect = sum(jax.nn.log_softmax(logits[0, lv, vocab.offset(lv):vocab.offset(lv) + k])[int(codes[0, lv])]
                 for lv, k in enumerate(vocab.sizes))
    np.testing.assert_allclose(sequence_log_prob(vocab, logits, codes)[0], expect, rtol=1e-6)


def test_dsi_loss_is_the_identifier_nll_and_counts_exact_sids():
    lps = [jnp.log(jnp.array([[0.7, 0.3], [0.5, 0.5]])), jnp.log(jnp.array([[0.2, 0.8], [0.9, 0.1]]))]
    codes = jnp.array([[0, 1], [1, 1]])
    loss, m = dsi_loss(lps, codes)
    np.testing.assert_allclose(loss, -(np.log(0.7) + np.log(0.8) + np.log(0.5) + np.log(0.1)) / 2, rtol=1e-6)
    assert float(m["sid_accuracy"]) == 0.5  # row 0 right at both levels; row 1 wrong at level 1
    loss_w, _ = dsi_loss(lps, codes, jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(loss_w, -(np.log(0.7) + np.log(0.8)), rtol=1e-6)


def test_ltrgr_rank_loss_hinges_on_negatives_within_the_margin():
    positive = jnp.array([-1.0, -5.0])
    candidates = jnp.array([[-1.0, -3.0], [-2.0, -9.0]])
    negative = jnp.array([[False, True], [True, True]])  # row 0's first candidate is the positive itself
    loss, m = ltrgr_rank_loss(positive, candidates, negative, margin=1.0)
    # hinges: row 0 cand 1: max(0, -3 + 1 + 1) = 0; row 1: max(0, -2 + 5 + 1) = 4, max(0, -9 + 5 + 1) = 0
    np.testing.assert_allclose(loss, 4.0 / 3, rtol=1e-6)
    np.testing.assert_allclose(m["rank_violations"], 1 / 3, rtol=1e-6)


def test_ltrgr_pair_loss_top_pair_plus_a_drawn_pair():
    """Row 0: relevant -1, -2 (and padding), negatives -1.5, -4: top pair 0.5 within margin 1; with one valid
    entry on each side the drawn pair is forced. Row 1 has no negative: left out of the mean."""
    pos = jnp.array([[-1.0, -2.0, 0.0], [-1.0, 0.0, 0.0]])
    pos_valid = jnp.array([[True, True, False], [True, False, False]])
    neg = jnp.array([[-1.5, -4.0], [-9.0, -9.0]])
    neg_valid = jnp.array([[True, True], [False, False]])
    draws = set()
    for seed in range(40):
        loss, m = ltrgr_pair_loss(pos, pos_valid, neg, neg_valid, jax.random.key(seed), margin=1.0, random_margin=2.0)
        # hard: max(0, -1.5 - (-1) + 1) = 0.5; drawn pairs (p, n) in {-1,-2} x {-1.5,-4} with m' = 2
        drawn = 2 * float(loss) - 0.5
        assert any(np.isclose(drawn, max(0.0, n - p + 2.0)) for p in (-1.0, -2.0) for n in (-1.5, -4.0)), drawn
        draws.add(round(drawn, 4))
        assert float(m["rank_violations"]) == 1.0
    assert draws == {1.5, 2.5, 0.0}  # all four pairs drawn (two give 0): the padding (0.0 score) never is
    one = ltrgr_pair_loss(pos[:1, :1], pos_valid[:1, :1], neg[:1, :1], neg_valid[:1, :1], jax.random.key(0), 1.0, 2.0)[0]
    np.testing.assert_allclose(one, 0.5 * 0.5 + 0.5 * 1.5, rtol=1e-6)


def test_gr_sids_builds_a_table_for_every_item_of_the_world(tiny_sids):
    from data_pipelines.kuaisearch.worlds import GenerativeWorld
    from data_pipelines.sid.trie import accepts

    out, metrics = tiny_sids
    config = load_test_config("configs/gr.py:tiny", f"data.sid_table={out}")
    world = GenerativeWorld.load(config.data)
    assert (world.item_codes >= 0).all() and metrics["items"] == len(world.item_codes)
    assert world.sizes[:3] == (16, 16, 16) and len(world.sizes) == 4  # 3 x 16 + the dedup digit
    assert bool(np.asarray(accepts(world.trie, jnp.asarray(world.item_codes))).all())
    assert len({tuple(r) for r in world.item_codes.tolist()}) == len(world.item_codes)  # dedup: unique SIDs
    pairs = world.training_pairs(index_repeats=1)
    assert len(pairs) == len(world.recall.training_pairs()) + len(world.item_codes)


def test_generative_world_names_the_missing_table(tmp_path):
    from data_pipelines.kuaisearch.worlds import GenerativeWorld

    config = load_test_config("configs/gr.py:tiny")
    with pytest.raises(ValueError, match="ecomax gr sids"):
        GenerativeWorld.load(config.data)
    config = load_test_config("configs/gr.py:tiny", f"data.sid_table={tmp_path}")
    with pytest.raises(FileNotFoundError, match="sid_table.npy"):
        GenerativeWorld.load(config.data)


# --- the tasks end to end (tiny world, in process) -------------------------------------------------------


def _gr_config(spec, sids, *overrides):
    return load_test_config(spec, f"data.sid_table={sids}", "mesh.data=2", "eval.max_examples=160",
                            "eval.batch_size=32", *overrides)


@pytest.fixture(scope="module")
def dsi_run(tiny_sids, tmp_path_factory):
    """DSI trained briefly on the tiny world (one run per module): ``(workdir, final eval metrics)``."""
    from trainers.loop import Trainer

    sids, _ = tiny_sids
    workdir = tmp_path_factory.mktemp("dsi")
    config = _gr_config("configs/gr.py:tiny", sids, "train.steps=240", "train.log_every=40",
                        "train.checkpoint_every=240", "optimizer.warmup_steps=20")
    trainer = Trainer.create(config, workdir, jax.devices()[:2])
    result = trainer.run()
    return workdir, result


@ON_THE_DSI_RUN
def test_dsi_learns_to_generate_relevant_items_far_above_popularity(dsi_run):
    _, result = dsi_run
    ev = result.eval_metrics
    assert ev["valid_sid_rate"] == 1.0 and ev["beam_fill"] == 1.0  # every returned SID exists
    assert ev["recall@10"] > 3 * ev["popularity/recall@10"] and ev["recall@10"] > 0.25, ev
    assert ev["hit_rate@50"] >= ev["hit_rate@10"] and ev["recall@50"] >= ev["recall@20"] >= ev["recall@10"]


@ON_THE_DSI_RUN
def test_ltrgr_continues_from_the_dsi_checkpoint_with_a_rank_loss_over_its_own_beam(tiny_sids, dsi_run, tmp_path):
    from trainers.loop import Trainer

    sids, _ = tiny_sids
    dsi_dir, _ = dsi_run
    config = _gr_config("configs/gr.py:ltrgr_tiny", sids, f"init_from.model.path={dsi_dir}", "train.steps=2",
                        "train.log_every=1", "ltrgr.beams=4", "eval.max_examples=16")
    trainer = Trainer.create(config, tmp_path, jax.devices()[:2])
    result = trainer.run()
    losses = logged_losses(tmp_path)
    assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
    records = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "rank_loss" in r]
    # started from DSI, not from scratch: the identifier loss is already far below a fresh model's ln(16) x 4
    assert records[0]["dsi_loss"] < 0.6 * 4 * np.log(16), records[0]
    assert 0.0 <= records[0]["rank_violations"] <= 1.0 and records[0]["rank_loss"] >= 0.0
    ev = result.eval_metrics
    assert ev["valid_sid_rate"] == 1.0


def test_gr_lite_lowers_on_8_devices_at_the_paper_shapes(tmp_path):
    """mT5-base (12 + 12 layers, 250,112 pieces + 3 x 512 codes + a dedup digit), query length 32: the train
    step and the beam-50 generation lower on a 2 x 2 x 2 (data, fsdp, tensor) mesh, with no data present."""
    import functools

    from data_pipelines.sid.trie import build_trie
    from flax import nnx

    from models.partitioning import activation_rules
    from trainers.loop import Trainer
    from trainers.state import param_shardings
    from trainers.tasks.gr_dsi import generate

    config = load_test_config("configs/gr.py:lite", "model.sid_sizes=512,512,512,32", "mesh.data=2", "mesh.fsdp=2",
                              "mesh.tensor=2")
    trainer = Trainer.create(config, tmp_path)
    assert 580e6 < trainer.spec.num_params < 590e6, trainer.spec.num_params  # mT5-base: ~582M + the code rows
    spec = trainer.task.batch_spec(config.train.batch_size)
    assert spec["input_ids"].shape == (256, 32) and spec["codes"].shape == (256, 4)
    assert trainer.lower() is not None

    rng = np.random.default_rng(0)
    table = np.concatenate([rng.integers(0, 512, (4000, 3)), rng.integers(0, 32, (4000, 1))], 1)
    trie = build_trie(np.unique(table, axis=0), (512, 512, 512, 32), dense_levels=2)
    fn = functools.partial(generate, vocab=trainer.task.vocab, beams=config.eval.beams)
    shardings = param_shardings(trainer.spec, trainer.mesh, trainer.rules)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          trainer.spec.abstract_params, shardings)
    graphdef = trainer.spec.graphdef
    with activation_rules(trainer.mesh, trainer.rules):
        lowered = jax.jit(lambda params, ids, mask, trie: fn(nnx.merge(graphdef, params), ids, mask, trie)).lower(
            params, jax.ShapeDtypeStruct((8, 32), np.int32), jax.ShapeDtypeStruct((8, 32), np.bool_), trie)
    text = lowered.as_text()
    assert "top_k" in text or "TopK" in text


_SERVE = """
import sys, numpy as np, jax
out = sys.argv[1]
exp = jax.export.deserialize(bytearray(open(f"{out}/retrieve.jax_exported", "rb").read()))
ids, mask = np.load(f"{out}/ids.npy"), np.load(f"{out}/mask.npy")
items, scores = (lambda o: (o["items"], o["scores"]))(exp.call(ids, mask))
np.save(f"{out}/items.npy", np.asarray(items))
assert not [m for m in sys.modules if m.split(".")[0] in ("trainers", "models", "launch", "data_pipelines", "flax")]
"""


@ON_THE_DSI_RUN
def test_the_exported_retriever_returns_the_evaluators_items_in_a_fresh_interpreter(dsi_run, tmp_path):
    """``ecomax export --format stablehlo``: query tokens -> top-k item ids with the trie inside, run with only
    jax and numpy; equal to the evaluator's own beam -> items."""
    import os
    import subprocess
    import sys

    import ml_collections

    from launch import export as ex
    from trainers.mesh import make_mesh
    from trainers.tasks import EvalContext

    workdir, _ = dsi_run
    out = tmp_path / "hlo"
    manifest = ex.export(workdir, out, "stablehlo", platforms=("cpu",))
    assert set(manifest["towers"]) == {"retrieve"}
    trained = ex.load_trained(workdir)
    queries = [q.query for q in trained.task.world.recall.eval_queries("test", 5)]
    mesh = make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
    ctx = EvalContext(trained.spec.graphdef, trained.params, mesh, trained.step, tmp_path, {})
    want = trained.task.retrieve(ctx, queries)
    np.save(out / "ids.npy", want["input_ids"])
    np.save(out / "mask.npy", want["input_mask"])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    subprocess.run([sys.executable, "-c", _SERVE, str(out)], cwd=tmp_path, env=env, check=True, timeout=120)
    got = np.load(out / "items.npy")
    beams = trained.config.eval.beams
    np.testing.assert_array_equal(got[:, :10], want["items"][:, :10])
    assert got.shape == (5, beams) and (got >= 0).all()


def test_tiger_histories_are_time_ordered_leave_one_out():
    from data_pipelines.kuaisearch import examples as ex

    corpus = ex.ItemCorpus(np.array([10, 11, 12, 13]), ["a", "b", "c", "d"])
    rows = [{"user_id": 1, "time_index": 5, "clicked_item_ids": [12, 99]},
            {"user_id": 1, "time_index": 2, "clicked_item_ids": [10, 11]},
            {"user_id": 1, "time_index": 9, "clicked_item_ids": [13]},
            {"user_id": 2, "time_index": 1, "clicked_item_ids": [10, 11]}]
    seqs = ex.click_sequences(rows, corpus)
    assert seqs == {1: [0, 1, 2, 3], 2: [0, 1]}          # by time, 99 (not in the corpus) left out
    split = ex.next_item_examples(seqs, max_history=2)
    assert [(e.history, e.target) for e in split["train"]] == [((0,), 1)]
    assert [(e.history, e.target) for e in split["valid"]] == [((0, 1), 2)]
    assert [(e.history, e.target) for e in split["test"]] == [((1, 2), 3)]  # user 2 has too few items


def test_tiger_sequential_recommendation_trains_and_beats_popularity(tiny_sids, tmp_path):
    from trainers.loop import Trainer

    sids, _ = tiny_sids
    config = _gr_config("configs/gr.py:tiger_tiny", sids, "train.steps=150", "train.log_every=50",
                        "train.checkpoint_every=150", "optimizer.warmup_steps=20", "eval.max_examples=120")
    ev = Trainer.create(config, tmp_path, jax.devices()[:2]).run().eval_metrics
    assert ev["num_queries_evaluated"] == 120
    assert ev["recall@10"] > ev["popularity/recall@10"] and ev["ndcg@10"] > ev["popularity/ndcg@10"], ev


def test_gr_sids_cli_names_a_bad_data_root(tmp_path, capsys):
    from launch.cli import main

    code = main(["gr", "sids", "--config", f"{REPO}/configs/gr.py:tiny", "--out", str(tmp_path / "sids"),
                 "--set", f"data.root={tmp_path / 'missing'}"])
    err = capsys.readouterr().err
    assert code == 2 and "ecomax gr sids: data.root" in err and "is not a folder" in err, err
