"""RQ-VAE semantic-ID tokenizer (Lee et al. 2022; as TIGER uses it, Rajput et al. 2023, Sec. 3.1): an MLP
encoder ``768 -> 512 -> 256 -> 128 -> 32`` (ReLU), ``L`` residual codebooks of ``K`` codes in the latent
space, a mirrored decoder, and the straight-through estimator (or the rotation trick) between quantiser and
decoder; ``revive_codes`` re-seeds the codes a window of batches left unused.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.semantic_ids import nearest

_KERNEL = nnx.initializers.lecun_normal()


def _mlp(dims: Sequence[int], rngs: nnx.Rngs) -> nnx.List:
    return nnx.List([nnx.Linear(a, b, rngs=rngs, kernel_init=nnx.with_partitioning(_KERNEL, (None, "mlp")),
                                bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)))
                     for a, b in zip(dims[:-1], dims[1:])])


def _run(layers: nnx.List, x: jax.Array) -> jax.Array:
    for i, layer in enumerate(layers):
        x = layer(x)
        if i < len(layers) - 1:
            x = jax.nn.relu(x)
    return x


def straight_through(z: jax.Array, z_q: jax.Array) -> jax.Array:
    """The straight-through estimator (van den Oord et al. 2017, VQ-VAE, Sec. 3.2): the forward pass sees
    ``z_q``, the backward pass copies the decoder's gradient to ``z`` unchanged."""
    return z + jax.lax.stop_gradient(z_q - z)


def rotation_trick(z: jax.Array, z_q: jax.Array, eps: float = 1e-8) -> jax.Array:
    """The rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation Trick",
    Sec. 4.2): forward ``z_q``; backward through ``sg[lambda R] z``, ``R`` the rotation taking ``z``'s
    direction to ``z_q``'s (``R = I - 2 r r^T + 2 q e^T``, ``e = z/|z|, q = z_q/|z_q|, r = (e+q)/|e+q|``) and
    ``lambda = |z_q| / |z|``, so the gradient keeps the angle between ``z`` and its codeword. ``[b, d]``."""
    sg = jax.lax.stop_gradient
    norm = lambda v: jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True) + eps)  # noqa: E731
    e, q = sg(z / norm(z)), sg(z_q / norm(z_q))
    r = sg((e + q) / norm(e + q))
    rotated = z - 2.0 * r * jnp.sum(r * z, -1, keepdims=True) + 2.0 * q * jnp.sum(e * z, -1, keepdims=True)
    return sg(norm(z_q) / norm(z)) * rotated


class RQVAE(nnx.Module):
    def __init__(self, dims: Sequence[int], levels: int, codes: int, rngs: nnx.Rngs, rotation: bool = False):
        self.rotation = rotation
        self.encoder = _mlp(list(dims), rngs)
        self.decoder = _mlp(list(dims)[::-1], rngs)
        init = nnx.initializers.normal(1.0 / dims[-1] ** 0.5)
        self.codebooks = nnx.Param(init(rngs.params(), (levels, codes, dims[-1])),
                                   out_sharding=("levels", "codes", None))

    def encode(self, x: jax.Array) -> jax.Array:
        """``x [b, D] -> z [b, d]``."""
        return _run(self.encoder, x)

    def quantise(self, z: jax.Array) -> dict[str, jax.Array]:
        """Residual quantisation of ``z [b, d]``: ``codes [b, L]``, each level's input residual and chosen
        codeword ``residuals, codewords [L, b, d]``, and their sum ``z_q [b, d]``."""
        codebooks = self.codebooks[...]
        r, codes, residuals, codewords = z, [], [], []
        for level in range(codebooks.shape[0]):
            code, _ = nearest(jax.lax.stop_gradient(r), jax.lax.stop_gradient(codebooks[level]))
            e = codebooks[level][code]
            codes.append(code)
            residuals.append(r)
            codewords.append(e)
            r = r - jax.lax.stop_gradient(e)  # a codeword learns from its own level's term only
        codewords = jnp.stack(codewords)
        return {"codes": jnp.stack(codes, axis=1), "residuals": jnp.stack(residuals), "codewords": codewords,
                "z_q": jnp.sum(codewords, axis=0)}

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        """``x [b, D]`` -> ``x_hat [b, D]``, ``z [b, d]`` and ``quantise``'s outputs."""
        z = self.encode(x)
        q = self.quantise(z)
        estimator = rotation_trick if self.rotation else straight_through
        return {**q, "z": z, "x_hat": _run(self.decoder, estimator(z, q["z_q"]))}


def revive_codes(codebooks: jax.Array, usage: jax.Array, residuals: jax.Array, rng: jax.Array) -> jax.Array:
    """Dead-code reset for a learned residual quantiser (as SoundStream does, Zeghidour et al. 2021, Sec. 3.2:
    an unused codeword is replaced by an input vector of the current batch): every code of level ``l`` whose
    ``usage`` is 0 becomes the level-``l`` residual of a random row of the batch, distinct rows per level.
    ``codebooks [L, K, d], usage [L, K], residuals [L, b, d]`` -> ``[L, K, d]``."""
    levels, k, _ = codebooks.shape
    b = residuals.shape[1]
    rows = jax.vmap(lambda key: jax.random.permutation(key, jnp.arange(max(b, k)) % b)[:k])(
        jax.random.split(rng, levels))                                                      # [L, K]
    fresh = jnp.take_along_axis(residuals, rows[:, :, None], axis=1)                        # [L, K, d]
    return jnp.where((usage <= 0)[:, :, None], fresh, codebooks)
