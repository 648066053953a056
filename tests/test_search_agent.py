"""The search agent: the host environment in token space, the tunix Qwen2 policy's KV-cached sampler and
its Hugging Face parity, and a supervised warm start followed by GRPO / SD-Search steps on a tiny world."""

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import load_test_config

pytestmark = pytest.mark.xdist_group("tunix")  # `import tunix` imports every learner: once per worker
pytest.importorskip("tunix")

from data_pipelines.agents.environment import SearchEnvironment  # noqa: E402
from data_pipelines.agents.qa import read_qa  # noqa: E402
from data_pipelines.agents.tokenizer import word_tokenizer  # noqa: E402

TEXTS = ["Zorvik is a company . It is headquartered in Lunaro .", "Lunaro is a city in Velmoria ."]


def _search(queries):
    return [[{"title": "Zorvik", "text": "Zorvik is headquartered in Lunaro ."}] for _ in queries]


def test_environment_inserts_documents_masks_them_and_ends_rollouts():
    tok = word_tokenizer(TEXTS)
    assert tok.stop_ids == (tok.encode("</search>")[0], tok.encode("</answer>")[0])   # single-token tags
    env = SearchEnvironment(tok, _search, k=1, max_turns=1, context=64, doc_tokens=8)
    prompt = tok.encode("where is zorvik ?")
    eps = env.start([prompt, prompt, prompt])
    pad = tok.pad_id
    rows = [tok.encode("<search> zorvik company </search> lunaro"),      # cut after </search>: searches
            tok.encode("<answer> lunaro </answer> city"),                 # answers: done
            tok.encode("zorvik is a")]                                    # no tag in its turn: done
    width = max(map(len, rows))
    generated = np.array([r + [pad] * (width - len(r)) for r in rows])
    logp = -np.arange(1, width + 1, dtype=np.float32)[None].repeat(3, 0)
    env.absorb(eps, generated, logp, last=False)
    assert eps[0].queries == ["zorvik company"] and not eps[0].done
    assert eps[1].done and eps[2].done and eps[1].queries == []
    policy = len(tok.encode("<search> zorvik company </search>"))
    docs = eps[0].tokens[len(prompt) + policy:]
    assert tok.decode(docs).startswith("<documents> doc 1 ( title : zorvik )") and tok.decode(docs).endswith(
        "</documents>")
    assert eps[0].trainable == [False] * len(prompt) + [True] * policy + [False] * len(docs)
    assert eps[0].logp[len(prompt):len(prompt) + policy] == list(logp[0, :policy])
    assert [s for s in eps[0].query_step if s >= 0] == [0, 0]                          # "zorvik company"
    context, valid, active = env.contexts(eps)
    assert list(active) == [True, False, False] and list(context[0, valid[0]]) == eps[0].tokens
    # a second search is past max_turns: not answered, the rollout ends
    again = tok.encode("<search> lunaro </search>")
    env.absorb(eps, np.array([again, [pad] * len(again), [pad] * len(again)]), np.zeros((3, len(again))), last=False)
    assert eps[0].done and eps[0].queries == ["zorvik company"]
    batch = env.layout(eps, 64)
    assert batch["mask"][0].sum() == policy + len(again) and batch["valid"][1].sum() == len(eps[1].tokens)
    with pytest.raises(ValueError, match="rollout 0 has"):
        env.layout(eps, 8)


def _episodes(tok, *, max_turns: int = 1):
    """Two rollouts that each search once and get different documents."""
    docs = {"zorvik": "Zorvik is headquartered in Lunaro .", "lunaro": "Lunaro is a city in Velmoria ."}
    env = SearchEnvironment(tok, lambda qs: [[{"title": q, "text": docs[q]}] for q in qs], k=1, max_turns=max_turns,
                            context=64, doc_tokens=12)
    eps = env.start([tok.encode("where is zorvik ?")] * 2)
    rows = [tok.encode("<search> zorvik </search>"), tok.encode("<search> lunaro </search>")]
    env.absorb(eps, np.array(rows), np.zeros((2, 3)), last=False)
    return env, eps


