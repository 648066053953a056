"""Text models of the KuaiSearch recall and relevance stages, built on ``models/text_encoder.py``.

* ``DualEncoder``: DPR (Karpukhin et al. 2020). One BERT-family encoder shared by queries and items
  (SDE) or one encoder per side (ADE, ``shared=False``); an embedding is the CLS hidden state
  (``pooling="cls"``, DPR's ``last_hidden_state[:, 0]``), the masked mean (``"mean"``) or BERT's
  pooler (``"pooler"``).
* ``BiEncoderScorer``: a shared ``DualEncoder`` whose cosine similarity is turned into a relevance
  logit, ``scale * cos(q, d) + bias`` with both scalars learned.
* ``CrossEncoder``: ``[CLS] query [SEP] item [SEP]`` through one encoder (segment ids 0 / 1), the
  pooled CLS through a linear head -> one logit (BERT for sequence classification, 1 output).

Shapes: ids and masks are ``[batch, seq]``; embeddings ``[batch, hidden]``; logits ``[batch]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.text_encoder import TextEncoder, TextEncoderConfig, l2_normalize, mean_pool
from models.transformer import dense

Array = jax.Array

POOLINGS = ("cls", "mean", "pooler")


def pool(encoder: TextEncoder, ids: Array, mask: Array, pooling: str,
         token_type_ids: Array | None = None) -> Array:
    """ids, mask [b, s] -> [b, hidden] by ``pooling`` (see the module docstring)."""
    if pooling == "mean":
        return mean_pool(encoder(ids, mask, token_type_ids), mask)
    h = encoder(ids, mask, token_type_ids)[:, 0]
    if pooling == "cls":
        return h
    if pooling == "pooler":
        if encoder.pooler is None:
            raise ValueError("pooling='pooler' needs an encoder built with pooler=True")
        return jnp.tanh(encoder.pooler(h))
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")


@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
    encoder: TextEncoderConfig
    shared: bool = True       # True: SDE (one encoder); False: ADE (query and item encoders)
    pooling: str = "cls"

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; expected one of {POOLINGS}")


class DualEncoder(nnx.Module):
    """DPR query/item towers: ``encode_query`` and ``encode_item``, ids/mask [b, s] -> [b, hidden]."""

    def __init__(self, config: DualEncoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.query_encoder = TextEncoder(config.encoder, rngs=rngs, dtype=dtype)
        self.item_encoder = None if config.shared else TextEncoder(config.encoder, rngs=rngs, dtype=dtype)

    def encode_query(self, ids: Array, mask: Array) -> Array:
        return pool(self.query_encoder, ids, mask, self.config.pooling)

    def encode_item(self, ids: Array, mask: Array) -> Array:
        enc = self.query_encoder if self.item_encoder is None else self.item_encoder
        return pool(enc, ids, mask, self.config.pooling)


class BiEncoderScorer(nnx.Module):
    """Relevance from two embeddings: ``scale * cos(query, item) + bias`` -> logits [b]."""

    def __init__(self, config: DualEncoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 init_scale: float = 10.0, init_bias: float = -5.0):
        self.towers = DualEncoder(config, rngs=rngs, dtype=dtype)
        self.scale = nnx.Param(jnp.asarray(init_scale, jnp.float32))
        self.bias = nnx.Param(jnp.asarray(init_bias, jnp.float32))

    def embed_query(self, ids: Array, mask: Array) -> Array:
        return l2_normalize(self.towers.encode_query(ids, mask).astype(jnp.float32))

    def embed_item(self, ids: Array, mask: Array) -> Array:
        return l2_normalize(self.towers.encode_item(ids, mask).astype(jnp.float32))

    def __call__(self, query_ids: Array, query_mask: Array, item_ids: Array, item_mask: Array) -> Array:
        """[b, sq], [b, sq], [b, si], [b, si] -> logits [b] (float32)."""
        cos = jnp.sum(self.embed_query(query_ids, query_mask) * self.embed_item(item_ids, item_mask), axis=-1)
        return self.scale[...].astype(jnp.float32) * cos + self.bias[...].astype(jnp.float32)


class CrossEncoder(nnx.Module):
    """Query and item in one sequence -> relevance logit [b] (float32)."""

    def __init__(self, encoder: TextEncoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, pooling: str = "pooler"):
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        self.pooling = pooling
        self.encoder = TextEncoder(encoder, rngs=rngs, dtype=dtype)
        self.head = dense(encoder.hidden, 1, ("embed", "classes"), dtype=dtype, rngs=rngs)

    def __call__(self, ids: Array, mask: Array, token_type_ids: Array) -> Array:
        """ids, mask, token_type_ids [b, s] -> logits [b]."""
        h = pool(self.encoder, ids, mask, self.pooling, token_type_ids)
        return self.head(h)[:, 0].astype(jnp.float32)
