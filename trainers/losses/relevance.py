"""Relevance losses: query–item match classification (cross- and bi-encoders)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def binary_relevance_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Binary cross-entropy on a relevance logit (Nogueira & Cho 2019, monoBERT, Eq. 1:
    ``-sum_pos log s - sum_neg log(1 - s)``, here averaged).

    ``logits [b]``, ``labels [b]`` in {0, 1} -> ``(mean loss, accuracy at logit 0 i.e. probability 0.5)``.
    """
    labels = labels.astype(jnp.float32)
    loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
    accuracy = jnp.mean(((logits > 0).astype(jnp.float32) == labels).astype(jnp.float32))
    return loss, accuracy