def test_ig_search_swaps_documents_and_scores_the_gain(monkeypatch):
    """IG-Search's counterfactuals: step t's own documents vs ones drawn from another rollout, the gold
    answer appended; the gain is the real answer score minus the counterfactuals' mean (Eq. of IG_t)."""
    from models import policy
    from trainers.tasks.search_agent import SearchAgentTask

    tok = word_tokenizer(TEXTS + ["where velmoria"])
    task = SearchAgentTask(load_test_config("configs/search_agent.py:ig_tiny", "agent.context=64",
                                            "agent.turn_tokens=8", "agent.max_turns=1", "ig.share_prefix=False"))
    task.__dict__["tokenizer"] = tok
    _, eps = _episodes(tok)
    out = task.counterfactuals(eps, [("Lunaro",), ("Velmoria",)], step=0)
    assert out["ig_tokens"].shape[:2] == (2, 4)                     # 1 step x (real + 3 swaps) x 1 gold
    np.testing.assert_array_equal(out["ig_index"][0], [[0, 0, 0], [0, 1, 0], [0, 2, 0], [0, 3, 0]])
    own, other = tok.encode("headquartered")[0], tok.encode("city")[0]
    for i, (mine, theirs) in enumerate(((own, other), (other, own))):
        seqs = [out["ig_tokens"][i, m][out["ig_valid"][i, m]] for m in range(4)]
        assert mine in seqs[0] and theirs not in seqs[0]            # the real context
        assert all(theirs in s and mine not in s for s in seqs[1:])  # the other rollout's documents
        answer = out["ig_tokens"][i, 0][out["ig_answer"][i, 0] > 0]
        assert tok.decode(answer) == ("lunaro" if i == 0 else "velmoria")

    def fake_logprobs(model, tokens, valid, temperature=1.0):  # -1 per token beside row 0's documents, else -3
        return jnp.where(jnp.any(tokens == own, -1, keepdims=True), -1.0, -3.0) * valid

    monkeypatch.setattr(policy, "token_logprobs", fake_logprobs)
    ig = task.information_gains(None, {k: jnp.asarray(v) for k, v in out.items()})
    np.testing.assert_allclose(np.asarray(ig), [[2.0], [-2.0]])      # -1 - (-3), -3 - (-1)


def test_ig_search_shared_prefix_scores_equal_full_contexts():
    """Prefix sharing (one cached pass over each rollout, then only documents + answer per counterfactual)
    gives the information gains of re-running every counterfactual context in full, on a randomly
    initialised policy, at two search steps (the second step's prefix holds the first step's documents)."""
    from flax import nnx

    from trainers.tasks.search_agent import SearchAgentTask

    tok = word_tokenizer(TEXTS + ["where velmoria"])
    gains = {}
    for share in (True, False):
        task = SearchAgentTask(load_test_config("configs/search_agent.py:ig_tiny", "agent.context=64",
                                                "agent.turn_tokens=8", "agent.max_turns=2", "agent.k=1",
                                                "agent.doc_tokens=12", f"ig.share_prefix={share}", "ig.max_golds=2"))
        task.__dict__["tokenizer"] = tok
        docs = {"zorvik": "Zorvik is headquartered in Lunaro .", "lunaro": "Lunaro is a city in Velmoria .",
                "velmoria": "Velmoria is a city .", "company": "Zorvik is a company ."}
        env = SearchEnvironment(tok, lambda qs: [[{"title": q, "text": docs[q]}] for q in qs], k=1, max_turns=2,
                                context=64, doc_tokens=12)
        eps = env.start([tok.encode("where is zorvik ?")] * 2)
        for queries in (("zorvik", "lunaro"), ("velmoria", "company")):   # four distinct documents blocks
            rows = [tok.encode(f"<search> {q} </search>") for q in queries]
            env.absorb(eps, np.array(rows), np.zeros((2, 3)), last=False)
        assert [len(e.documents) for e in eps] == [2, 2]
        task.__dict__["env"] = env
        out = {**env.layout(eps, 72), **task.counterfactuals(eps, [("Lunaro", "city"), ("Velmoria",)], step=0)}
        with nnx.use_eager_sharding(False):
            model = task.build_model(nnx.Rngs(0))
        gains[share] = np.asarray(jax.jit(task.information_gains, static_argnums=0)(
            model, {k: jnp.asarray(v) for k, v in out.items()}))
        if share:   # only what follows the prefix: the documents, the lead, the answer
            for m, (t, v, g) in enumerate(out["ig_index"][0]):
                if t >= 0:
                    ids = out["ig_tokens"][0, m][out["ig_valid"][0, m]]
                    assert tok.decode(ids).startswith("<documents>")
                    assert out["ig_start"][0, m] == eps[0].documents[t][0]
            assert out["ig_tokens"].shape[2] == env.documents_tokens + len(tok.encode("\n<answer> ")) + 8
    assert gains[True].shape == (2, 2) and np.all(gains[True] != 0)
    np.testing.assert_allclose(gains[True], gains[False], atol=1e-5)


