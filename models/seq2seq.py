"""T5-style encoder-decoder (and a decoder-only prefix-LM variant) for generative retrieval (TIGER).

T5 semantics, so Hugging Face T5 (v1.0, v1.1) and mT5 weights import exactly (``models/hf_import.py``,
family ``t5``):

* RMSNorm (T5LayerNorm): ``scale * x / sqrt(mean(x^2) + eps)``: no mean subtraction, no bias, float32
  statistics; pre-norm residual blocks, a final norm per stack. No biases anywhere.
* Relative position bias: ``bias[h, q, k] = table[bucket(pos_k - pos_q), h]``, bidirectional buckets in
  the encoder, causal buckets in the decoder. Each stack's table lives in its first layer's self-attention
  (``layers/0/self_attn/relative_bias``) and is shared by all its layers, as in HF. Cross-attention has none.
* No ``1/sqrt(head_dim)`` attention scaling (T5 folds it into the init of ``q``).
* Feed-forward ``relu`` (T5 v1.0: ``wo(relu(wi x))``) or ``gated-gelu`` (v1.1 / mT5:
  ``wo(gelu_tanh(wi_0 x) * wi_1 x)``); any HF ``[gated-]act`` string with a known activation works.
* LM head tied to the embedding (``tie_embeddings``) or its own ``lm_head``; the decoder output is scaled by
  ``d_model**-0.5`` before the head when ``scale_decoder_output`` (default: = ``tie_embeddings``, as T5 v1.0).

Parameter layout (float32; logical axis names in parentheses)::

    embedding                        [vocab, embed]        ("vocab", "embed")   shared by both stacks
    {encoder,decoder}/layers/{i}/
        self_norm/scale              [embed]               ("embed",)
        self_attn/q, k, v            [embed, heads, kv]    ("embed", "heads", "kv")
        self_attn/o                  [heads, kv, embed]    ("heads", "kv", "embed")
        self_attn/relative_bias      [buckets, heads]      ("relpos", "heads")    layer 0 only
        cross_norm, cross_attn       (decoder of the encoder-decoder only; as self_*, no relative_bias)
        mlp_norm/scale               [embed]
        mlp/wi | mlp/wi_0, mlp/wi_1  [embed, mlp]          ("embed", "mlp")
        mlp/wo                       [mlp, embed]          ("mlp", "embed")
        mlp/router, mlp/wi_0, ...    sparse MoE layers (``cfg.moe``, decoder layers ``moe_layers(cfg)``):
                                     [experts, embed, mlp] ("expert", "embed", "mlp"), see models/moe.py
    {encoder,decoder}/final_norm/scale [embed]
    lm_head                          [embed, vocab]        ("embed", "vocab")     untied only

``decoder_only=True`` drops the encoder and the cross-attention: one causal stack reads
``[query tokens ; decoder_inputs]`` as a **prefix-LM**: query tokens attend to all (valid) query tokens,
code tokens to all query tokens and causally to code tokens; its relative buckets are bidirectional.
Positions are counted over valid tokens only (query token i is at the number of valid tokens before it,
the decoder token t at ``len(query) + t``), so left/right/middle padding of the query changes nothing.
``encoder_layers`` is ignored there.

Decoding API (``start`` once, then ``step`` per token; every leaf of ``context`` and ``cache`` has the
batch as its leading axis, so a beam search repeats them along axis 0 and reorders ``cache`` by gathering
axis 0)::

    context, cache = model.start(tokens [b, s], mask [b, s], max_len)
    logits [b, vocab], cache = model.step(context, cache, token [b], position)   # position: scalar or [b]

Encoder-decoder: ``context = {"mask": [b, s], "cross": [{"k", "v": [b, s, heads, kv]} per layer]}``
(encoder output projected once), ``cache = {"self": [{"k", "v": [b, max_len, heads, kv]} per layer]}``.
Decoder-only: ``context = {"mask", "pos": [b, s], "length": [b]}``, ``cache = {"self": [{"k", "v":
[b, s + max_len, heads, kv]}]}`` with the query prefilled into its first ``s`` rows.

``dtype`` is the compute dtype; softmax, norm statistics and the logits are float32. Layers are a Python
loop (no scan), as in ``models/transformer.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.moe import MoE, MoEConfig
from models.partitioning import constrain
from models.transformer import activation, param

Array = jax.Array

# HF ACT2FN names -> models.transformer activation names
_FF_ACT = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
           "gelu_fast": "gelu_tanh", "silu": "silu", "swish": "silu"}


def feed_forward_act(feed_forward: str) -> tuple[bool, str]:
    """HF ``feed_forward_proj`` -> (gated, activation name). ``gated-gelu`` is gelu_new (tanh), as in HF."""
    parts = feed_forward.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or parts[-1] not in _FF_ACT:
        raise ValueError(f"feed_forward {feed_forward!r}: expected 'ACT' or 'gated-ACT' with ACT in {sorted(_FF_ACT)}")
    gated = len(parts) == 2
    act = "gelu_new" if feed_forward == "gated-gelu" else parts[-1]
    return gated, _FF_ACT[act]


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
    """Defaults are TIGER's sizes (Rajput et al. 2023, sec. 4): 4+4 layers, d_model 128, 6 heads of 64,
    d_ff 1024, ReLU."""

    vocab_size: int = 1024
    d_model: int = 128
    num_heads: int = 6
    head_dim: int = 64
    d_ff: int = 1024
    encoder_layers: int = 4
    decoder_layers: int = 4
    feed_forward: str = "relu"                # "relu" (T5 v1.0) | "gated-gelu" (T5 v1.1, mT5) | [gated-]ACT
    relative_buckets: int = 32
    relative_max_distance: int = 128
    tie_embeddings: bool = True
    eps: float = 1e-6
    decoder_only: bool = False
    decoder_start_token: int = 0
    pad_token: int = 0
    scale_decoder_output: bool | None = None  # x * d_model**-0.5 before the head; None = tie_embeddings
    moe: MoEConfig | None = None              # sparse MoE feed-forward (models/moe.py) in decoder layers
    moe_every: int = 1                        # ... every n-th one (layers n-1, 2n-1, ...); the rest dense

    def __post_init__(self):
        feed_forward_act(self.feed_forward)
        if self.moe is not None and self.moe_every < 1:
            raise ValueError(f"moe_every {self.moe_every} must be >= 1")
        if self.decoder_layers < 1 or self.encoder_layers < 0:
            raise ValueError(f"need >= 1 decoder layer and >= 0 encoder layers (0: the caller supplies the "
                             f"decoder's memory), got {self.encoder_layers}+{self.decoder_layers}")

    @property
    def scale_output(self) -> bool:
        return self.tie_embeddings if self.scale_decoder_output is None else self.scale_decoder_output


def tiger(vocab_size: int = 1024, **overrides) -> Seq2SeqConfig:
    """TIGER's model: 4+4 layers, d_model 128, 6x64 heads, d_ff 1024, ReLU (about 4.6M params at vocab 1024;
    the paper's "about 13M" is reached with T5's 32,128-token vocabulary and an untied head)."""
    return Seq2SeqConfig(vocab_size=vocab_size, **overrides)


def tiny(vocab_size: int = 64, **overrides) -> Seq2SeqConfig:
    """A test-sized model: 2+2 layers, d_model 32, 4 heads of 8, d_ff 64."""
    return Seq2SeqConfig(**{**dict(vocab_size=vocab_size, d_model=32, num_heads=4, head_dim=8, d_ff=64,
                                   encoder_layers=2, decoder_layers=2, relative_buckets=8,
                                   relative_max_distance=20), **overrides})


def param_count(cfg: Seq2SeqConfig) -> int:
    """Number of parameters of ``Seq2Seq(cfg)`` (closed form; equals the sum over the built state)."""
    d, inner = cfg.d_model, cfg.num_heads * cfg.head_dim
    gated, _ = feed_forward_act(cfg.feed_forward)
    attn = 4 * d * inner
    mlp = (3 if gated else 2) * d * cfg.d_ff
    rel = cfg.relative_buckets * cfg.num_heads
    cross = not cfg.decoder_only
    n = cfg.vocab_size * d + (0 if cfg.tie_embeddings else d * cfg.vocab_size)
    if not cfg.decoder_only and cfg.encoder_layers:
        n += cfg.encoder_layers * (attn + mlp + 2 * d) + rel + d
    n += cfg.decoder_layers * (attn * (2 if cross else 1) + mlp + (3 if cross else 2) * d) + rel + d
    if cfg.moe is not None:  # the MoE layers: E gated experts and a router in place of the dense MLP
        n += len(moe_layers(cfg)) * (cfg.moe.num_experts * (3 * d * cfg.moe.d_ff + d) - mlp)
    return n


def moe_layers(cfg: Seq2SeqConfig) -> tuple[int, ...]:
    """The decoder layers whose feed-forward is sparse."""
    if cfg.moe is None:
        return ()
    return tuple(i for i in range(cfg.decoder_layers) if i % cfg.moe_every == cfg.moe_every - 1)


# --- relative position buckets ------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _bucket_table(num_buckets: int, max_distance: int) -> np.ndarray:
    """bucket of |relative position| a = 0..max_distance (larger distances share the last one).

    The float32 arithmetic mirrors HF ``T5Attention._relative_position_bucket`` op by op, so the buckets
    agree exactly, also at the log-bucket boundaries (tested against torch)."""
    max_exact = num_buckets // 2
    a = np.arange(max_distance + 1)
    large = max_exact + (np.log(np.maximum(a, 1).astype(np.float32) / np.float32(max_exact))
                         / np.float32(math.log(max_distance / max_exact))
                         * np.float32(num_buckets - max_exact)).astype(np.int64)
    return np.where(a < max_exact, a, np.minimum(large, num_buckets - 1)).astype(np.int32)


def relative_bucket(rel: Array, *, bidirectional: bool, num_buckets: int, max_distance: int) -> Array:
    """rel = key position - query position (int, any shape) -> bucket ids in [0, num_buckets), same shape."""
    rel = jnp.asarray(rel, jnp.int32)
    if bidirectional:
        n = num_buckets // 2
        table = jnp.asarray(_bucket_table(n, max_distance))
        return jnp.where(rel > 0, n, 0) + table[jnp.minimum(jnp.abs(rel), max_distance)]
    table = jnp.asarray(_bucket_table(num_buckets, max_distance))
    return table[jnp.minimum(jnp.maximum(-rel, 0), max_distance)]


# --- modules ------------------------------------------------------------------------------------------


def _normal(std: float):
    return nnx.initializers.normal(std)


class RMSNorm(nnx.Module):
    """T5LayerNorm: ``scale * x * rsqrt(mean(x^2) + eps)``, statistics in float32."""

    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), ("embed",))

    def __call__(self, x: Array) -> Array:
        """[..., embed] -> [..., embed] (compute dtype)."""
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (self.scale[...] * y).astype(self.dtype)


def attend(q: Array, k: Array, v: Array, bias: Array | None, allowed: Array, dtype) -> Array:
    """T5 attention (no 1/sqrt(d) scaling). q [b, q, h, d], k/v [b, k, h, d], bias [1|b, h, q, k] float32
    or None, allowed [1|b, q|1, k] bool -> [b, q, h, d]."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if bias is not None:
        logits = logits + bias
    logits = jnp.where(allowed[:, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(nnx.Module):
    """Projections of one T5 attention; ``relative_bias`` [buckets, heads] when it owns the stack's table."""

    def __init__(self, cfg: Seq2SeqConfig, *, relative: bool, dtype, rngs: nnx.Rngs):
        d, h, hd = cfg.d_model, cfg.num_heads, cfg.head_dim
        self.dtype = dtype
        self.q = param(rngs, _normal((d * hd) ** -0.5), (d, h, hd), ("embed", "heads", "kv"))
        self.k = param(rngs, _normal(d ** -0.5), (d, h, hd), ("embed", "heads", "kv"))
        self.v = param(rngs, _normal(d ** -0.5), (d, h, hd), ("embed", "heads", "kv"))
        self.o = param(rngs, _normal((h * hd) ** -0.5), (h, hd, d), ("heads", "kv", "embed"))
        self.relative_bias = (param(rngs, _normal(d ** -0.5), (cfg.relative_buckets, h), ("relpos", "heads"))
                              if relative else None)

    def _proj(self, x: Array, w: nnx.Param) -> Array:
        y = jnp.einsum("bse,ehd->bshd", x.astype(self.dtype), w[...].astype(self.dtype))
        return constrain(y, ("batch", "seq", "heads", "kv"))

    def query(self, x: Array) -> Array:
        """[b, s, embed] -> [b, s, heads, kv]."""
        return self._proj(x, self.q)

    def key_value(self, x: Array) -> tuple[Array, Array]:
        """[b, s, embed] -> k, v [b, s, heads, kv]."""
        return self._proj(x, self.k), self._proj(x, self.v)

    def out(self, y: Array) -> Array:
        """[b, s, heads, kv] -> [b, s, embed]."""
        return jnp.einsum("bshd,hde->bse", y, self.o[...].astype(self.dtype))


class MLP(nnx.Module):
    """``wo(act(wi x))`` or gated ``wo(act(wi_0 x) * wi_1 x)``."""

    def __init__(self, cfg: Seq2SeqConfig, *, dtype, rngs: nnx.Rngs):
        self.gated, self.act = feed_forward_act(cfg.feed_forward)
        self.dtype = dtype
        d, f = cfg.d_model, cfg.d_ff
        if self.gated:
            self.wi_0 = param(rngs, _normal(d ** -0.5), (d, f), ("embed", "mlp"))
            self.wi_1 = param(rngs, _normal(d ** -0.5), (d, f), ("embed", "mlp"))
        else:
            self.wi = param(rngs, _normal(d ** -0.5), (d, f), ("embed", "mlp"))
        self.wo = param(rngs, _normal(f ** -0.5), (f, d), ("mlp", "embed"))

    def __call__(self, x: Array) -> Array:
        """[b, s, embed] -> [b, s, embed]."""
        dt = self.dtype
        x = x.astype(dt)
        act = activation(self.act)
        if self.gated:
            h = act(x @ self.wi_0[...].astype(dt)) * (x @ self.wi_1[...].astype(dt))
        else:
            h = act(x @ self.wi[...].astype(dt))
        h = constrain(h, ("batch", "seq", "mlp"))
        return h @ self.wo[...].astype(dt)


class Block(nnx.Module):
    """Pre-norm T5 block: self-attention, optional cross-attention, feed-forward, each ``x + f(norm(x))``."""

    def __init__(self, cfg: Seq2SeqConfig, *, relative: bool, cross: bool, dtype, rngs: nnx.Rngs,
                 sparse: bool = False):
        self.dtype = dtype
        self.self_norm = RMSNorm(cfg.d_model, cfg.eps, dtype=dtype, rngs=rngs)
        self.self_attn = Attention(cfg, relative=relative, dtype=dtype, rngs=rngs)
        if cross:
            self.cross_norm = RMSNorm(cfg.d_model, cfg.eps, dtype=dtype, rngs=rngs)
            self.cross_attn = Attention(cfg, relative=False, dtype=dtype, rngs=rngs)
        else:
            self.cross_norm = self.cross_attn = None
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.eps, dtype=dtype, rngs=rngs)
        self.mlp = MoE(cfg.d_model, cfg.moe, dtype=dtype, rngs=rngs) if sparse else MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, bias: Array, allowed: Array, cross: dict | None = None,
                 write=None) -> tuple[Array, tuple[Array, Array]]:
        """x [b, q, embed]; bias [1|b, h, q, k]; allowed [1|b, q|1, k]; cross {"k", "v": [b, s, h, d],
        "allowed": [b, 1, s]} or None; write: None (attend to x itself) or ``(k_new, v_new) -> (k, v)``
        (a KV-cache update). -> (x [b, q, embed], the (k, v) attended to)."""
        h = self.self_norm(x)
        q = self.self_attn.query(h)
        k, v = self.self_attn.key_value(h)
        if write is not None:
            k, v = write(k, v)
        x = x + self.self_attn.out(attend(q, k, v, bias, allowed, self.dtype))
        if self.cross_attn is not None:
            h = self.cross_norm(x)
            y = attend(self.cross_attn.query(h), cross["k"], cross["v"], None, cross["allowed"], self.dtype)
            x = x + self.cross_attn.out(y)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "seq", "embed")), (k, v)


