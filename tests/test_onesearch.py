"""OneSearch-V2 on KuaiSearch: keywords and the teacher / student inputs, SIDs with OPQ sub-codes, the SFT objectives
(CoT, joint and EMA self-distillation, R-Drop, FGM, focal) end to end, and TPMA-GRPO's constrained rollouts with a
bitwise resume after kill -9."""

import json

import jax
import numpy as np
import pytest
from conftest import REPO, load_test_config

from data_pipelines.kuaisearch import reasoning as rs

# the module fixture (the SID table) is built once: this file runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_onesearch")


class CharTokenizer:
    """One id per character (3 + its code point mod 97); ``<s>`` = 1, ``</s>`` = 2."""

    def encode(self, text, add_bos=False, add_eos=False):
        return [1] * add_bos + [3 + ord(c) % 97 for c in text] + [2] * add_eos


def test_teacher_input_is_the_student_input_plus_the_keyword_span():
    codes = np.array([[1, 2, 3], [-1, -1, -1], [4, 5, 6]], np.int32)
    t = rs.ReasoningTransform(CharTokenizer(), codes, query_len=12, keyword_len=8)
    examples = [rs.ReasoningExample("红色连衣裙", "F 24-30", ("红色", "连衣裙", "女装"), (0, 1)),
                rs.ReasoningExample("a much longer query than fits", "M 50+", ("kw",), (2,)),
                rs.ReasoningExample("item text", "", (), (2,))]          # a DSI indexing example
    for e in examples:
        x = t(e, np.random.default_rng(0))
        student = x["input_ids"][x["input_mask"]].tolist()
        teacher = x["teacher_ids"][x["teacher_mask"]].tolist()
        span = x["keyword_ids"][x["keyword_mask"]].tolist()
        assert teacher == student + span                     # exactly the keyword span added, nothing else
        assert not x["teacher_ids"][~x["teacher_mask"]].any() and not x["input_ids"][~x["input_mask"]].any()
        assert student[0] == 1 and student[-1] == 2 and (span == [] or span[-1] == 2)
        if e.profile:   # the profile survives a long query's truncation
            assert student[-len(e.profile) - 1:-1] == CharTokenizer().encode(e.profile)
    first = t(examples[0], np.random.default_rng(0))
    assert first["codes"].tolist() == [1, 2, 3]              # row 1 has no SID: never drawn
    assert t(examples[2], np.random.default_rng(0))["keyword_mask"].sum() == 0