def test_sd_search_teacher_sees_the_hindsight_block_and_aligns_query_positions():
    from trainers.tasks.search_agent import SearchAgentTask

    tok = word_tokenizer(TEXTS)
    task = SearchAgentTask(load_test_config("configs/search_agent.py:sd_tiny", "agent.context=64",
                                            "agent.turn_tokens=8", "agent.group=2"))
    task.__dict__["tokenizer"] = tok
    _, eps = _episodes(tok)
    texts = [e.policy_text(tok) for e in eps]
    out = task.hindsight_teacher(eps, texts, np.array([True, False]))
    teacher = tok.decode(out["teacher_tokens"][0][out["teacher_valid"][0]])
    assert "<hindsight>" in teacher and "attempt 1 [ correct ]: <search> zorvik </search>" in teacher
    assert "attempt 2 [ incorrect ]: <search> lunaro </search>" in teacher
    for i, e in enumerate(eps):   # each student query token's predicting position maps to the teacher's
        n = int(out["sd_positions"][i].sum())
        assert n == 1
        s, t = out["sd_student_pos"][i, 0], out["sd_teacher_pos"][i, 0]
        assert e.tokens[s + 1] == out["teacher_tokens"][i, t + 1] == e.tokens[e.prompt + 1]


def _tiny_policy(tied: bool):
    from flax import nnx

    from models import policy

    cfg = policy.qwen2_config({"layers": 2, "vocab": 50, "embed": 32, "mlp": 64, "heads": 4, "kv_heads": 2,
                               "head_dim": 8, "rope_theta": 1e4, "norm_eps": 1e-6, "tied": tied})
    return cfg, policy.build(cfg, nnx.Rngs(0))


def test_kv_cached_sampler_matches_the_teacher_forced_policy():
    from models import policy

    cfg, model = _tiny_policy(tied=False)
    context = np.array([[0, 0, 5, 6, 7], [3, 4, 5, 6, 8]], np.int32)
    valid = context != 0
    tokens, logp = jax.jit(lambda c, v, r: policy.sample(model, cfg, c, v, r, steps=6, temperature=1.0,
                                                          stop_ids=(2,), pad_id=0))(context, valid, jax.random.key(1))
    full = jnp.concatenate([context, tokens], 1)
    recomputed = jax.jit(policy.token_logprobs, static_argnums=0)(model, full, jnp.concatenate([valid, tokens != 0],
                                                                                                 1))[:, 5:]
    np.testing.assert_allclose(np.asarray(recomputed), np.asarray(logp), atol=1e-5)
    stopped = np.asarray(tokens) == 2
    for row in range(2):  # after a stop token only padding, with log-prob 0
        if stopped[row].any():
            after = np.argmax(stopped[row]) + 1
            assert (np.asarray(tokens)[row, after:] == 0).all() and (np.asarray(logp)[row, after:] == 0).all()
    greedy, _ = jax.jit(lambda c, v: policy.sample(model, cfg, c, v, jax.random.key(0), steps=3, temperature=0,
                                                    stop_ids=(), pad_id=0, active=jnp.array([True, False])))(
        context, valid)
    cur, cur_valid = jnp.asarray(context[:1]), jnp.asarray(valid[:1])
    last = jax.jit(lambda t, v: jnp.argmax(policy.logits_of(model, t, v)[:, -1], -1)[:, None])
    for _ in range(3):  # the same tokens by re-running the whole prefix each step
        nxt = last(cur, cur_valid)
        cur, cur_valid = jnp.concatenate([cur, nxt], 1), jnp.concatenate([cur_valid, jnp.ones_like(nxt, bool)], 1)
    np.testing.assert_array_equal(np.asarray(greedy[0]), np.asarray(cur[0, 5:]))
    assert (np.asarray(greedy[1]) == 0).all()                                       # an inactive row writes nothing


