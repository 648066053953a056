"""RQ-VAE semantic-ID tokenizer (Lee et al. 2022; as TIGER uses it, Rajput et al. 2023, Sec. 3.1): an MLP
encoder ``768 -> 512 -> 256 -> 128 -> 32`` (ReLU), ``L`` residual codebooks of ``K`` codes in the latent
space, a mirrored decoder, and the straight-through estimator between quantiser and decoder.
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


class RQVAE(nnx.Module):
    def __init__(self, dims: Sequence[int], levels: int, codes: int, rngs: nnx.Rngs):
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
        return {**q, "z": z, "x_hat": _run(self.decoder, straight_through(z, q["z_q"]))}
