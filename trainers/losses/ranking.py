"""Ranking-stage losses: the CTR objective of the KuaiSearch ranking models (DNN, Wide&Deep, DCN, DCNv2, DIN)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean binary log loss from logits, the CTR objective (Wang et al. 2017, DCN, Eq. 6, without its L2
    term: weight decay is the optimizer's): ``mean(softplus(z) - y z)``. ``logits [b], labels [b] -> []``."""
    z = logits.astype(jnp.float32)
    return jnp.mean(jax.nn.softplus(z) - labels.astype(jnp.float32) * z)