def _check_continuations(model, got, tokens, valid, start, suffix, suffix_valid, scored_from):
    """Each continuation's scores against a teacher-forced pass over prefix + its valid suffix tokens: equal
    after column ``scored_from`` (bar the run's first token, predicted from the prefix), 0 elsewhere."""
    from models import policy

    full = jax.jit(policy.token_logprobs, static_argnums=0)
    for b, m in np.ndindex(*start.shape):
        head = tokens[b, :start[b, m]][valid[b, :start[b, m]]]
        cols = np.flatnonzero(suffix_valid[b, m])
        seq = np.zeros((1, tokens.shape[1] + suffix.shape[2]), np.int32)    # right-padded: one compilation
        seq[0, :len(head) + len(cols)] = np.concatenate([head, suffix[b, m, cols]])
        want = np.asarray(full(model, jnp.asarray(seq), jnp.asarray(seq != 0)))[0, len(head):]
        expected = np.zeros(suffix.shape[2], np.float32)
        scored = (cols > scored_from) & (np.arange(len(cols)) > 0)
        expected[cols[scored]] = want[:len(cols)][scored]
        np.testing.assert_allclose(np.asarray(got[b, m]), expected, atol=1e-5)


def test_continuation_logprobs_equal_the_concatenated_sequences():
    """Continuations scored from one cached prefill of each row equal teacher-forced passes over each
    prefix + continuation (padding in both, prefixes of several lengths); with ``scored_from`` the columns
    before it only extend the cache, whether the suffixes are right-padded or left-padded (IG-Search's
    documents end at one column)."""
    from models import policy

    cfg, model = _tiny_policy(tied=True)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 50, (2, 9)).astype(np.int32)
    valid = np.arange(9)[None] < np.array([[9], [6]])
    start = np.array([[9, 4, 1], [8, 3, 5]], np.int32)              # row 1: a start past its valid tokens
    suffix = rng.integers(3, 50, (2, 3, 5)).astype(np.int32)
    right = np.arange(5)[None, None] < np.array([[5, 3, 4], [2, 5, 5]])[..., None]
    left = np.arange(5)[None, None] >= np.array([[0, 1, 1], [1, 0, 1]])[..., None]
    for suffix_valid, scored_from in ((right, 0), (right, 2), (left, 2)):
        got = jax.jit(lambda *a, d=scored_from: policy.continuation_logprobs(model, cfg, *a, scored_from=d))(
            tokens, valid, start, suffix, suffix_valid)
        _check_continuations(model, got, tokens, valid, start, suffix, suffix_valid, scored_from)


