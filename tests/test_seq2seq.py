"""models/seq2seq.py: KV-cache decoding equals the teacher-forced forward (encoder-decoder and the
decoder-only prefix-LM, padded queries), logical axis names, TIGER's size, and exact import of Hugging Face
T5 v1.0 / v1.1 / mT5 weights (parity with transformers on tiny random models; skipped without torch)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding

from models.hf_import import build_with_params, load_hf
from models.partitioning import LOGICAL_AXES, activation_rules, param_logical_axes, tree_specs
from models.seq2seq import Seq2Seq, Seq2SeqConfig, param_count, relative_bucket, tiger, tiny

# the module and session fixtures are built once: this file runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_seq2seq")

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _build(cfg: Seq2SeqConfig, seed: int = 0) -> Seq2Seq:
    """A model with random numpy parameters of T5-like scales (compiling the real init costs seconds on
    CPU; ``test_encode_shapes_and_bf16_compute`` runs the real one)."""
    rng = np.random.default_rng(seed)
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Seq2Seq(cfg, rngs=nnx.Rngs(0))))

    def fill(path, sds):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return 1 + 0.1 * rng.standard_normal(sds.shape, np.float32)
        fan_in = 1 if name == "embedding" else np.prod(sds.shape[:2]) if name == "o" else sds.shape[0]
        return rng.standard_normal(sds.shape, np.float32) / np.sqrt(fan_in)

    pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    return nnx.merge(graphdef, state)


def _jit(model, fn):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))
    return lambda *a: f(state, *a)


def _batch(cfg, b=3, s=9, t=6, seed=0):
    """tokens/mask [b, s] with a right-padded, a left-padded and a full row; decoder_inputs [b, t]."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, cfg.vocab_size, (b, s)).astype(np.int32)
    mask = np.ones((b, s), bool)
    mask[1, 5:] = False
    mask[2, :3] = False
    tokens[~mask] = cfg.pad_token
    dec = rng.integers(1, cfg.vocab_size, (b, t)).astype(np.int32)
    dec[:, 0] = cfg.decoder_start_token
    return tokens, mask, dec


def _decode_all(model, tokens, mask, dec, max_len, vector_positions):
    """Teacher-forced step-by-step decoding with start + step (jitted) -> logits [b, t, vocab]."""
    start = _jit(model, lambda m, x, k: m.start(x, k, max_len))
    step = _jit(model, lambda m, c, kv, tok, pos: m.step(c, kv, tok, pos))
    context, cache = start(tokens, mask)
    b = tokens.shape[0]
    for leaf in jax.tree.leaves((context, cache)):
        assert leaf.shape[0] == b                       # the beam search repeats / gathers axis 0
    out = []
    for t in range(dec.shape[1]):
        pos = jnp.full((b,), t, jnp.int32) if vector_positions else jnp.int32(t)
        logits, cache = step(context, cache, dec[:, t], pos)
        assert logits.shape == (b, model.cfg.vocab_size) and logits.dtype == jnp.float32
        out.append(logits)
    return np.stack(out, axis=1)


