"""Query-Former: K learned query tokens that compress a long behaviour sequence by cross-attending to it
(BLIP-2's Q-Former, as OneMall uses it for user behaviour sequences of hundreds to thousands of events).

    events [b, n, embed], mask [b, n]  ->  [b, K, embed]

Each block is a pre-norm T5 block (``models/seq2seq.py:Block``, no relative positions): self-attention among
the K queries, cross-attention from the queries to the events, then the feed-forward; a final RMSNorm.
Event order reaches it only through the events' own embeddings (the caller adds recency positions). A
learned *null event* is always attendable, so padding (mask False) is never read whatever its values and an
empty history is well defined. Cost per block: ``O(K n)`` attention and ``O(n)`` K/V projections, against
``O(n^2)`` for self-attention over the events themselves.

Parameter layout::

    queries     [K, embed]   (None, "embed")
    null_event  [embed]      ("embed",)
    layers/{i}/ self_norm, self_attn, cross_norm, cross_attn, mlp_norm, mlp   (as the T5 decoder's blocks)
    final_norm/scale [embed]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.partitioning import constrain
from models.seq2seq import Block, RMSNorm, Seq2SeqConfig, _normal
from models.transformer import param

Array = jax.Array


class QueryFormer(nnx.Module):
    def __init__(self, cfg: Seq2SeqConfig, num_queries: int, depth: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.queries = param(rngs, _normal(1.0), (num_queries, cfg.d_model), (None, "embed"))
        self.null_event = param(rngs, _normal(1.0), (cfg.d_model,), ("embed",))
        self.layers = nnx.List([Block(cfg, relative=False, cross=True, dtype=dtype, rngs=rngs) for _ in range(depth)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.eps, dtype=dtype, rngs=rngs)

    def __call__(self, events: Array, mask: Array, queries: Array | None = None) -> Array:
        """events [b, n, embed], mask [b, n] (True = a real event) -> [b, K, embed]. ``queries [b, K', embed]``
        in place of the learned ones: the truncation baseline passes the last K' events themselves (the same
        blocks, attending only to those events)."""
        b = events.shape[0]
        null = jnp.broadcast_to(self.null_event[...].astype(self.dtype), (b, 1, events.shape[-1]))
        memory = jnp.concatenate([null, events.astype(self.dtype)], axis=1)
        allowed = jnp.concatenate([jnp.ones((b, 1), bool), mask.astype(bool)], axis=1)[:, None, :]   # [b, 1, 1+n]
        x = (jnp.broadcast_to(self.queries[...].astype(self.dtype), (b, *self.queries.shape)) if queries is None
             else queries.astype(self.dtype))
        everyone = jnp.ones((1, 1, x.shape[1]), bool)
        for block in self.layers:
            k, v = block.cross_attn.key_value(memory)
            x, _ = block(x, None, everyone, {"k": k, "v": v, "allowed": allowed})
        return constrain(self.final_norm(x), ("batch", "seq", "embed"))
