"""OneMall: the Query-Former, behaviour sequences from KuaiSearch sessions, the generator trained end to end on
the synthetic world, and the paper-scale config lowered with expert parallelism on 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, load_test_config
from flax import nnx

from data_pipelines.kuaisearch import examples as ex
from data_pipelines.kuaisearch.transforms import BehaviourTransform
from models import seq2seq
from models.moe import MoEConfig
from models.query_former import QueryFormer

# the module fixtures (the SID table, a ranker run) are built once: this file runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_onemall")


def test_query_former_compresses_to_k_tokens_and_never_reads_padding():
    cfg = seq2seq.tiny(64)
    with nnx.use_eager_sharding(False):
        qf = QueryFormer(cfg, num_queries=4, depth=2, rngs=nnx.Rngs(0))
    events = jax.random.normal(jax.random.key(0), (3, 10, cfg.d_model))
    mask = jnp.arange(10)[None] >= jnp.array([[4], [9], [10]])      # right-aligned; row 2 has no event
    y = qf(events, mask)
    assert y.shape == (3, 4, cfg.d_model) and bool(jnp.isfinite(y).all())
    garbage = jnp.where(mask[..., None], events, 1e4)
    np.testing.assert_allclose(qf(garbage, mask), y, atol=1e-5)     # padding values change nothing
    assert float(jnp.abs(qf(events.at[0, 5].add(1.0), mask)[0] - y[0]).max()) > 1e-4  # a real event does
    np.testing.assert_allclose(qf(events, mask)[2], qf(events * 0, mask)[2], atol=1e-6)  # empty: the null event
    # the truncation baseline: the last 3 events as the queries
    last = qf(events[:, -3:], mask[:, -3:], queries=events[:, -3:])
    assert last.shape == (3, 3, cfg.d_model)


def test_param_count_covers_moe_layers():
    cfg = seq2seq.tiny(64, decoder_layers=3, moe=MoEConfig(num_experts=4, d_ff=16), moe_every=2)
    assert seq2seq.moe_layers(cfg) == (1,)
    with nnx.use_eager_sharding(False):
        model = seq2seq.Seq2Seq(cfg, rngs=nnx.Rngs(0))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == seq2seq.param_count(cfg)
    assert model.decoder.layers[1].mlp.wi_0.shape == (4, 32, 16)


def _row(user, session, time, clicked, purchased=(), query="q", split="train"):
    return {"user_id": user, "session_id": session, "time_index": time, "clicked_item_ids": list(clicked),
            "purchased_item_ids": list(purchased), "query": query, "split": split, "impressed_item_ids": []}


def test_behaviour_examples_see_only_earlier_sessions_and_transform_right_aligns():
    corpus = ex.ItemCorpus(ids=np.array([10, 11, 12, 13]), texts=["a", "b", "c", "d"])
    rows = [_row(1, 3, 30, [12], query="third", split="test"), _row(1, 1, 10, [10], [10], query="first"),
            _row(1, 2, 20, [11, 99], query="second"), _row(1, 4, 20, [13], query="also second"),
            _row(2, 5, 5, [], query="nothing")]
    out = ex.behaviour_examples(rows, corpus, max_events=8, max_queries=8)
    train, test = out["train"], out["test"]
    assert [e.session_id for e in train] == [1, 2, 4]            # session 5 has no relevant item
    assert train[0].clicks == () and train[0].queries == ()
    assert train[1].clicks == (0,) == train[2].clicks             # sessions at t=20 do not see each other
    assert train[1].relevant == (1,)                              # item 99 is not in the corpus
    (last,) = test
    assert last.clicks == (0, 1, 3) and last.purchases == (0,) and last.queries == ("first", "second", "also second")

    codes = np.array([[1, 2], [3, 4], [-1, -1], [5, 6]], np.int32)   # item 12 (row 2) has no SID
    tokenizer = type("T", (), {"encode_batch": staticmethod(
        lambda texts, n, add_bos, add_eos: (np.full((len(texts), n), 7, np.int32), np.ones((len(texts), n), bool)))})
    t = BehaviourTransform(tokenizer, codes, (100, 200), {"click": 4, "purchase": 2, "query": 2}, piece_len=3)
    x = t(last)
    np.testing.assert_array_equal(x["click_tokens"], [[0, 0], [101, 202], [103, 204], [105, 206]])
    np.testing.assert_array_equal(x["click_mask"], [False, True, True, True])
    np.testing.assert_array_equal(x["purchase_mask"], [False, True])
    assert x["query_ids"].shape == (2, 3) and x["query_mask"].all()   # the last two of three queries
    np.testing.assert_array_equal(x["codes"], [-1, -1])             # the only relevant item lacks a SID
    assert "input_ids" not in x
    assert "scenario" not in x
    by_scenario = BehaviourTransform(tokenizer, codes, (100, 200), {"click": 4}, piece_len=3, scenarios=("mall", "homepage"))
    marked = ex.with_scenarios({"test": [last]}, {last.session_id: "homepage"})["test"][0]
    assert by_scenario(marked)["scenario"] == 2 and by_scenario(last)["scenario"] == 0   # "" (unknown) -> 0
    assert ex.with_scenarios({"test": [last]}, {})["test"][0].scenario == ""


@pytest.fixture(scope="session")   # session: built once per worker even when other modules' tests interleave
def onemall_sids(tmp_path_factory):
    from launch.gr import build_sids

    out = tmp_path_factory.mktemp("onemall_sids")
    build_sids(f"{REPO}/configs/onemall.py:tiny", out)
    return out


def test_onemall_trains_and_generates_valid_sids_with_moe_metrics(onemall_sids, tmp_path):
    """``tiny_scenario``: ``tiny`` + the scenario token (the session's search entrance), HR per scenario."""
    import json

    from trainers.loop import Trainer

    config = load_test_config("configs/onemall.py:tiny_scenario", f"data.sid_table={onemall_sids}", "mesh.data=2",
                              "train.steps=30", "train.log_every=10", "train.checkpoint_every=30",
                              "optimizer.warmup_steps=5", "eval.max_examples=64", "eval.batch_size=32",
                              "data.lengths.click=64", "data.lengths.purchase=16", "data.lengths.query=8")
    trainer = Trainer.create(config, tmp_path, jax.devices()[:2])
    ev = trainer.run().eval_metrics
    assert ev["beam_fill"] == 1.0 and ev["num_queries_evaluated"] == 64 and 0 <= ev["hit_rate@10"] <= 1
    assert trainer.task.model_config().scenarios == 3 and "scenario" in trainer.spec.abstract_params
    by = [ev[f"scenario/{name}/num_queries_evaluated"] for name in ("mall", "homepage")]
    assert min(by) > 0 and sum(by) == 64 and 0 <= ev["scenario/homepage/hit_rate@10"] <= 1  # every session has rank rows
    records = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "gen_loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30] and train[-1]["gen_loss"] < train[0]["gen_loss"]
    for r in train:
        assert 0 <= r["dropped_fraction"] < 0.5 and r["balance_loss"] >= 1.0 - 1e-3 and r["z_loss"] > 0
        assert 1.0 <= r["expert_load_max"] <= 8.0


def test_onemall_base_lowers_with_experts_over_8_devices_and_counts_active_flops(tmp_path):
    from trainers.flops import onemall_forward
    from trainers.loop import Trainer

    config = load_test_config("configs/onemall.py:base", "mesh.data=1", "mesh.expert=8")
    trainer = Trainer.create(config, tmp_path)
    assert 1.0e9 < trainer.spec.num_params < 1.2e9, trainer.spec.num_params   # 64 experts in 6 of 12 layers
    spec = trainer.task.batch_spec(256)
    assert spec["click_tokens"].shape == (256, 2048, 4) and spec["query_ids"].shape == (256, 256, 16)
    assert "all_to_all" in trainer.lower().as_text()   # 1,024 decoder tokens in 16 groups over 8 devices
    # active FLOPs: 6 dense layers (gated, 2048 wide) and 6 MoE layers of top-2 x 1024-wide experts out of 64:
    # 256 decoder tokens x 3 matmuls x 2 x 768 x 2048 each, not 32x that for the MoE half
    forward = onemall_forward(trainer.task.model_config(), 64, trainer.task.lengths, 4)
    assert forward["decoder/mlp"] == pytest.approx(12 * 256 * 3 * 2 * 768 * 2048)
    assert forward["decoder/router"] == pytest.approx(6 * 256 * 2 * 768 * 64)


def test_candidate_rows_take_the_sessions_context_and_the_items_newest_fields(tmp_path):
    from data_pipelines.kuaisearch.rank_features import CandidateRows

    def rank_row(session, item, time, price, clicks):
        return {"user_id": 7, "session_id": session, "time_index": time, "search_entrance": "mall", "query": f"q{session}",
                "user_fan_number": 3, "user_follow_number": 4, "recently_clicked_item_ids": [1, 2],
                "recently_purchased_item_ids": [], "target_item_id": item, "target_item_price": price,
                "is_clicked": 1, "is_purchased": 1, "user_statistical_features": {"user_show_cnt_30d_hist": 5.0},
                "target_item_statistical_features": {"item_click_cnt_30d_hist": clicks}}

    rows = [rank_row(1, 10, 5, 9.0, 1.0), rank_row(1, 11, 5, 8.0, 2.0), rank_row(2, 10, 9, 7.0, 3.0),
            rank_row(3, 12, 1, 6.0, 4.0)]
    cand = CandidateRows.from_rows(rows, keep_sessions=[1, 2, 4])
    assert sorted(cand.contexts) == [1, 2]                          # session 3 is not kept
    r = cand.row(1, 10)
    assert r["query"] == "q1" and r["target_item_id"] == 10 and r["is_clicked"] == r["is_purchased"] == 0
    assert r["target_item_price"] == 7.0 and r["target_item_statistical_features"] == {"item_click_cnt_30d_hist": 3.0}
    assert cand.row(2, 12)["target_item_price"] == 6.0            # an item of an unkept session still has its fields
    unseen = cand.row(1, 99)
    assert unseen["target_item_price"] == 0.0 and set(unseen["target_item_statistical_features"].values()) == {0.0}
    fallback = cand.row(4, 11, {"user_id": 8, "query": "q4", "recently_clicked_item_ids": [3]})
    assert fallback["user_id"] == 8 and fallback["search_entrance"] == "" and fallback["target_item_price"] == 8.0
    assert (cand.stats.rows, cand.stats.contexts_missing, cand.stats.items_unseen) == (4, 1, 1)
    with pytest.raises(KeyError, match="session 5"):
        cand.row(5, 10)
    cand.save(tmp_path)
    back = CandidateRows.load(tmp_path)
    assert back.contexts == cand.contexts and back.items == {k: v for k, v in cand.items.items()}


@pytest.fixture(scope="session")
def ranker_run(tmp_path_factory):
    """A KuaiSearch ranker (a few steps on the rank tests' world: ids are hashed, so it scores any world)."""
    from trainers.loop import Trainer

    workdir = tmp_path_factory.mktemp("ranker")
    config = load_test_config("configs/kuaisearch_rank.py:tiny", "train.steps=3", "eval.max_examples=64")
    Trainer.create(config, workdir, jax.devices()[:1]).run()
    return workdir


def test_onemall_rl_scores_rollouts_with_the_ranker_and_resumes_bitwise(onemall_sids, ranker_run, tmp_path):
    """GRPO with the frozen ranker as reward: valid sampled SIDs scored on the host, ranker@10 in the evaluation,
    and a run resumed from its step-2 checkpoint repeats steps 3 and 4 bitwise (every metric and parameter)."""
    import json

    from trainers.init_from import checkpoint_params
    from trainers.loop import Trainer

    def config(restore_step=0):
        return load_test_config(
            "configs/onemall.py:tiny_rl", f"data.sid_table={onemall_sids}", f"rl.ranker={ranker_run}", "mesh.data=2",
            "train.steps=4", f"train.restore_step={restore_step}", "train.log_every=1", "train.checkpoint_every=2",
            "train.batch_size=4", "rl.group=4", "eval.max_examples=32", "eval.batch_size=32", "eval.beams=10",
            "data.lengths.click=32", "data.lengths.purchase=8", "data.lengths.query=4", "model.qformer_layers=1",
            "model.decoder_layers=1")

    def records(workdir):
        out = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("examples_per_sec", "step_time", "time")} for r in out
                if "reward" in r]

    ev = Trainer.create(config(), tmp_path, jax.devices()[:2]).run().eval_metrics
    assert 0 < ev["ranker@10"] < 1 and 0 < ev["popularity/ranker@10"] < 1 and ev["beam_fill"] == 1.0
    train = records(tmp_path)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert 0 < r["ranker_prob"] < 1 and r["reward"] == r["ranker_prob"] and 0 <= r["hit"] <= 1
        assert r["kl"] > -1e-6 and 0 <= r["clip_fraction"] <= 1 and np.isfinite(r["pg_loss"])
    assert abs(train[0]["kl"]) < 1e-6 and train[-1]["kl"] > 1e-6    # step 1: the policy is the reference
    straight = jax.tree.leaves(checkpoint_params(str(tmp_path), 4, ""))
    # resume from the step-2 checkpoint (step 4 is set aside): steps 3 and 4 again, bitwise
    Trainer.create(config(restore_step=2), tmp_path, jax.devices()[:2]).run()
    again = records(tmp_path)
    assert [r["step"] for r in again] == [1, 2, 3, 4, 3, 4] and again[4:] == train[2:]
    for a, b in zip(straight, jax.tree.leaves(checkpoint_params(str(tmp_path), 4, ""))):
        np.testing.assert_array_equal(a, b)


