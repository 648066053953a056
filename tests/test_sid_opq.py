"""OPQ (OneSearch-V2's two last SID codes): an orthogonal rotation, codes in range, and distortion as low as
faiss's OPQ + PQ on the same correlated data (and lower than PQ without the rotation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.semantic_ids import OPQ, opq_decode, opq_encode, opq_fit


def _correlated(n=3000, d=16, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.linspace(2.0, 0.1, d)[None]      # anisotropic, rotated: PQ's worst case
    return (rng.normal(size=(n, d)) @ mix.T).astype(np.float32)


def _mse(x, y):
    return float(np.mean(np.sum((np.asarray(x) - np.asarray(y)) ** 2, axis=1)))


def test_opq_rotation_is_orthogonal_and_codes_reconstruct():
    x = jnp.asarray(_correlated(n=600, d=8))
    opq = opq_fit(x, jax.random.key(0), subspaces=2, codes=16, iterations=5)
    np.testing.assert_allclose(opq.rotation @ opq.rotation.T, np.eye(8), atol=1e-4)
    codes = opq_encode(x, opq)
    assert codes.shape == (600, 2) and codes.dtype == jnp.int32 and int(codes.min()) >= 0 and int(codes.max()) < 16
    assert _mse(x, opq_decode(codes, opq)) < 0.5 * float(jnp.mean(jnp.sum((x - x.mean(0)) ** 2, 1)))
    with pytest.raises(ValueError, match="sub-spaces"):
        opq_fit(x[:, :7], jax.random.key(0), subspaces=2, codes=16)


def test_opq_distortion_matches_faiss_and_beats_plain_pq():
    faiss = pytest.importorskip("faiss")
    x = _correlated()
    opq = opq_fit(jnp.asarray(x), jax.random.key(0), subspaces=2, codes=64, iterations=20)
    ours = _mse(x, opq_decode(opq_encode(jnp.asarray(x), opq), opq))
    plain = OPQ(jnp.eye(16), opq_fit(jnp.asarray(x), jax.random.key(0), subspaces=2, codes=64, iterations=0).centroids)
    unrotated = _mse(x, opq_decode(opq_encode(jnp.asarray(x), plain), plain))
    index = faiss.index_factory(16, "OPQ2,PQ2x6")
    index.train(x)
    index.add(x)
    theirs = _mse(x, index.reconstruct_n(0, len(x)))
    assert ours <= 1.05 * theirs, (ours, theirs)
    assert ours < 0.9 * unrotated, (ours, unrotated)
