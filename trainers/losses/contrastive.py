"""Contrastive losses of the retrieval tasks: InfoNCE, CLIP's symmetric InfoNCE, DPR's loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def info_nce(queries: jax.Array, keys: jax.Array, scale: jax.Array | float) -> jax.Array:
    """One-directional InfoNCE with in-batch negatives (van den Oord et al. 2018, Eq. 4).

    ``queries [b, d], keys [b, d]`` (row i of each is a positive pair; every other key in the batch is a
    negative), ``scale`` the inverse temperature -> scalar mean of ``-log softmax(scale * q k^T)_ii``.
    """
    logits = scale * jnp.einsum("qd,kd->qk", queries, keys, preferred_element_type=jnp.float32)
    # The positives directly, not jnp.diagonal(logits): cheaper, and it keeps the backward pass free of a
    # diagonal scatter that the SPMD partitioner gets wrong when both batch axes are sharded.
    positives = scale * jnp.sum(queries.astype(jnp.float32) * keys.astype(jnp.float32), axis=-1)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - positives)


def symmetric_info_nce(a: jax.Array, b: jax.Array, logit_scale: jax.Array, max_scale: float = 100.0) -> jax.Array:
    """CLIP's symmetric contrastive loss (Radford et al. 2021, Fig. 3): the mean of a->b and b->a InfoNCE.

    ``a [b, d], b [b, d]`` L2-normalised embeddings, ``logit_scale`` a scalar log inverse temperature
    (clipped at ``log(max_scale)`` as in CLIP) -> scalar.
    """
    scale = jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), jnp.log(max_scale)))
    return 0.5 * (info_nce(a, b, scale) + info_nce(b, a, scale))


def dpr_loss(queries: jax.Array, positives: jax.Array, negatives: jax.Array,
             scale: jax.Array | float) -> tuple[jax.Array, jax.Array]:
    """DPR's loss (Karpukhin et al. 2020, Eq. 2) with in-batch and extra negatives.

    ``queries, positives, negatives [b, d]``: query i's positive is ``positives[i]``; its negatives
    are every other positive and all ``b`` negatives (one random item per query). Scores are
    ``scale * q·d`` over the ``2b`` documents -> ``(mean -log softmax(score)_i, in-batch accuracy)``.
    """
    docs = jnp.concatenate([positives, negatives], axis=0)                                # [2b, d]
    logits = scale * jnp.einsum("qd,kd->qk", queries, docs, preferred_element_type=jnp.float32)  # [b, 2b]
    # The positive scores directly (not a diagonal gather): see info_nce.
    pos = scale * jnp.sum(queries.astype(jnp.float32) * positives.astype(jnp.float32), axis=-1)
    loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - pos)
    accuracy = jnp.mean((pos >= jnp.max(logits, axis=-1)).astype(jnp.float32))
    return loss, accuracy
