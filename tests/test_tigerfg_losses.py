"""TIGER-FG losses against hand-computed numpy values on tiny inputs; masks; the sharded q2i form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from trainers.mesh import BATCH_AXES, make_mesh
from trainers.losses.tigerfg import i2v_loss, q2i_loss, sdd_loss, srd_loss, v2t_loss


def _unit(rng, *shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _lse(x):
    m = np.max(x)
    return m + np.log(np.sum(np.exp(x - m)))


def _np_q2i(q, item, ids, scale, hard=None, hard_ids=None):
    """Per-row loop: positive = own item; same-product items and hard rows whose text is the query's
    product (or whose image row is its product) are dropped."""
    losses = []
    for i in range(len(q)):
        cols = [scale * q[i] @ item[j] for j in range(len(item)) if j == i or ids[j] != ids[i]]
        if hard is not None:
            cols += [scale * q[i] @ hard[j] for j in range(len(hard)) if hard_ids[j] != ids[i] and ids[j] != ids[i]]
        losses.append(_lse(np.asarray(cols)) - scale * q[i] @ item[i])
    return np.mean(losses)


def test_q2i_matches_numpy_with_duplicates_and_hard_negatives():
    rng = np.random.default_rng(0)
    q, item, hard = _unit(rng, 4, 8), _unit(rng, 4, 8), _unit(rng, 4, 8)
    ids = np.asarray([5, 7, 5, 9])
    hard_ids = np.asarray([7, 5, 9, 1])
    got = q2i_loss(jnp.asarray(q), jnp.asarray(item), 10.0, item_index=jnp.asarray(ids))
    np.testing.assert_allclose(got, _np_q2i(q, item, ids, 10.0), rtol=1e-5)
    got = q2i_loss(jnp.asarray(q), jnp.asarray(item), 10.0, item_index=jnp.asarray(ids), hard=jnp.asarray(hard),
                   hard_index=jnp.asarray(hard_ids))
    np.testing.assert_allclose(got, _np_q2i(q, item, ids, 10.0, hard, hard_ids), rtol=1e-5)


def test_q2i_sharded_equals_dense_values_and_gradients():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    rng = np.random.default_rng(1)
    b = 16
    q, item, hard = (jnp.asarray(rng.normal(size=(b, 8)).astype(np.float32)) for _ in range(3))
    ids = jnp.asarray(rng.integers(0, 10, size=b).astype(np.int32))
    hard_ids = jnp.asarray(rng.integers(0, 10, size=b).astype(np.int32))

    def loss(q, item, hard, scale, mesh):
        norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
        return q2i_loss(norm(q), norm(item), scale, item_index=ids, hard=norm(hard), hard_index=hard_ids,
                        mesh=mesh)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
    dense_v, dense_g = jax.jit(lambda *a: grad(*a, None))(q, item, hard, 7.0)
    row = NamedSharding(mesh, P(BATCH_AXES))
    args = [jax.device_put(x, row) for x in (q, item, hard)]
    sharded_v, sharded_g = jax.jit(lambda *a: grad(*a, mesh))(*args, 7.0)
    np.testing.assert_allclose(sharded_v, dense_v, rtol=1e-5)
    for s, d in zip(sharded_g, dense_g):
        np.testing.assert_allclose(s, d, rtol=1e-4, atol=1e-6)
    assert all(np.isfinite(g).all() for g in sharded_g)


def _np_masked_nce(a, k, scale, valid, extra=None):
    rows = []
    for i in np.nonzero(valid)[0]:
        cols = [scale * a[i] @ k[j] for j in np.nonzero(valid)[0]]
        if extra is not None:
            cols.append(scale * a[i] @ extra[i])
        rows.append(_lse(np.asarray(cols)) - scale * a[i] @ k[i])
    return np.mean(rows)


def test_v2t_and_i2v_match_numpy_and_honour_masks():
    rng = np.random.default_rng(2)
    region, text, item, hard = (_unit(rng, 4, 6) for _ in range(4))
    valid = np.asarray([True, False, True, True])
    want = 0.5 * (_np_masked_nce(region, text, 5.0, valid) + _np_masked_nce(text, region, 5.0, valid))
    np.testing.assert_allclose(v2t_loss(region, text, 5.0, valid), want, rtol=1e-5)
    np.testing.assert_allclose(i2v_loss(item, region, 5.0, valid, hard=hard),
                               _np_masked_nce(region, item, 5.0, valid, hard), rtol=1e-5)
    # The invalid row (no box) neither anchors nor serves as a negative.
    region2 = region.copy()
    region2[1] = _unit(rng, 6)
    np.testing.assert_allclose(v2t_loss(region2, text, 5.0, valid), v2t_loss(region, text, 5.0, valid), rtol=1e-6)
    np.testing.assert_allclose(i2v_loss(item, region2, 5.0, valid, hard=hard),
                               i2v_loss(item, region, 5.0, valid, hard=hard), rtol=1e-6)


def test_srd_matches_numpy_and_uses_only_box_pairs():
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(2, 4, 5)).astype(np.float32), rng.normal(size=(2, 4, 3)).astype(np.float32)
    box = np.asarray([[1, 1, 0, 1], [1, 0, 0, 0]], np.float32)
    valid = np.asarray([True, True])

    def cos(x):
        x = x / np.linalg.norm(x, axis=-1, keepdims=True)
        return x @ x.T

    num = den = 0.0
    for b in range(2):
        idx = np.nonzero(box[b])[0]
        d = (cos(s[b]) - cos(t[b]))[np.ix_(idx, idx)]
        num, den = num + np.sum(d ** 2), den + d.size
    np.testing.assert_allclose(srd_loss(s, t, box, valid), num / den, rtol=1e-5)
    s2 = s.copy()
    s2[:, 2] = rng.normal(size=(2, 5))  # patch 2 is outside both boxes
    np.testing.assert_allclose(srd_loss(s2, t, box, valid), srd_loss(s, t, box, valid), rtol=1e-6)
    # An example without a box contributes nothing.
    only0 = srd_loss(s, t, box, np.asarray([True, False]))
    idx = np.nonzero(box[0])[0]
    np.testing.assert_allclose(only0, np.mean(((cos(s[0]) - cos(t[0]))[np.ix_(idx, idx)]) ** 2), rtol=1e-5)


def test_sdd_matches_numpy_kl():
    rng = np.random.default_rng(4)
    s, t = rng.uniform(-1, 1, size=(3, 3)), rng.uniform(-1, 1, size=(3, 3))

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    ps, pt = softmax(s / 0.1), softmax(t / 0.05)
    want = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=-1))
    got = sdd_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), student_temp=0.1, teacher_temp=0.05)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert float(sdd_loss(jnp.asarray(t), jnp.asarray(t), student_temp=0.05, teacher_temp=0.05)) == pytest.approx(0, abs=1e-6)
    valid = np.asarray([True, False, True])
    np.testing.assert_allclose(
        sdd_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), student_temp=0.1, teacher_temp=0.05,
                 valid=valid),
        np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=-1)[valid]), rtol=1e-4)


def test_gradients_are_finite():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(4, 6)).astype(np.float32))
    ids = jnp.arange(4)
    valid = jnp.asarray([True, True, False, True])
    patches = jnp.asarray(rng.normal(size=(4, 9, 6)).astype(np.float32))
    box = jnp.asarray(rng.integers(0, 2, size=(4, 9)).astype(np.float32))

    def total(x, patches):
        n = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        return (q2i_loss(n, n[::-1], 10.0, item_index=ids, hard=n[::2].repeat(2, 0), hard_index=ids[::-1])
                + v2t_loss(n, n[::-1], 10.0, valid) + i2v_loss(n, n[::-1], 10.0, valid, hard=n)
                + srd_loss(patches, patches[::-1], box, valid)
                + sdd_loss(n @ n.T, n[::-1] @ n.T, student_temp=0.1, teacher_temp=0.05))

    grads = jax.grad(total, argnums=(0, 1))(x, patches)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    assert float(jnp.abs(grads[0]).sum()) > 0