def test_continuation_logprobs_keep_each_cache_on_its_device():
    """On 8 devices with the batch split 8 ways, the continuations map over the rows each device holds (one
    row a shard a step): the compiled program moves nothing between devices and scores what one device does."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from models import partitioning, policy
    from trainers.mesh import BATCH_AXES

    cfg, model = _tiny_policy(tied=True)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8, 1, 1), BATCH_AXES)
    rng = np.random.default_rng(0)
    B, L, M, S = 16, 20, 3, 6
    arrays = (rng.integers(3, 50, (B, L)).astype(np.int32), np.ones((B, L), bool),
              rng.integers(2, L, (B, M)).astype(np.int32), rng.integers(3, 50, (B, M, S)).astype(np.int32),
              np.arange(S) >= rng.integers(0, 2, (B, M, 1)))                 # left-padded, as IG-Search's
    sharded = [jax.device_put(a, NamedSharding(mesh, P(BATCH_AXES))) for a in arrays]

    def scores(*a):
        with partitioning.activation_rules(mesh, {"batch": BATCH_AXES}):
            assert partitioning.shards("batch") == 8
            return policy.continuation_logprobs(model, cfg, *a, scored_from=2)

    compiled = jax.jit(scores).lower(*sharded).compile()
    hlo = compiled.as_text()
    assert not [op for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute") if op in hlo]
    one = jax.jit(lambda *a: policy.continuation_logprobs(model, cfg, *a, scored_from=2))(*arrays)
    np.testing.assert_allclose(np.asarray(compiled(*sharded)), np.asarray(one), atol=1e-5)
    _check_continuations(model, one[:2], *(x[:2] for x in arrays), scored_from=2)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hugging_face_llama_and_qwen2_load_into_tunix_qwen2_with_equal_logits(tmp_path, arch):
    """A Llama checkpoint (tied, grouped-query, rope base 1e5 as SmolLM2; zero q/k/v biases added) and a Qwen2
    one (q/k/v biases, as Qwen2.5) through ``init_from`` format ``tunix``'s loader give transformers' logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from flax import nnx

    from models import policy

    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=1e5, rms_norm_eps=1e-5, tie_word_embeddings=True,
                 max_position_embeddings=64)
    torch.manual_seed(0)
    if arch == "llama":
        reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).eval()
    else:
        reference = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape)).eval()
        with torch.no_grad():   # random biases, so that they are read and used
            for layer in reference.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.1)
    reference.save_pretrained(tmp_path)
    cfg = policy.qwen2_config(None, policy.hf_model_config(tmp_path))
    model = policy.build(cfg, nnx.Rngs(1))
    nnx.update(model, policy.load_params(tmp_path, cfg))
    tokens = np.array([[1, 7, 9, 33, 2, 60, 11]])
    with torch.no_grad():
        expected = reference(torch.from_numpy(tokens)).logits.numpy()
    got = policy.logits_of(model, jnp.asarray(tokens, jnp.int32), jnp.ones(tokens.shape, bool))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from data_pipelines.agents.synthetic import write_world
    from trainers.evaluators.passage_retriever import build_passage_index

    root = tmp_path_factory.mktemp("agent_world")
    write_world(root / "world", seed=0, entities=30, questions=12)
    build_passage_index(root / "world" / "corpus.jsonl", root / "index", "bm25", progress=False)
    return root


def _config(spec: str, world, *overrides: str):
    return load_test_config(f"configs/search_agent.py:{spec}", f"data.world={world / 'world'}",
                            f"data.index={world / 'index'}", "agent.context=256", "agent.doc_tokens=12",
                            "agent.max_turns=2", "eval.questions=4", *overrides)


def _train(config, workdir):
    from trainers.loop import Trainer

    return Trainer.create(config, workdir, devices=jax.devices()[:1]).run()  # one device: tiny shapes, 2 cores


