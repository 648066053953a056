"""The search agent: the host environment in token space, the tunix Qwen2 policy's KV-cached sampler and
its Hugging Face parity, and a supervised warm start followed by GRPO / SD-Search steps on a tiny world."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import load_test_config

pytestmark = pytest.mark.xdist_group("tunix")  # `import tunix` imports every learner: once per worker
pytest.importorskip("tunix")

from data_pipelines.agents.environment import SearchEnvironment  # noqa: E402
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
    recomputed = policy.token_logprobs(model, full, jnp.concatenate([valid, tokens != 0], 1))[:, 5:]
    np.testing.assert_allclose(np.asarray(recomputed), np.asarray(logp), atol=1e-5)
    stopped = np.asarray(tokens) == 2
    for row in range(2):  # after a stop token only padding, with log-prob 0
        if stopped[row].any():
            after = np.argmax(stopped[row]) + 1
            assert (np.asarray(tokens)[row, after:] == 0).all() and (np.asarray(logp)[row, after:] == 0).all()
    greedy, _ = policy.sample(model, cfg, context, valid, jax.random.key(0), steps=3, temperature=0, stop_ids=(),
                              pad_id=0, active=jnp.array([True, False]))
    cur, cur_valid = jnp.asarray(context[:1]), jnp.asarray(valid[:1])
    for _ in range(3):  # the same tokens by re-running the whole prefix each step
        nxt = jnp.argmax(policy.logits_of(model, cur, cur_valid)[:, -1], -1)[:, None]
        cur, cur_valid = jnp.concatenate([cur, nxt], 1), jnp.concatenate([cur_valid, jnp.ones_like(nxt, bool)], 1)
    np.testing.assert_array_equal(np.asarray(greedy[0]), np.asarray(cur[0, 5:]))
    assert (np.asarray(greedy[1]) == 0).all()                                       # an inactive row writes nothing


def test_a_hugging_face_llama_loads_into_tunix_qwen2_with_equal_logits(tmp_path):
    """A Llama checkpoint (tied, grouped-query, rope base 1e5 as SmolLM2) through ``init_from`` format
    ``tunix``'s loader gives transformers' logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from flax import nnx

    from models import policy

    hf = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, rope_theta=1e5, rms_norm_eps=1e-5,
                                  tie_word_embeddings=True, max_position_embeddings=64)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(hf).eval()
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


def test_sft_warm_start_then_sd_search_grpo_steps(world, tmp_path):
    from trainers.loop import train

    sft = train(_config("sft_tiny", world, "train.steps=60", "train.batch_size=8", "train.log_every=10", "optimizer.learning_rate=1e-2", "train.eval_every=0"),
                tmp_path / "sft")
    losses = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in losses if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert sft.eval_metrics["format"] > 0       # the warm-started policy writes tagged rollouts
    rl = _config("sd_tiny", world, "train.steps=2", "train.batch_size=8", "agent.group=2", "train.checkpoint_every=2", f"init_from.policy.path={tmp_path / 'sft'}")
    train(rl, tmp_path / "rl")
    steps = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    first = steps[0]
    # the update's log-probs equal the sampler's (ratio 1: nothing clipped) and the reference is the start policy
    assert first["clip_fraction"] == 0 and first["kl"] < 1e-6
    assert first["searches"] > 0 and np.isfinite(first["jsd"]) and first["jsd"] >= 0
    assert first["reward"] >= first["em"] and 0 <= first["format"] <= 1


def test_qwen3b_search_r1_rollout_lowers_on_cpu(tmp_path):
    """Search-R1's Qwen2.5-3B policy: the turn-1 rollout (4096-token prefill, 500 KV-cached sampling steps)
    at 512 questions x 5 lowers with its shardings, on 8 fake devices, without memory."""
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
