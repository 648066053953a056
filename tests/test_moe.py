"""Sparse MoE (models/moe.py): routing and capacity by hand, the auxiliary losses against their formulas, the
layer against a per-token loop, dropless == unbounded capacity, and expert parallelism == one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.moe import (MoE, MoEConfig, capacity_dispatch, capture_aux, router_z_loss, switch_balance_loss,
                        top_k_route)

# Three tokens, three experts, top-2 (best first): t0 -> e0, e1; t1 -> e0, e2; t2 -> e1, e2.
LOGITS = jnp.log(jnp.array([[[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.1, 0.7, 0.2]]]))


def test_top_k_routing_and_capacity_by_hand():
    route = top_k_route(LOGITS, 2)
    np.testing.assert_array_equal(route.experts[0], [[0, 1], [0, 2], [1, 2]])
    np.testing.assert_allclose(route.gates[0], [[2 / 3, 1 / 3], [5 / 9, 4 / 9], [7 / 9, 2 / 9]], rtol=1e-6)
    # Capacity 1, slots filled choice-major: first choices t0 -> e0 (kept), t1 -> e0 (full: dropped),
    # t2 -> e1 (kept); then second choices t0 -> e1 (full: dropped), t1 -> e2 (kept), t2 -> e2 (full: dropped).
    dispatch, combine, kept = capacity_dispatch(route, capacity=1)
    np.testing.assert_array_equal(kept[0], [[True, False], [False, True], [True, False]])
    expected = np.zeros((3, 3, 1), bool)
    expected[0, 0, 0] = expected[2, 1, 0] = expected[1, 2, 0] = True
    np.testing.assert_array_equal(dispatch[0], expected)
    np.testing.assert_allclose(combine[0, :, :, 0], [[2 / 3, 0, 0], [0, 0, 4 / 9], [0, 7 / 9, 0]], rtol=1e-6)
    # Capacity 2 keeps all six; slot 1 of e1 is t0's second choice (first choices go first)
    dispatch, _, kept = capacity_dispatch(route, capacity=2)
    assert bool(kept.all()) and bool(dispatch[0, 0, 1, 1]) and bool(dispatch[0, 2, 1, 0])
    # A padding token takes no slot: with t1 masked, t2's second choice gets e2's only slot
    _, _, kept = capacity_dispatch(route, capacity=1, mask=jnp.array([[True, False, True]]))
    np.testing.assert_array_equal(kept[0], [[True, False], [False, False], [True, True]])


def test_switch_balance_loss_and_router_z_loss_against_their_formulas():
    route = top_k_route(LOGITS, 2)
    probs = np.exp(np.asarray(LOGITS[0]))
    f = np.array([2, 2, 2]) / 6                   # assignments per expert / (tokens x k)
    p = probs.mean(0)
    np.testing.assert_allclose(switch_balance_loss(route.probs, route.experts), 3 * np.sum(f * p), rtol=1e-6)
    # top-1: t0 -> e0, t1 -> e0, t2 -> e1
    top1 = top_k_route(LOGITS, 1)
    np.testing.assert_allclose(switch_balance_loss(top1.probs, top1.experts),
                               3 * np.sum(np.array([2, 1, 0]) / 3 * p), rtol=1e-6)
    uniform = jnp.zeros((2, 5, 4))
    u = top_k_route(uniform, 1)
    np.testing.assert_allclose(switch_balance_loss(u.probs, u.experts), 1.0, rtol=1e-6)
    logits = jnp.array([[[0.0, 0.0], [1.0, 2.0]]])
    z = np.array([np.log(2.0), np.log(np.e + np.e ** 2)]) ** 2
    np.testing.assert_allclose(router_z_loss(logits), z.mean(), rtol=1e-6)
    np.testing.assert_allclose(router_z_loss(logits, jnp.array([[True, False]])), z[0], rtol=1e-6)


def _layer(capacity_factor=1.25, experts=4, top_k=2, d=8, seed=0, **kw):
    with nnx.use_eager_sharding(False):
        return MoE(d, MoEConfig(num_experts=experts, top_k=top_k, d_ff=16, capacity_factor=capacity_factor, **kw),
                   rngs=nnx.Rngs(seed))


def _per_token(layer: MoE, x, kept=None):
    """The layer by a loop: each token's output is the gate-weighted sum of its kept experts' MLPs."""
    wi_0, wi_1, wo = (np.asarray(layer.wi_0[...]), np.asarray(layer.wi_1[...]), np.asarray(layer.wo[...]))
    route = top_k_route(jnp.einsum("gsd,de->gse", x, layer.router[...]), layer.cfg.top_k)
    out = np.zeros(x.shape, np.float32)
    for g, s in np.ndindex(*x.shape[:2]):
        for j in range(layer.cfg.top_k):
            if kept is not None and not kept[g, s, j]:
                continue
            e = int(route.experts[g, s, j])
            h = jax.nn.gelu(x[g, s] @ wi_0[e], approximate=True) * (x[g, s] @ wi_1[e])
            out[g, s] += float(route.gates[g, s, j]) * np.asarray(h @ wo[e])
    return out, route


def test_the_layer_equals_a_per_token_loop_with_drops_counted_and_dropless_equals_unbounded_capacity():
    x = jax.random.normal(jax.random.key(1), (3, 10, 8))
    tight = _layer(capacity_factor=0.5)
    y, aux = capture_aux(lambda m, x: m(x), tight, x)
    route = top_k_route(jnp.einsum("gsd,de->gse", x, tight.router[...]), 2)
    _, _, kept = capacity_dispatch(route, tight.cfg.capacity(10))
    want, _ = _per_token(tight, x, np.asarray(kept))
    np.testing.assert_allclose(y, want, atol=1e-5)
    assert 0 < float(aux["dropped_fraction"]) == pytest.approx(1 - float(kept.mean()))
    np.testing.assert_allclose(float(aux["expert_load"].sum()), 1.0, rtol=1e-6)

    wide, dropless = _layer(capacity_factor=100.0), _layer(capacity_factor=0.0)
    want, _ = _per_token(wide, x)
    np.testing.assert_allclose(wide(x), want, atol=1e-5)
    y, aux = capture_aux(lambda m, x: m(x), dropless, x)
    np.testing.assert_allclose(y, want, atol=1e-5)
    assert float(aux["dropped_fraction"]) == 0.0
    mask = jnp.arange(10)[None] < jnp.array([[10], [4], [7]])  # padding changes nothing of the real tokens
    np.testing.assert_allclose(np.where(mask[..., None], dropless(x, mask), 0), np.where(mask[..., None], want, 0),
                               atol=1e-5)


def test_a_decoding_step_routes_each_row_alone_and_never_drops():
    layer = _layer(capacity_factor=1.0, group_size=8)
    x = jax.random.normal(jax.random.key(2), (16, 1, 8))
    y, aux = capture_aux(lambda m, x: m(x), layer, x)
    assert float(aux["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(layer(x[3:4]), y[3:4], atol=1e-6)     # the other rows change nothing


@pytest.mark.parametrize("mesh_sizes", [{"data": 2, "expert": 4}, {"data": 1, "expert": 8}])
def test_expert_parallel_moe_equals_one_device_and_moves_tokens_by_all_to_all(mesh_sizes):
    from jax.sharding import NamedSharding

    from models.partitioning import activation_rules, param_logical_axes, tree_specs
    from trainers.mesh import BATCH_AXES, DEFAULT_RULES, make_mesh, parse_rules

    layer = _layer(capacity_factor=1.0, experts=8, d=16)
    graphdef, state = nnx.split(layer)
    state = nnx.to_pure_dict(state)
    x = jax.random.normal(jax.random.key(3), (8, 6, 16))

    def forward(state, x):
        return capture_aux(lambda m, x: m(x), nnx.merge(graphdef, state), x)

    mesh = make_mesh({"fsdp": 1, "tensor": 1, **mesh_sizes})
    rules = parse_rules(DEFAULT_RULES)
    specs = tree_specs(param_logical_axes(nnx.state(layer)), rules)
    sharded = jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    assert sharded["wi_0"].sharding.spec[0] == "expert"

    def on_mesh(state, x):
        with activation_rules(mesh, rules):
            return forward(state, x)

    fn = jax.jit(on_mesh)
    xs = jax.device_put(x, NamedSharding(mesh, jax.P(BATCH_AXES)))
    (y, aux), (want, want_aux) = fn(sharded, xs), jax.jit(forward)(state, x)
    np.testing.assert_allclose(y, want, atol=1e-5)
    for k in want_aux:
        np.testing.assert_allclose(aux[k], want_aux[k], rtol=1e-5, atol=1e-6)
    assert "all-to-all" in fn.lower(sharded, xs).compile().as_text()