def test_evaluation_grades_the_slice_from_eval_offset(world):
    """``eval.offset`` evaluates a held-out slice of the test questions (the benchmark selects its warm start on
    one): an oracle that reads each row's question and answers it sees exactly questions 5-7 and scores EM 1,
    which it does only when the grading is aligned with the prompts."""
    from trainers.tasks.search_agent import SearchAgentTask

    task = SearchAgentTask(_config("tiny", world, "eval.questions=3", "eval.offset=5"))
    qs = read_qa(world / "world" / "test.jsonl")
    index = {tuple(task.prompt_ids(q.question)): i for i, q in enumerate(qs)}
    seen = []

    class Oracle:
        def apply(self, fn, context, valid, active, batch_size=None):
            asked = [index[tuple(int(t) for t in row[ok])] for row, ok in zip(context, valid)]
            seen.extend(asked)
            rows = [task.tokenizer.encode(f" <answer> {qs[i].golden_answers[0]} </answer>") for i in asked]
            out = np.full((len(rows), max(map(len, rows))), task.tokenizer.pad_id, np.int32)
            for i, r in enumerate(rows):
                out[i, :len(r)] = r
            return out, np.zeros(out.shape, np.float32)

    metrics = task.evaluate(Oracle())
    assert seen == [5, 6, 7] and metrics["em"] == 1.0 and metrics["searches"] == 0
    assert len({tuple(qs[i].golden_answers) for i in (0, 1, 2, 5, 6, 7)}) > 3   # misaligned grading would fail


def test_sft_warm_start_then_sd_and_ig_search_grpo_steps(world, tmp_path):
    sft = _train(_config("sft_tiny", world, "train.steps=60", "train.batch_size=8", "train.log_every=10",
                         "optimizer.learning_rate=1e-2", "train.eval_every=0"),
                tmp_path / "sft")
    losses = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in losses if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert sft.eval_metrics["format"] > 0       # the warm-started policy writes tagged rollouts
    hops = collections.Counter(q.hops for q in read_qa(world / "world" / "test.jsonl")[:4])  # eval.questions=4
    assert {f"em_hop{h}" for h in hops} <= set(sft.eval_metrics)
    by_hop = sum(n * sft.eval_metrics[f"em_hop{h}"] for h, n in hops.items())
    assert by_hop == pytest.approx(4 * sft.eval_metrics["em"])
    for method, key in (("sd_tiny", "jsd"), ("ig_tiny", "ig_mean")):
        _train(_config(method, world, "train.steps=2", "train.stop_after=1",  # stopped: no final evaluation
                       "train.batch_size=8", "agent.group=2",
                      f"init_from.policy.path={tmp_path / 'sft'}"), tmp_path / method)
        first = json.loads((tmp_path / method / "metrics.jsonl").read_text().splitlines()[0])
        # the update's log-probs equal the sampler's (ratio 1: nothing clipped); the reference is the start policy
        assert first["clip_fraction"] == 0 and first["kl"] < 1e-6, method
        assert first["searches"] > 0 and np.isfinite(first[key]) and first[key] != 0, method
        assert first["reward"] >= first["em"] and 0 <= first["format"] <= 1


@pytest.mark.slow
def test_ig_search_grpo_resumes_bitwise_after_kill_9(world, tmp_path):
    """IG-Search's GRPO (multi-turn rollouts with the retriever between turns, the counterfactual documents of
    the information gain) on 2 devices: killed with SIGKILL after a checkpoint and resumed, it logs exactly the
    metrics of an uninterrupted run."""
    from test_engine_contract import _metrics, _train, kill_9_and_resume

    sets = [f"data.world={world / 'world'}", f"data.index={world / 'index'}", "agent.context=256", "agent.doc_tokens=12",
            "agent.max_turns=2", "eval.questions=4", "train.steps=6", "train.checkpoint_every=2", "train.log_every=1",
            "train.batch_size=8", "agent.group=2"]
    flags = [a for s in sets for a in ("--set", s)]
    arg = "configs/search_agent.py:ig_tiny"
    reference = _train(tmp_path / "reference", arg, *flags)
    out, _ = reference.communicate(timeout=400)
    assert reference.returncode == 0, out
    expected = _metrics(tmp_path / "reference")
    assert sorted(expected) == list(range(1, 7)) and all(np.isfinite(r["ig_mean"]) for r in expected.values())
    kill_9_and_resume(tmp_path / "killed", arg, flags, kill_at=3, timeout=400)
    assert _metrics(tmp_path / "killed") == expected     # exact float equality, every metric of every step