def test_the_scenario_token_leads_the_memory_and_changes_the_generation():
    from models.onemall import OneMall, OneMallConfig

    cfg = OneMallConfig(seq2seq.tiny(64, encoder_layers=0), behaviours=("click",), num_queries=2, qformer_layers=1,
                        max_events=6, scenarios=3)
    with nnx.use_eager_sharding(False):
        model = OneMall(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batch = {"click_tokens": jnp.asarray(rng.integers(1, 64, (2, 6, 3)), jnp.int32), "click_mask": jnp.ones((2, 6), bool),
             "scenario": jnp.array([1, 2], jnp.int32)}
    memory, mask = model.memory(batch)
    assert memory.shape == (2, 1 + 2, cfg.generator.d_model) and bool(mask.all())
    np.testing.assert_allclose(memory[:, 0], model.scenario[...][jnp.array([1, 2])], atol=1e-6)
    dec = jnp.zeros((2, 3), jnp.int32)
    swapped = model({**batch, "scenario": jnp.array([2, 2], jnp.int32)}, dec)
    out = model(batch, dec)
    assert float(jnp.abs(swapped[0] - out[0]).max()) > 1e-4       # row 0's scenario changed: its logits did
    np.testing.assert_allclose(swapped[1], out[1], atol=1e-6)       # row 1's did not


def test_a_frozen_model_scores_in_padded_batches_and_refuses_a_config_that_does_not_fit(ranker_run, tmp_path):
    import json
    import shutil

    from trainers.frozen import Frozen

    ranker = Frozen.load(ranker_run)
    x = np.arange(1500, dtype=np.float32)
    for n in (1, 3, 1500):   # one row, a padded power of two, and two batches of 1,024 with a padded tail
        np.testing.assert_array_equal(ranker.apply(lambda model, a: a * 2, x[:n], batch_size=1024), 2 * x[:n])
    other = tmp_path / "other"
    shutil.copytree(ranker_run, other)
    config = json.loads((other / "config.json").read_text())
    config["model"]["embed_dim"] *= 2
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="parameter .* in the checkpoint"):
        Frozen.load(other)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Frozen.load(tmp_path)
