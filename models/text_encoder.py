"""BERT-family text encoder: BERT, MiniLM (all-MiniLM-L6-v2), RoBERTa / XLM-RoBERTa, by config flags.

Embeddings ``LN(word[ids] + position[pos] + token_type[types])`` then post-LN encoder blocks
(``x = LN(x + attn(x)); x = LN(x + mlp(x))``), exact GELU, LayerNorm eps 1e-12, and BERT's optional
pooler ``tanh(dense(h[:, 0]))``.

Positions: BERT counts 0..s-1. RoBERTa / XLM-R (``position_offset = pad_id + 1``) number only the
non-pad tokens, starting at ``position_offset``, and give pad tokens position ``pad_id`` (HF
``create_position_ids_from_input_ids``); so their position table has ``max_len + pad_id + 1`` rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.partitioning import constrain
from models.transformer import EMBED_INIT, BlockConfig, Encoder, dense, layer_norm

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 30522
    hidden: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    max_len: int = 512          # rows of the position table (HF max_position_embeddings)
    type_vocab: int = 2         # token-type (segment) embeddings; 0 = none
    ln_eps: float = 1e-12
    act: str = "gelu"
    pad_id: int = 0
    position_offset: int = 0    # 0: positions 0..s-1 (BERT); pad_id + 1: RoBERTa / XLM-R positions
    pooler: bool = True         # BERT pooler tanh(dense(CLS)); used by ``pooled``
    qkv_bias: bool = True

    def __post_init__(self):
        if self.position_offset and self.position_offset != self.pad_id + 1:
            raise ValueError(f"position_offset must be 0 or pad_id + 1 = {self.pad_id + 1} (RoBERTa style), "
                             f"got {self.position_offset}")
        self.block  # validates heads / activation

    @property
    def block(self) -> BlockConfig:
        return BlockConfig(hidden=self.hidden, heads=self.heads, mlp_dim=self.mlp_dim, ln_eps=self.ln_eps,
                           act=self.act, pre_norm=False, qkv_bias=self.qkv_bias)


def mean_pool(hidden: Array, mask: Array) -> Array:
    """Masked mean over the sequence: hidden [b, s, e], mask [b, s] -> [b, e] (sentence-transformers)."""
    m = mask.astype(hidden.dtype)[..., None]
    return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x [..., e] -> x / max(||x||, eps) (torch.nn.functional.normalize)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class TextEncoder(nnx.Module):
    """BERT-family encoder. ``__call__``: ids [b, s] int32, mask [b, s] -> hidden [b, s, hidden]."""

    def __init__(self, config: TextEncoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        cfg = self.config = config
        self.dtype = dtype
        self.tok_embed = nnx.Embed(cfg.vocab_size, cfg.hidden, dtype=dtype, rngs=rngs,
                                   embedding_init=nnx.with_partitioning(EMBED_INIT, ("vocab", "embed")))
        self.pos_embed = nnx.Embed(cfg.max_len, cfg.hidden, dtype=dtype, rngs=rngs,
                                   embedding_init=nnx.with_partitioning(EMBED_INIT, (None, "embed")))
        self.type_embed = (nnx.Embed(cfg.type_vocab, cfg.hidden, dtype=dtype, rngs=rngs,
                                     embedding_init=nnx.with_partitioning(EMBED_INIT, (None, "embed")))
                           if cfg.type_vocab else None)
        self.embed_norm = layer_norm(cfg.hidden, cfg.ln_eps, dtype=dtype, rngs=rngs)
        self.encoder = Encoder(cfg.block, cfg.depth, dtype=dtype, rngs=rngs)
        self.pooler = dense(cfg.hidden, cfg.hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs) if cfg.pooler else None

    def positions(self, ids: Array) -> Array:
        """ids [b, s] -> position ids [b, s] (BERT: 0..s-1; RoBERTa/XLM-R: see the module docstring)."""
        cfg = self.config
        if not cfg.position_offset:
            return jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        real = (ids != cfg.pad_id).astype(jnp.int32)
        return jnp.cumsum(real, axis=1) * real + cfg.pad_id

    def __call__(self, ids: Array, mask: Array | None = None, token_type_ids: Array | None = None) -> Array:
        """ids [b, s] int32, mask [b, s] (1 = real token; None = all), token_type_ids [b, s] or None
        -> hidden [b, s, hidden] (HF ``last_hidden_state``)."""
        cfg = self.config
        if ids.shape[1] + cfg.position_offset > cfg.max_len:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds the position table ({cfg.max_len} rows, "
                             f"offset {cfg.position_offset})")
        x = self.tok_embed(ids) + self.pos_embed(self.positions(ids))
        if self.type_embed is not None:
            types = jnp.zeros_like(ids) if token_type_ids is None else token_type_ids
            x = x + self.type_embed(types)
        x = self.embed_norm(constrain(x, ("batch", "seq", "embed")))
        return self.encoder(x, mask)

    def pooled(self, ids: Array, mask: Array | None = None, token_type_ids: Array | None = None) -> Array:
        """-> [b, hidden]: BERT pooler ``tanh(dense(h[:, 0]))`` (HF ``pooler_output``), or h[:, 0] without one."""
        cls = self(ids, mask, token_type_ids)[:, 0]
        return jnp.tanh(self.pooler(cls)) if self.pooler is not None else cls

    def mean_pooled(self, ids: Array, mask: Array, token_type_ids: Array | None = None) -> Array:
        """ids, mask [b, s] -> masked mean of the hidden states [b, hidden]."""
        return mean_pool(self(ids, mask, token_type_ids), mask)

    def embed(self, ids: Array, mask: Array, token_type_ids: Array | None = None, normalize: bool = True) -> Array:
        """Sentence embedding as in sentence-transformers (mean pooling, then L2): ids, mask [b, s] -> [b, hidden]."""
        e = self.mean_pooled(ids, mask, token_type_ids)
        return l2_normalize(e) if normalize else e