def test_qwen3b_search_r1_rollout_compiles_on_cpu_within_memory(tmp_path):
    """Search-R1's Qwen2.5-3B policy: the turn-1 rollout (4096-token prefill, 500 KV-cached sampling steps) of
    8 questions x 5 compiles with its shardings on 8 fake devices, without memory, and fits a device."""
    from launch.bench import memory_report
    from trainers.loop import Trainer

    config = load_test_config("configs/search_agent.py:qwen3b", "mesh.fsdp=4", "mesh.tensor=2",
                              "train.batch_size=8")
    trainer = Trainer.create(config, tmp_path)
    trainer.task.__dict__["tokenizer"] = word_tokenizer(TEXTS)      # stop / pad ids; the shapes are Qwen2.5's
    assert trainer.hosted()
    lowered = trainer.lower()
    out = lowered.out_info
    assert out["generated"].shape == (8 * 5, 500) and out["context"].shape == (40, 4096)
    params = sum(np.prod(x.shape) for x in jax.tree.leaves(trainer.spec.abstract_params))
    assert 3.0e9 < params < 3.2e9                                   # Qwen2.5-3B: 3.09B with tied embeddings

    # memory: the train state (f32 parameters, the frozen reference, Adam's two moments: 16 B a parameter) is
    # split 8 ways by the rules, not replicated (the k/v projections of the 2 kv heads over fsdp only): 6.25 GB
    # a device of the 49 GB
    state = trainer.abstract_state(trainer.compiled_step())
    leaves = [x for x in jax.tree.leaves(state) if x.sharding is not None]
    whole = sum(x.size * x.dtype.itemsize for x in leaves)
    per_device = sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
    assert 16 * 3.0e9 < whole < 16 * 3.2e9
    assert per_device < whole / 8 * 1.02, (per_device, whole)

    # compiled memory of the rollout per device (CPU's estimate: its compiler runs bf16 matmuls in f32): 16.6 GB,
    # 5.6 of them the prefill's attention scores [10, 8, 4095, 4596] f32; the prefill's [B, C, V] f32 logits
    # (never used) held 95 GB until the sampler stopped computing them
    report = memory_report(lowered.compile())
    assert report is not None and report["argument_bytes"] < 1.6e9                         # the f32 parameters split 8 ways
    assert report["total_bytes"] < 24 * 2 ** 30, report

    # IG-Search's scoring of those 40 rollouts (4 steps x 4 variants x 3 golds = 48 continuations each, the
    # documents + answer suffix of 518 tokens): 13.2 GB a device, one row of each batch shard at a time; the
    # map over all rows with every prefill at once and every suffix position's logits compiled to 33.8 GB
    from flax import nnx

    from models import partitioning, policy
    from trainers.mesh import batch_sharding

    a, ig, task = config.agent, config.ig, trainer.task
    task.__dict__["env"] = SearchEnvironment(task.tokenizer, _search, k=a.k, max_turns=a.max_turns,
                                             context=a.context, doc_tokens=a.doc_tokens)
    B, L, M = 40, a.context + a.turn_tokens, a.max_turns * (1 + ig.counterfactuals) * ig.max_golds
    D = task.env.documents_tokens
    S = D + len(task.tokenizer.encode("\n<answer> ")) + ig.answer_tokens
    rows = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,  # noqa: E731
                                                     sharding=batch_sharding(trainer.mesh, len(shape)))
    batch = (rows((B, L), jnp.int32), rows((B, L), bool), rows((B, M), jnp.int32), rows((B, M, S), jnp.int32),
             rows((B, M, S), bool))

    def scores(params, *arrays):
        with partitioning.activation_rules(trainer.mesh, trainer.rules):
            assert partitioning.shards("batch") == 4                # the 40 rows split 4 ways: 10 map steps
            return policy.continuation_logprobs(nnx.merge(trainer.spec.graphdef, params), task.policy_config,
                                                *arrays, scored_from=D)

    report = memory_report(jax.jit(scores).lower(state.params, *batch).compile())
    assert report["total_bytes"] < 16 * 2 ** 30, report
