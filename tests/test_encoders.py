"""Transformer encoders: sizes, logical axis names, shapes, masking, jit/split and a sharded forward."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding

from models.hf_import import build_with_params
from models.partitioning import LOGICAL_AXES, activation_rules, param_logical_axes, tree_specs
from models.text_encoder import TextEncoder, TextEncoderConfig, l2_normalize, mean_pool
from models.transformer import BlockConfig, quick_gelu
from models.vit import ViT, ViTConfig

TINY_VIT = dict(image_size=32, patch_size=8, hidden=32, depth=2, heads=4, mlp_dim=64)
VISION_VARIANTS = {
    "vit": ViTConfig(**TINY_VIT),
    "hf_vit": ViTConfig(**TINY_VIT, ln_eps=1e-12, pooler_dense=True),
    "clip": ViTConfig(**TINY_VIT, ln_eps=1e-5, act="quick_gelu", patch_bias=False, pre_norm=True,
                      final_norm="pooled"),
    "siglip": ViTConfig(**TINY_VIT, act="gelu_tanh", cls_token=False, pool="map"),
    "siglip_nohead": ViTConfig(**TINY_VIT, cls_token=False, pool="mean"),
}
TINY_TEXT = dict(vocab_size=64, hidden=32, depth=2, heads=4, mlp_dim=64, max_len=24)
TEXT_VARIANTS = {
    "bert": TextEncoderConfig(**TINY_TEXT),
    "xlmr": TextEncoderConfig(**TINY_TEXT, pad_id=1, position_offset=2, type_vocab=1),
    "no_pooler": TextEncoderConfig(**TINY_TEXT, pooler=False, type_vocab=0),
}


def _abstract(ctor, cfg):
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: ctor(cfg, rngs=nnx.Rngs(0)))


def _make(ctor, cfg, seed=0, dtype=jnp.float32):
    """A model with random numpy params (no JAX PRNG: threefry init compiles slowly on a 2-core CPU)."""
    _, state = nnx.split(_abstract(ctor, cfg))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: rng.normal(0, 0.2, a.shape).astype(np.float32), nnx.to_pure_dict(state))
    return build_with_params(ctor, cfg, params, dtype=dtype)


def _jit(model, method="__call__"):
    """``model.method`` (a name, or ``f(model, *args)``) as one jitted function of the split state, as the
    trainer calls models."""
    graphdef, state = nnx.split(model)
    call = method if callable(method) else (lambda m, *a: getattr(m, method)(*a))
    fn = jax.jit(lambda s, *a: call(nnx.merge(graphdef, s), *a))
    return lambda *a: fn(state, *a)


def _n_params(state) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def test_vit_b16_is_timm_size():
    _, state = nnx.split(_abstract(ViT, ViTConfig()))
    assert _n_params(state) == 85_798_656


@pytest.mark.parametrize("ctor,cfg", [(ViT, ViTConfig())] + [(ViT, c) for c in VISION_VARIANTS.values()]
                         + [(TextEncoder, c) for c in TEXT_VARIANTS.values()],
                         ids=["vit_b16", *VISION_VARIANTS, *TEXT_VARIANTS])
def test_every_param_has_logical_axes(ctor, cfg):
    _, state = nnx.split(_abstract(ctor, cfg))
    axes = param_logical_axes(state)          # raises on an unnamed parameter
    leaves = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(leaves) == len(jax.tree.leaves(state))
    used = {n for names in leaves for n in names}
    assert used - {None} <= set(LOGICAL_AXES)
    assert all(any(n is not None for n in names) for names in leaves)


@pytest.mark.parametrize("name", list(VISION_VARIANTS))
def test_vit_shapes(name):
    cfg = VISION_VARIANTS[name]
    model = _make(ViT, cfg)
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    tokens, pooled = _jit(model, "encode")(x)
    assert tokens.shape == (2, cfg.num_prefix + 16, 32)
    assert pooled.shape == (2, 32)
    assert model.patch_tokens(tokens).shape == (2, 16, 32)
    assert model.patch_grid(tokens).shape == (2, 4, 4, 32)
    assert np.all(np.isfinite(np.asarray(tokens))) and np.all(np.isfinite(np.asarray(pooled)))
    with pytest.raises(ValueError, match="expects images"):
        model(jnp.zeros((1, 16, 16, 3)))


def test_init_from_rngs():
    """Real initialisation (rbg keys: threefry init compiles slowly on CPU): shapes and LayerNorm init."""
    cfg = VISION_VARIANTS["siglip"]
    with nnx.use_eager_sharding(False):
        model = ViT(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    real = nnx.to_pure_dict(nnx.state(model))
    abstract = nnx.to_pure_dict(nnx.split(_abstract(ViT, cfg))[1])
    assert jax.tree.map(lambda a: a.shape, real) == jax.tree.map(lambda a: a.shape, abstract)
    np.testing.assert_array_equal(real["encoder"]["blocks"][0]["ln1"]["scale"], np.ones(32))
    assert float(np.std(real["encoder"]["blocks"][0]["attn"]["qkv_kernel"])) > 0.01


def test_vit_variant_structure():
    assert ViTConfig().num_tokens == 197
    clip = _abstract(ViT, VISION_VARIANTS["clip"])
    assert clip.patch_embed.bias is None and clip.pre_norm is not None
    siglip = _abstract(ViT, VISION_VARIANTS["siglip"])
    assert siglip.cls_token is None and siglip.pos_embed.shape == (16, 32) and siglip.head is not None


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        ViTConfig(hidden=30, heads=4)
    with pytest.raises(ValueError, match="cls_token"):
        ViTConfig(cls_token=False, pool="cls")
    with pytest.raises(ValueError, match="activation"):
        BlockConfig(hidden=8, heads=2, mlp_dim=8, act="gelu_new")
    with pytest.raises(ValueError, match="position_offset"):
        TextEncoderConfig(pad_id=1, position_offset=5)


def test_quick_gelu():
    x = jnp.linspace(-3, 3, 7)
    np.testing.assert_allclose(quick_gelu(x), x / (1 + jnp.exp(-1.702 * x)), rtol=1e-6)


@pytest.mark.parametrize("name", ["bert", "xlmr"])
def test_text_shapes_and_padding(name):
    cfg = TEXT_VARIANTS[name]
    model = _make(TextEncoder, cfg)
    run = _jit(model, lambda m, ids, mask: (m(ids, mask), m.pooled(ids, mask), m.embed(ids, mask)))
    ids = np.array([[5, 6, 7, 8, 9, 10], [5, 6, 7, cfg.pad_id, cfg.pad_id, cfg.pad_id]], np.int32)
    mask = (ids != cfg.pad_id).astype(np.int32)
    h, pooled, e = run(ids, mask)
    assert h.shape == (2, 6, 32) and pooled.shape == (2, 32) and e.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, rtol=1e-5)
    # the real tokens of row 1 do not see its padding: same as the unpadded sequence
    h_short, _, e_short = run(ids[:, :3], mask[:, :3])
    np.testing.assert_allclose(h[1, :3], h_short[1], atol=1e-5)
    np.testing.assert_allclose(e_short[1], e[1], atol=1e-5)
    with pytest.raises(ValueError, match="position table"):
        model(np.full((1, 30), 5, np.int32))


def test_roberta_positions():
    model = _make(TextEncoder, TEXT_VARIANTS["xlmr"])
    ids = np.array([[0, 7, 8, 2, 1, 1]], np.int32)    # pad_id 1
    np.testing.assert_array_equal(model.positions(ids), [[2, 3, 4, 5, 1, 1]])
    bert = _make(TextEncoder, TEXT_VARIANTS["bert"])
    np.testing.assert_array_equal(bert.positions(ids), [[0, 1, 2, 3, 4, 5]])


def test_pooling_helpers():
    h = jnp.arange(12, dtype=jnp.float32).reshape(1, 3, 4)
    np.testing.assert_allclose(mean_pool(h, jnp.array([[1, 1, 0]])), [[2, 3, 4, 5]])
    np.testing.assert_allclose(jnp.linalg.norm(l2_normalize(jnp.array([[3.0, 4.0]]))), 1.0)


def test_jit_matches_eager_and_grads_reach_every_param():
    model = _make(ViT, VISION_VARIANTS["siglip"])
    x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
    tokens, pooled = _jit(model, "encode")(x)
    t2, p2 = model.encode(x)
    np.testing.assert_allclose(tokens, t2, atol=1e-5)
    np.testing.assert_allclose(pooled, p2, atol=1e-5)
    graphdef, state = nnx.split(model)
    grads = jax.jit(jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s).pooled(x) ** 2)))(state)
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))


def test_bf16_compute():
    cfg = VISION_VARIANTS["vit"]
    x = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
    ref = _jit(_make(ViT, cfg), "pooled")(x)
    low = _jit(_make(ViT, cfg, dtype=jnp.bfloat16), "pooled")(x)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), ref, atol=0.1)


RULES = {"batch": ("data",), "mlp": ("tensor",), "heads": ("tensor",), "vocab": ("tensor",), "embed": ()}


@pytest.mark.parametrize("ctor,cfg", [(ViT, VISION_VARIANTS["siglip"]), (ViT, VISION_VARIANTS["clip"]),
                                      (TextEncoder, TEXT_VARIANTS["xlmr"])], ids=["siglip", "clip", "xlmr"])
def test_sharded_forward_like_the_trainer(ctor, cfg):
    """Params placed by their logical names on a 2x4 mesh, activations constrained: same output."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    graphdef, abstract = nnx.split(_abstract(ctor, cfg))
    specs = tree_specs(param_logical_axes(abstract), RULES)
    model = _make(ctor, cfg)
    params = nnx.to_pure_dict(nnx.state(model))
    placed = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
    assert placed["encoder"]["blocks"][0]["attn"]["qkv_kernel"].sharding.spec[2] == "tensor"
    if ctor is ViT:
        x = np.random.default_rng(4).normal(size=(4, 32, 32, 3)).astype(np.float32)
        call = lambda m, x: m.pooled(x)                                           # noqa: E731
    else:
        x = np.array([[0, 5, 6, 7, 2, 1], [0, 9, 2, 1, 1, 1], [0, 3, 3, 3, 3, 2], [0, 4, 2, 1, 1, 1]], np.int32)
        call = lambda m, x: m.embed(x, (x != 1).astype(np.int32))                 # noqa: E731

    def fwd(p, x):
        state = nnx.state(nnx.merge(graphdef, abstract))
        nnx.replace_by_pure_dict(state, p)
        with activation_rules(mesh, RULES):
            return call(nnx.merge(graphdef, state), x)

    with jax.set_mesh(mesh):
        out = jax.jit(fwd)(placed, x)
    graphdef0, state0 = nnx.split(model)
    ref = jax.jit(lambda s, x: call(nnx.merge(graphdef0, s), x))(state0, x)
    np.testing.assert_allclose(out, ref, atol=1e-5)