class Stack(nnx.Module):
    """``depth`` blocks and a final RMSNorm; the first block's self-attention owns the relative table."""

    def __init__(self, cfg: Seq2SeqConfig, depth: int, *, bidirectional: bool, cross: bool, dtype,
                 rngs: nnx.Rngs, sparse: tuple[int, ...] = ()):
        self.bidirectional = bidirectional
        self.buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.layers = nnx.List([Block(cfg, relative=i == 0, cross=cross, dtype=dtype, rngs=rngs, sparse=i in sparse)
                                for i in range(depth)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.eps, dtype=dtype, rngs=rngs)

    def position_bias(self, q_pos: Array, k_pos: Array) -> Array:
        """q_pos [1|b, q], k_pos [1|b, k] int -> bias [1|b, heads, q, k] float32."""
        buckets = relative_bucket(k_pos[:, None, :] - q_pos[:, :, None], bidirectional=self.bidirectional,
                                  num_buckets=self.buckets, max_distance=self.max_distance)
        table = self.layers[0].self_attn.relative_bias[...].astype(jnp.float32)
        return jnp.transpose(table[buckets], (0, 3, 1, 2))

    def __call__(self, x: Array, bias: Array, allowed: Array, cross: list | None = None,
                 writes: list | None = None) -> tuple[Array, list]:
        """x [b, q, embed] -> (final-normed [b, q, embed], per-layer (k, v)). ``cross`` / ``writes``:
        one entry per layer, see ``Block``."""
        x = constrain(x, ("batch", "seq", "embed"))
        kvs = []
        for i, block in enumerate(self.layers):
            x, kv = block(x, bias, allowed, None if cross is None else cross[i],
                          None if writes is None else writes[i])
            kvs.append(kv)
        return self.final_norm(x), kvs


def _write_at(index: Array):
    """A KV-cache writer storing the new [b, 1, h, d] entries at row ``index`` [b] of each cache."""
    def make(k_cache: Array, v_cache: Array):
        hit = (jnp.arange(k_cache.shape[1])[None, :] == index[:, None])[:, :, None, None]
        return lambda k, v: (jnp.where(hit, k.astype(k_cache.dtype), k_cache),
                             jnp.where(hit, v.astype(v_cache.dtype), v_cache))
    return make


class Seq2Seq(nnx.Module):
    """T5 encoder-decoder, or (``cfg.decoder_only``) a prefix-LM decoder; see the module docstring."""

    def __init__(self, cfg: Seq2SeqConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        self.embedding = param(rngs, _normal(1.0), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        if cfg.decoder_only:
            self.encoder = None
            self.decoder = Stack(cfg, cfg.decoder_layers, bidirectional=True, cross=False, dtype=dtype, rngs=rngs,
                                 sparse=moe_layers(cfg))
        else:
            self.encoder = (Stack(cfg, cfg.encoder_layers, bidirectional=True, cross=False, dtype=dtype, rngs=rngs)
                            if cfg.encoder_layers else None)
            self.decoder = Stack(cfg, cfg.decoder_layers, bidirectional=False, cross=True, dtype=dtype, rngs=rngs,
                                 sparse=moe_layers(cfg))
        self.lm_head = (None if cfg.tie_embeddings else
                        param(rngs, _normal(cfg.d_model ** -0.5), (cfg.d_model, cfg.vocab_size), ("embed", "vocab")))

    # --- pieces ---

    def embed(self, tokens: Array) -> Array:
        """[b, s] int -> [b, s, embed] (compute dtype)."""
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)
        return constrain(x, ("batch", "seq", "embed"))

    def head(self, h: Array) -> Array:
        """final-normed decoder states [b, t, embed] -> logits [b, t, vocab] float32."""
        if self.cfg.scale_output:
            h = h * (self.cfg.d_model ** -0.5)
        w = self.embedding[...].T if self.lm_head is None else self.lm_head[...]
        logits = jnp.einsum("bte,ev->btv", h.astype(self.dtype), w.astype(self.dtype),
                            preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab"))

    @staticmethod
    def _prefix_positions(mask: Array) -> tuple[Array, Array]:
        """query mask [b, s] -> (positions over valid tokens [b, s], number of valid tokens [b])."""
        m = mask.astype(jnp.int32)
        return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0), jnp.sum(m, axis=1)

    # --- full sequences ---

    def encode(self, tokens: Array, mask: Array) -> Array:
        """tokens, mask [b, s] -> encoder output [b, s, embed] (decoder_only: the prefix's final states)."""
        mask = mask.astype(bool)
        if self.cfg.decoder_only:
            pos, _ = self._prefix_positions(mask)
            h, _ = self.decoder(self.embed(tokens), self.decoder.position_bias(pos, pos), mask[:, None, :])
            return h
        return self.encode_embedded(self.embed(tokens), mask)

    def encode_embedded(self, x: Array, mask: Array) -> Array:
        """The encoder on given input embeddings: x [b, s, embed] (``embed(tokens)``, perturbed or dropped out
        by the caller: FGM, R-Drop), mask [b, s] -> encoder output [b, s, embed]. Encoder-decoder only."""
        if self.encoder is None:
            raise ValueError("this Seq2Seq has no encoder (encoder_layers=0 or decoder_only): decode from a memory "
                             "with `decode` / `start_decoding`")
        pos = jnp.arange(x.shape[1])[None]
        h, _ = self.encoder(x, self.encoder.position_bias(pos, pos), mask.astype(bool)[:, None, :])
        return h

    def __call__(self, tokens: Array, mask: Array, decoder_inputs: Array) -> Array:
        """Teacher forcing: tokens, mask [b, s], decoder_inputs [b * n, t] (``decoder_start_token`` first)
        -> logits [b * n, t, vocab] float32 (position j predicts decoder token j + 1). With n > 1 each query
        has n continuations (its rows adjacent), which share its encoder pass and cross-attention K/V
        (a reranker scoring a beam's candidates)."""
        mask = mask.astype(bool)
        n = decoder_inputs.shape[0] // tokens.shape[0]
        if n * tokens.shape[0] != decoder_inputs.shape[0]:
            raise ValueError(f"{decoder_inputs.shape[0]} decoder rows for {tokens.shape[0]} queries: not a multiple")
        t = decoder_inputs.shape[1]
        repeat = (lambda x: jnp.repeat(x, n, axis=0)) if n > 1 else (lambda x: x)
        if self.cfg.decoder_only:
            tokens, mask = repeat(tokens), repeat(mask)
            b, s = tokens.shape
            pos, length = self._prefix_positions(mask)
            all_pos = jnp.concatenate([pos, length[:, None] + jnp.arange(t)[None]], axis=1)       # [b, s+t]
            idx = jnp.arange(s + t)
            valid = jnp.concatenate([mask, jnp.ones((b, t), bool)], axis=1)
            allowed = valid[:, None, :] & ((idx[None, :] < s) | (idx[None, :] <= idx[:, None]))[None]
            x = jnp.concatenate([self.embed(tokens), self.embed(decoder_inputs)], axis=1)
            h, _ = self.decoder(x, self.decoder.position_bias(all_pos, all_pos), allowed)
            return self.head(h[:, s:])
        return self.decode(self.encode(tokens, mask), mask, decoder_inputs)

    def decode(self, enc: Array, mask: Array, decoder_inputs: Array) -> Array:
        """The encoder-decoder's decoder on a given memory: enc [b, s, embed], mask [b, s], decoder_inputs
        [b * n, t] -> logits [b * n, t, vocab] float32 (``__call__``'s rows; any memory a caller builds,
        e.g. compressed behaviour sequences beside the encoded query)."""
        mask = mask.astype(bool)
        n, t = decoder_inputs.shape[0] // enc.shape[0], decoder_inputs.shape[1]
        repeat = (lambda x: jnp.repeat(x, n, axis=0)) if n > 1 else (lambda x: x)
        cross = jax.tree.map(repeat, self._cross(enc, mask))
        pos = jnp.arange(t)[None]
        causal = (pos[0][None, :] <= pos[0][:, None])[None]                                     # [1, t, t]
        h, _ = self.decoder(self.embed(decoder_inputs), self.decoder.position_bias(pos, pos), causal, cross)
        return self.head(h)

    def _cross(self, enc: Array, mask: Array) -> list[dict]:
        """encoder output [b, s, embed], mask [b, s] -> per decoder layer {"k", "v": [b, s, h, d], "allowed"}."""
        allowed = mask.astype(bool)[:, None, :]
        out = []
        for block in self.decoder.layers:
            k, v = block.cross_attn.key_value(enc)
            out.append({"k": k, "v": v, "allowed": allowed})
        return out

    # --- decoding ---

    def start(self, tokens: Array, mask: Array, max_len: int) -> tuple[dict, dict]:
        """tokens, mask [b, s], max_len (decoder steps, static) -> (context, cache); see the module docstring."""
        cfg, mask = self.cfg, mask.astype(bool)
        b, s = tokens.shape
        shape = (b, max_len, cfg.num_heads, cfg.head_dim)
        if cfg.decoder_only:
            pos, length = self._prefix_positions(mask)
            _, kvs = self.decoder(self.embed(tokens), self.decoder.position_bias(pos, pos), mask[:, None, :])
            pad = jnp.zeros(shape, self.dtype)
            cache = {"self": [{"k": jnp.concatenate([k.astype(self.dtype), pad], axis=1),
                               "v": jnp.concatenate([v.astype(self.dtype), pad], axis=1)} for k, v in kvs]}
            return {"mask": mask, "pos": pos, "length": length}, cache
        return self.start_decoding(self.encode(tokens, mask), mask, max_len)

    def start_decoding(self, enc: Array, mask: Array, max_len: int) -> tuple[dict, dict]:
        """``start`` for the encoder-decoder on a given memory: enc [b, s, embed], mask [b, s] -> (context, cache)."""
        cfg, mask = self.cfg, mask.astype(bool)
        shape = (enc.shape[0], max_len, cfg.num_heads, cfg.head_dim)
        cross = [{"k": c["k"], "v": c["v"]} for c in self._cross(enc, mask)]
        cache = {"self": [{"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
                          for _ in self.decoder.layers]}
        return {"mask": mask, "cross": cross}, cache

    def step(self, context: dict, cache: dict, token: Array, position) -> tuple[Array, dict]:
        """One decoding step: token [b] int at decoder position ``position`` (int scalar or [b]; the decoder
        start token is position 0) -> (logits [b, vocab] float32 for the next token, updated cache)."""
        b = token.shape[0]
        pos = jnp.broadcast_to(jnp.asarray(position, jnp.int32), (b,))
        x = self.embed(token[:, None])
        if self.cfg.decoder_only:
            s = context["mask"].shape[1]
            n = cache["self"][0]["k"].shape[1] - s
            k_pos = jnp.concatenate([context["pos"], context["length"][:, None] + jnp.arange(n)[None]], axis=1)
            q_pos = (context["length"] + pos)[:, None]
            allowed = jnp.concatenate([context["mask"], jnp.arange(n)[None] <= pos[:, None]], axis=1)[:, None]
            index = s + pos
            cross = None
        else:
            n = cache["self"][0]["k"].shape[1]
            k_pos = jnp.arange(n)[None]
            q_pos = pos[:, None]
            allowed = (k_pos <= q_pos)[:, None]                                                   # [b, 1, n]
            index = pos
            m = context["mask"][:, None, :]
            cross = [{"k": c["k"], "v": c["v"], "allowed": m} for c in context["cross"]]
        make = _write_at(index)
        writes = [make(c["k"], c["v"]) for c in cache["self"]]
        h, kvs = self.decoder(x, self.decoder.position_bias(q_pos, k_pos), allowed, cross, writes)
        return self.head(h)[:, 0], {"self": [{"k": k, "v": v} for k, v in kvs]}