# (config, positions as [b] rather than a scalar, cache length beyond the 24 decoded tokens)
CONFIGS = {
    "enc_dec_relu_tied": (tiny(), False, 0),
    "enc_dec_gated_untied": (tiny(feed_forward="gated-gelu", tie_embeddings=False), True, 6),
    "decoder_only": (tiny(decoder_only=True), True, 6),
    "decoder_only_gated_untied": (tiny(decoder_only=True, feed_forward="gated-gelu", tie_embeddings=False),
                                  False, 0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_decoding_equals_full_forward(name):
    cfg, vector_positions, extra = CONFIGS[name]
    model = _build(cfg)
    # s, t beyond the tiny config's max_distance (20): log-spaced and saturated buckets are exercised
    tokens, mask, dec = _batch(cfg, s=14, t=24)
    full = np.asarray(_jit(model, lambda m, x, k, d: m(x, k, d))(tokens, mask, dec))
    assert full.shape == (3, 24, cfg.vocab_size) and full.dtype == np.float32
    steps = _decode_all(model, tokens, mask, dec, 24 + extra, vector_positions)
    np.testing.assert_allclose(steps, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("decoder_only", [False, True])
def test_n_continuations_per_query_share_its_encoder_pass(decoder_only):
    """``model(tokens [b, s], mask, decoder_inputs [b * n, t])`` (a beam's candidates scored together) equals
    the forward of every query repeated n times."""
    cfg = tiny(decoder_only=decoder_only)
    model = _build(cfg)
    tokens, mask, _ = _batch(cfg)
    _, _, dec = _batch(cfg, b=6, seed=1)                       # 2 continuations of each of the 3 queries
    fwd = _jit(model, lambda m, x, k, d: m(x, k, d))
    shared = np.asarray(fwd(tokens, mask, dec))
    repeated = np.asarray(fwd(np.repeat(tokens, 2, 0), np.repeat(mask, 2, 0), dec))
    np.testing.assert_allclose(shared, repeated, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not a multiple"):
        model(tokens, mask, dec[:4])


def test_kv_cache_with_reordered_rows():
    """A beam search gathers the cache along axis 0 between steps: decoding stays equal to recompute."""
    cfg = tiny()
    model = _build(cfg)
    tokens, mask, dec = _batch(cfg, t=5)
    start = _jit(model, lambda m, x, k: m.start(x, k, 5))
    step = _jit(model, lambda m, c, kv, tok, pos: m.step(c, kv, tok, pos))
    context, cache = start(tokens, mask)
    perm = np.array([2, 0, 1])
    for t in range(5):
        if t == 2:          # reorder rows: context and cache together, as beams do
            context, cache = jax.tree.map(lambda a: a[perm], (context, cache))
            tokens, mask, dec = tokens[perm], mask[perm], dec[perm]
        logits, cache = step(context, cache, dec[:, t], t)
    full = _jit(model, lambda m, x, k, d: m(x, k, d))(tokens, mask, dec)
    np.testing.assert_allclose(logits, full[:, -1], atol=1e-5, rtol=0)


def test_decoder_only_ignores_query_padding():
    """Decoder-only positions count valid tokens only: a padded query gives the unpadded logits."""
    cfg = tiny(decoder_only=True)
    model = _build(cfg)
    fwd = _jit(model, lambda m, x, k, d: m(x, k, d))
    rng = np.random.default_rng(3)
    q = rng.integers(1, cfg.vocab_size, (1, 5)).astype(np.int32)
    dec = np.array([[0, 7, 9, 11]], np.int32)
    ref = fwd(q, np.ones((1, 5), bool), dec)
    padded = np.zeros((1, 9), np.int32)
    padded[0, 2:7] = q[0]
    m = np.zeros((1, 9), bool)
    m[0, 2:7] = True
    np.testing.assert_allclose(fwd(padded, m, dec), ref, atol=1e-5, rtol=0)


def test_encode_shapes_and_bf16_compute():
    cfg = tiny()
    tokens, mask, dec = _batch(cfg)
    enc = _jit(_build(cfg), lambda m, x, k: m.encode(x, k))(tokens, mask)
    assert enc.shape == (3, 9, cfg.d_model)
    with nnx.use_eager_sharding(False):      # the real init, jitted, with bf16 compute
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: Seq2Seq(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)))
        state = jax.jit(lambda: nnx.state(Seq2Seq(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")),
                                                  dtype=jnp.bfloat16)))()
    m16 = nnx.merge(graphdef, state)
    logits = _jit(m16, lambda m, x, k, d: m(x, k, d))(tokens, mask, dec)
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(m16, nnx.Param)))


RULES = {"batch": ("data",), "mlp": ("tensor",), "heads": ("tensor",), "vocab": ("tensor",), "embed": ()}