def test_keywords_file_round_trip_and_errors(tmp_path):
    good = tmp_path / "keywords.jsonl"
    good.write_text('{"query": "红色裙", "keywords": ["红色", "裙"]}\n\n{"query": "b", "keywords": []}\n', encoding="utf-8")
    assert rs.read_keywords(good) == {"红色裙": ("红色", "裙"), "b": ()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "keywords": ["x"]}\n{"query": "b", "keywords": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: bad keywords record"):
        rs.read_keywords(bad)
    bad.write_text('{"query": "a", "keywords": []}\n{"query": "a", "keywords": []}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: query 'a' already has keywords"):
        rs.read_keywords(bad)
    with pytest.raises(FileNotFoundError, match="keywords file"):
        rs.read_keywords(tmp_path / "missing.jsonl")


def test_synthetic_keywords_are_the_query_words_then_the_category_path(tmp_path):
    from data_pipelines.kuaisearch import examples as ex
    from data_pipelines.kuaisearch.synthetic import KEYWORDS_FILE, synthesize

    paths = synthesize(tmp_path, num_users=30, num_items=200, num_sessions=150, seed=5)
    keywords = rs.read_keywords(tmp_path / KEYWORDS_FILE)
    queries = {r["query"] for r in ex.read_rows(tmp_path, "recall")}
    assert set(keywords) == queries
    items = ex.read_rows(tmp_path, "items")
    paths_seen = {(r["category_level1_name"], r["category_level2_name"], r["category_level3_name"]) for r in items}
    for query, words in keywords.items():
        cut = next(k for k in range(len(words) + 1) if "".join(words[:k]) == query)   # the words that built it
        path = words[cut:]
        assert 2 <= len(path) <= 3 and any(tuple(path) == tuple(p for p in full if p != "UNKNOWN") for full in paths_seen)
    assert "keywords" not in paths            # the five KuaiSearch files keep their schema


@pytest.fixture(scope="session")
def onesearch_sids(tmp_path_factory):
    from launch.gr import build_sids

    out = tmp_path_factory.mktemp("onesearch_sids")
    build_sids(f"{REPO}/configs/onesearch_v2.py:v1", out)
    return out


def test_sids_are_three_kmeans_levels_and_two_opq_codes_of_the_residual(onesearch_sids):
    from models.semantic_ids import OPQ, opq_decode

    meta = json.loads((onesearch_sids / "sid_table.json").read_text())
    assert meta["sizes"] == [16, 16, 16, 16, 16] and not meta["dedup"]
    table, vectors = np.load(onesearch_sids / "sid_table.npy"), np.load(onesearch_sids / "items.npy")
    codebooks, opq = np.load(onesearch_sids / "codebooks.npy"), np.load(onesearch_sids / "opq.npz")
    residual = vectors - codebooks[np.arange(3), table[:, :3]].sum(1)
    rebuilt = np.asarray(opq_decode(table[:, 3:], OPQ(opq["rotation"], opq["centroids"])))
    assert np.mean((residual - rebuilt) ** 2) < 0.6 * np.mean(residual ** 2)   # the OPQ codes carry the residual
    assert len({tuple(r) for r in table}) > len({tuple(r) for r in table[:, :3]})   # and split shared prefixes


def _sft_config(sids, variant, *extra):
    return load_test_config(f"configs/onesearch_v2.py:{variant}", f"data.sid_table={sids}", "mesh.data=2",
                            "train.steps=3", "train.log_every=1", "train.checkpoint_every=3", "train.batch_size=8",
                            "optimizer.warmup_steps=1", "eval.max_examples=24", "eval.batch_size=24", "eval.beams=10",
                            "eval.ks=(10,)", *extra)


def test_every_sft_objective_trains_and_the_student_is_evaluated_without_keywords(onesearch_sids, tmp_path):
    """``focal``: CoT + joint self-distillation + R-Drop + FGM + focal loss, all at once."""
    from trainers.loop import Trainer

    trainer = Trainer.create(_sft_config(onesearch_sids, "focal"), tmp_path, jax.devices()[:2])
    ev = trainer.run().eval_metrics
    records = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        for k in ("ce_student", "ce_teacher", "kl_teacher_student", "r_drop", "fgm_loss", "cot_loss"):
            assert np.isfinite(r[k]) and r[k] >= 0, (k, r)
        assert r["r_drop"] > 0 and r["kl_teacher_student"] > 0     # dropout passes differ; teacher != student
    assert ev["valid_sid_rate"] == 1.0 and ev["click/sessions"] == 24
    assert 0 <= ev["click/hit_rate@10"] <= 1 and 0 <= ev["teacher/click/hit_rate@10"] <= 1
    assert ev["order/sessions"] > 0 and 0 <= ev["order/mrr@10"] <= ev["order/hit_rate@10"]


def test_ema_teacher_is_task_state_moved_by_the_decay(onesearch_sids, tmp_path):
    from trainers.loop import Trainer

    config = _sft_config(onesearch_sids, "sd_ema", "optimizer.schedule=constant", "optimizer.warmup_steps=0")
    trainer = Trainer.create(config, tmp_path, jax.devices()[:2])
    step = trainer.compiled_step()
    state = trainer.init_state(step.tx, step.shardings)
    batch = trainer.global_batch(next(iter(trainer.data())), step.batch_shardings)
    start = [np.asarray(p) for p in jax.tree.leaves(state.params)]            # the step donates the state
    assert all(np.array_equal(p, np.asarray(e)) for p, e in zip(start, jax.tree.leaves(state.extra["ema"])))
    after, metrics = step.fn(state, batch)
    assert np.isfinite(float(metrics["kl_teacher_student"]))
    for p0, p1, ema in zip(start, jax.tree.leaves(after.params), jax.tree.leaves(after.extra["ema"])):
        np.testing.assert_allclose(np.asarray(ema), 0.9 * p0 + 0.1 * np.asarray(p1), rtol=1e-5, atol=1e-7)
    assert max(float(np.abs(p0 - np.asarray(p1)).max()) for p0, p1 in zip(start, jax.tree.leaves(after.params))) > 0


def test_item_reward_adds_behaviour_ctr_relevance_and_format(onesearch_sids, tmp_path):
    """``R_item`` with a frozen ranker and a frozen relevance run (a few steps each on the tests' small world:
    ranker ids are hashed and the relevance model reads text, so they score any world)."""
    from data_pipelines.sid.trie import accepts
    from trainers.loop import Trainer
    from trainers.tasks import get_task

    for name in ("rank", "relevance"):
        config = load_test_config(f"configs/kuaisearch_{name}.py:tiny", "train.steps=2", "eval.max_examples=32")
        Trainer.create(config, tmp_path / name, jax.devices()[:1]).run()
    task = get_task(load_test_config("configs/onesearch_v2.py:full", f"data.sid_table={onesearch_sids}",
                                     f"rl.ranker={tmp_path / 'rank'}", f"rl.relevance={tmp_path / 'relevance'}"))
    ids, codes = task.world.recall.corpus.ids, task.world.item_codes
    ordered = next(s for s in task.train_sessions if s.ordered)
    clicked_only = next(s for s in task.train_sessions if set(s.clicked) - set(s.ordered))
    other = next(r for r in range(len(ids)) if r not in ordered.clicked and codes[r, 0] >= 0)
    rows = [ordered.ordered[0], sorted(set(clicked_only.clicked) - set(clicked_only.ordered))[0], other]
    sessions, items = [ordered, clicked_only, ordered], ids[rows]
    sampled = codes[rows]
    parts = task.item_rewards(sessions, items, sampled)
    np.testing.assert_array_equal(parts["ordered"], [True, False, False])
    np.testing.assert_array_equal(parts["clicked"], [True, True, False])
    assert ((0 < parts["ctr"]) & (parts["ctr"] < 1)).all() and ((0 < parts["relevance"]) & (parts["relevance"] < 3)).all()
    assert parts["well_formed"].all() and np.asarray(accepts(task.world.trie, sampled)).all()
    np.testing.assert_allclose(parts["reward"], np.array([4.0, 3.0, 0.0]) + parts["ctr"] + parts["relevance"] + 1.0,
                               rtol=1e-6)


@pytest.mark.slow
def test_tpma_grpo_rollouts_are_valid_and_resume_bitwise_after_kill_9(onesearch_sids, tmp_path):
    """TPMA-GRPO from a fresh policy (init_from unset) on 2 devices: every sampled SID is in the trie (the format
    reward is 1 on every row) and a run killed with SIGKILL after a checkpoint and resumed logs exactly the
    metrics of an uninterrupted run."""
    from test_engine_contract import _metrics, _train, kill_9_and_resume

    flags = ["--set", f"data.sid_table={onesearch_sids}", "--set", "train.steps=8", "--set", "train.checkpoint_every=2",
             "--set", "train.log_every=1", "--set", "train.batch_size=4", "--set", "rl.group=4",
             "--set", "eval.max_examples=8", "--set", "eval.beams=10", "--set", "eval.ks=(10,)"]
    arg = "configs/onesearch_v2.py:tpma"
    reference = _train(tmp_path / "reference", arg, *flags)
    out, _ = reference.communicate(timeout=400)
    assert reference.returncode == 0, out
    expected = _metrics(tmp_path / "reference")
    assert sorted(expected) == list(range(1, 9))
    for r in expected.values():
        assert r["well_formed"] == 1.0 and 0 < r["gates"] <= 1 and np.isfinite(r["loss"])

    kill_9_and_resume(tmp_path / "killed", arg, flags, kill_at=3, timeout=400)
    assert _metrics(tmp_path / "killed") == expected     # exact float equality, every metric of every step