@pytest.mark.parametrize("decoder_only", [False, True], ids=["enc_dec", "decoder_only"])
def test_sharded_forward_and_step_like_the_trainer(decoder_only):
    """Params placed by their logical names on a 2x4 mesh, activations constrained: same logits."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    cfg = tiny(decoder_only=decoder_only, tie_embeddings=False)
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    model = _build(cfg)
    graphdef, state = nnx.split(model)
    specs = tree_specs(param_logical_axes(state), RULES)
    params = nnx.to_pure_dict(state)
    placed = jax.tree.map(lambda a, sp: jax.device_put(a, NamedSharding(mesh, sp)), params, specs)
    assert placed["decoder"]["layers"][0]["self_attn"]["q"].sharding.spec[1] == "tensor"
    tokens, mask, dec = _batch(cfg, b=4, t=3)

    def run(p, tokens, mask, dec):
        st = nnx.state(nnx.merge(graphdef, state))
        nnx.replace_by_pure_dict(st, p)
        m = nnx.merge(graphdef, st)
        with activation_rules(mesh, RULES):
            full = m(tokens, mask, dec)
            context, cache = m.start(tokens, mask, 3)
            for t in range(3):
                last, cache = m.step(context, cache, dec[:, t], t)
        return full, last

    with jax.set_mesh(mesh):
        full, last = jax.jit(run)(placed, tokens, mask, dec)
    ref = _jit(model, lambda m, x, k, d: m(x, k, d))(tokens, mask, dec)
    np.testing.assert_allclose(full, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(last, ref[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", [tiger(), tiger(decoder_only=True, tie_embeddings=False),
                                 tiny(feed_forward="gated-gelu", tie_embeddings=False)],
                         ids=["tiger", "tiger_decoder_only_untied", "tiny_gated"])
def test_every_param_has_known_logical_names(cfg):
    with nnx.use_eager_sharding(False):
        abstract = nnx.state(nnx.eval_shape(lambda: Seq2Seq(cfg, rngs=nnx.Rngs(0))))
    axes = param_logical_axes(abstract)     # raises on a parameter without names
    leaves = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert leaves and all(len(a) > 0 for a in leaves)
    assert {n for a in leaves for n in a} <= set(LOGICAL_AXES)
    assert axes["decoder"]["layers"][0]["self_attn"]["relative_bias"] == ("relpos", "heads")
    assert "relative_bias" not in axes["decoder"]["layers"][1]["self_attn"]     # shared from layer 0


@pytest.mark.parametrize("vocab", [1024, 3000])
def test_tiger_size_is_4_6M_to_4_9M_at_vocab_1k_3k(vocab):
    """TIGER's sizes give about 4.6M (vocab 1024) to 4.9M (vocab 3000) parameters, 4.46M of them outside the
    embedding. The paper's "about 13M" needs T5's 32,128-token vocabulary with an untied head (12.7M)."""
    cfg = tiger(vocab)
    with nnx.use_eager_sharding(False):
        abstract = nnx.state(nnx.eval_shape(lambda: Seq2Seq(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    print(f"TIGER vocab {vocab}: {n:,} params")
    assert n == param_count(cfg)
    assert 4.5e6 < n < 5.0e6
    assert (cfg.encoder_layers, cfg.decoder_layers, cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff) == \
        (4, 4, 128, 6, 64, 1024)
    assert 12.5e6 < param_count(tiger(32128, tie_embeddings=False)) < 13.5e6
    assert param_count(tiger(vocab, decoder_only=True)) < n


# --- Hugging Face T5 / mT5 ------------------------------------------------------------------------------

T5_TINY = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=20)


@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return torch, transformers


def test_buckets_equal_hf(hf):
    torch, T = hf
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 300)
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (8, 20), (16, 64)):
            want = T5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional=bidirectional,
                                                         num_buckets=nb, max_distance=md).numpy()
            got = relative_bucket(rel, bidirectional=bidirectional, num_buckets=nb, max_distance=md)
            np.testing.assert_array_equal(np.asarray(got), want)


def _hf_model(torch, T, kind):
    torch.manual_seed(0)
    if kind == "t5_v1_0":         # relu, tied head, output scaled by d_model**-0.5
        model = T.T5ForConditionalGeneration(T.T5Config(**T5_TINY, feed_forward_proj="relu"))
    elif kind == "t5_v1_1":       # gated-gelu, untied, not scaled
        model = T.T5ForConditionalGeneration(T.T5Config(**T5_TINY, feed_forward_proj="gated-gelu",
                                                        tie_word_embeddings=False))
    else:                         # mT5: gated-gelu, untied, never scaled
        model = T.MT5ForConditionalGeneration(T.MT5Config(**T5_TINY, tie_word_embeddings=False))
    with torch.no_grad():         # HF init leaves norms at 1: perturb everything so each mapping matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        if kind != "t5_v1_0":     # transformers 5 ties lm_head to shared whatever the config says: untie
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.2)
    return model.eval()


@pytest.mark.parametrize("kind", ["t5_v1_0", "t5_v1_1", "mt5"])
def test_t5_parity(hf, tmp_path, kind):
    torch, T = hf
    model = _hf_model(torch, T, kind)
    model.save_pretrained(tmp_path, safe_serialization=True)
    imp = load_hf(tmp_path)
    cfg = imp.config
    assert imp.family == "t5" and imp.report.missing == [] and imp.report.unused == []
    assert cfg.tie_embeddings == (kind == "t5_v1_0") and cfg.scale_output == (kind == "t5_v1_0")
    assert cfg.feed_forward == ("relu" if kind == "t5_v1_0" else "gated-gelu")
    assert (cfg.encoder_layers, cfg.decoder_layers, cfg.num_heads, cfg.head_dim) == (2, 2, 4, 8)

    rng = np.random.default_rng(1)
    ids = rng.integers(2, 100, (3, 25)).astype(np.int32)           # > max_distance: saturated buckets too
    mask = np.ones_like(ids, bool)
    mask[1, 17:] = False
    mask[2, 6:] = False
    ids[~mask] = 0
    dec = rng.integers(2, 100, (3, 22)).astype(np.int32)
    dec[:, 0] = cfg.decoder_start_token
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                    decoder_input_ids=torch.from_numpy(dec).long())
        ref_enc = ref.encoder_last_hidden_state.numpy()
    ours = imp.build()
    logits = np.asarray(_jit(ours, lambda m, x, k, d: m(x, k, d))(ids, mask, dec))
    np.testing.assert_allclose(logits, ref.logits.numpy(), atol=1e-5, rtol=0)
    enc = np.asarray(_jit(ours, lambda m, x, k: m.encode(x, k))(ids, mask))
    np.testing.assert_allclose(enc[mask], ref_enc[mask], atol=1e-5, rtol=0)
    if kind == "t5_v1_0":          # cached decoding of imported weights (the other kinds: test above)
        steps = _decode_all(ours, ids, mask, dec, dec.shape[1], vector_positions=False)
        np.testing.assert_allclose(steps, ref.logits.numpy(), atol=1e-5, rtol=0)

    back = nnx.to_pure_dict(nnx.state(build_with_params(Seq2Seq, cfg, imp.params)))
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(back["embedding"], sd["shared.weight"])
    np.testing.assert_array_equal(back["decoder"]["layers"][0]["self_attn"]["relative_bias"],
                                  sd["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"])


def test_sampled_sid_log_probs_equal_the_teacher_forced_path_log_probs():
    """GRPO's ratio needs the sampler's policy under teacher forcing: ``models.gr.path_log_probs`` (the level's
    code block renormalised over the trie's children) equals what ``beam_search.sample`` recorded, per code."""
    import itertools

    from data_pipelines.sid.trie import TrieConstraint, build_trie
    from models.beam_search import sample
    from models.gr import SIDVocab, code_step, path_log_probs

    vocab = SIDVocab(text=20, sizes=(4, 3, 3))
    cfg = tiny(vocab_size=vocab.size, decoder_start_token=vocab.start)
    model = _build(cfg)
    every = np.array(list(itertools.product(*map(range, vocab.sizes))))
    constraint = TrieConstraint(jax.tree.map(jnp.asarray, build_trie(every[::4], vocab.sizes)))
    tokens, mask, _ = _batch(cfg)

    def draw(m, x, k, rng):
        context, cache = m.start(x, k, vocab.depth)
        out = sample(code_step(m, vocab), context, cache, batch=3, samples=5, sizes=vocab.sizes, rng=rng,
                     constraint=constraint, temperature=0.7)
        codes = out.codes.reshape(15, -1)
        logits = m(jnp.repeat(x, 5, 0), jnp.repeat(k, 5, 0), vocab.decoder_inputs(codes))
        return out.log_probs.reshape(15, -1), path_log_probs(vocab, logits, codes, constraint, 0.7)

    recorded, forced = _jit(model, draw)(tokens, mask, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(recorded), np.asarray(forced), atol=1e-5)
    assert (np.asarray(forced) < 0).any()
