"""Transformer encoder parts shared by the vision (ViT, CLIP, SigLIP) and text (BERT family) towers.

Parameter layout (every parameter carries logical axis names, see ``models/partitioning.py``)::

    Attention   qkv_kernel [embed, 3, heads, kv]  ("embed", None, "heads", "kv")   one fused QKV matmul
                qkv_bias   [3, heads, kv]         (None, "heads", "kv")
                out_kernel [heads, kv, embed]     ("heads", "kv", "embed")
                out_bias   [embed]                ("embed",)
    MLP         fc1 kernel [embed, mlp], bias [mlp]; fc2 kernel [mlp, embed], bias [embed]
    EncoderBlock ln1, attn, ln2, mlp      pre-LN (ViT/CLIP/SigLIP) or post-LN (BERT) by ``BlockConfig.pre_norm``
    Encoder     blocks[i] (an ``nnx.List``; no ``lax.scan``, no remat: see shared/NOTES-performance.md)
    AttentionPool  probe [embed], q_kernel [embed, heads, kv], kv_kernel [embed, 2, heads, kv], out, ln, mlp
                (SigLIP's multi-head attention pooling head)

Params are float32; ``dtype`` is the compute dtype (inputs and params are promoted to it). Softmax and
LayerNorm statistics run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.partitioning import constrain

Array = jax.Array

# --- activations ------------------------------------------------------------------------------------


def quick_gelu(x: Array) -> Array:
    """CLIP's ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),   # exact erf GELU (ViT, BERT)
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # SigLIP's gelu_pytorch_tanh
    "quick_gelu": quick_gelu,                                # CLIP
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[Array], Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


# --- initialisers -----------------------------------------------------------------------------------

# Xavier-uniform over the true fan-in/fan-out of each projection (the fused QKV axis is a batch axis).
QKV_INIT = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(2, 3), batch_axis=(1,))
Q_INIT = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2))
OUT_INIT = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2)
DENSE_INIT = nnx.initializers.xavier_uniform()
EMBED_INIT = nnx.initializers.truncated_normal(stddev=0.02)
ZEROS = nnx.initializers.zeros_init()
ONES = nnx.initializers.ones_init()


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], names: tuple[str | None, ...]) -> nnx.Param:
    """A float32 ``nnx.Param`` created with its logical axis names."""
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names)


def layer_norm(dim: int, eps: float, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over the last axis; two-pass variance (as torch) so imported models match to 1e-5."""
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, use_fast_variance=False, rngs=rngs,
                         scale_init=nnx.with_partitioning(ONES, ("embed",)),
                         bias_init=nnx.with_partitioning(ZEROS, ("embed",)))


def dense(d_in: int, d_out: int, names: tuple[str, str], *, dtype, rngs: nnx.Rngs, use_bias: bool = True,
          kernel_init=DENSE_INIT) -> nnx.Linear:
    """``nnx.Linear`` whose kernel [d_in, d_out] and bias [d_out] carry logical names."""
    return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, rngs=rngs,
                      kernel_init=nnx.with_partitioning(kernel_init, names),
                      bias_init=nnx.with_partitioning(ZEROS, names[1:]))


# --- config -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """What one encoder block needs; built by ``ViTConfig.block`` / ``TextEncoderConfig.block``."""

    hidden: int
    heads: int
    mlp_dim: int
    ln_eps: float = 1e-6
    act: str = "gelu"
    pre_norm: bool = True   # True: x + f(LN(x)) (ViT/CLIP/SigLIP); False: LN(x + f(x)) (BERT)
    qkv_bias: bool = True

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        activation(self.act)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# --- modules ----------------------------------------------------------------------------------------


def _attend(q: Array, k: Array, v: Array, mask: Array | None, dtype) -> Array:
    """Scaled dot-product attention. q [b, q, h, d], k/v [b, k, h, d], mask [b, k] (1 = attend) -> [b, q, h, d]."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :].astype(bool), logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(nnx.Module):
    """Multi-head self-attention with one fused QKV projection."""

    def __init__(self, hidden: int, heads: int, *, qkv_bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        self.heads, self.head_dim, self.dtype = heads, hidden // heads, dtype
        self.qkv_kernel = param(rngs, QKV_INIT, (hidden, 3, heads, self.head_dim), ("embed", None, "heads", "kv"))
        self.qkv_bias = param(rngs, ZEROS, (3, heads, self.head_dim), (None, "heads", "kv")) if qkv_bias else None
        self.out_kernel = param(rngs, OUT_INIT, (heads, self.head_dim, hidden), ("heads", "kv", "embed"))
        self.out_bias = param(rngs, ZEROS, (hidden,), ("embed",))

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """x [b, s, embed], mask [b, s] (1 = real token) or None -> [b, s, embed]."""
        dt = self.dtype
        qkv = jnp.einsum("bse,ethd->bsthd", x.astype(dt), self.qkv_kernel[...].astype(dt))
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias[...].astype(dt)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = constrain(q, ("batch", "seq", "heads", "kv"))
        out = _attend(q, k, v, mask, dt)
        y = jnp.einsum("bshd,hde->bse", out, self.out_kernel[...].astype(dt))
        return y + self.out_bias[...].astype(dt)


class MLP(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, hidden: int, mlp_dim: int, act: str = "gelu", *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.fc1 = dense(hidden, mlp_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = dense(mlp_dim, hidden, ("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.act = act

    def __call__(self, x: Array) -> Array:
        """[b, s, embed] -> [b, s, embed]."""
        h = activation(self.act)(self.fc1(x))
        h = constrain(h, ("batch", "seq", "mlp"))
        return self.fc2(h)


class EncoderBlock(nnx.Module):
    """One transformer encoder layer, pre-LN or post-LN."""

    def __init__(self, cfg: BlockConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.pre_norm = cfg.pre_norm
        self.ln1 = layer_norm(cfg.hidden, cfg.ln_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg.hidden, cfg.heads, qkv_bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.ln2 = layer_norm(cfg.hidden, cfg.ln_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg.hidden, cfg.mlp_dim, cfg.act, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """x [b, s, embed], mask [b, s] or None -> [b, s, embed]."""
        if self.pre_norm:
            x = x + self.attn(self.ln1(x), mask)
            x = x + self.mlp(self.ln2(x))
        else:
            x = self.ln1(x + self.attn(x, mask))
            x = self.ln2(x + self.mlp(x))
        return constrain(x, ("batch", "seq", "embed"))


class Encoder(nnx.Module):
    """A stack of ``depth`` encoder blocks (a Python loop: no scan, no remat)."""

    def __init__(self, cfg: BlockConfig, depth: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.blocks = nnx.List([EncoderBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(depth)])

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """x [b, s, embed], mask [b, s] or None -> [b, s, embed]."""
        x = constrain(x, ("batch", "seq", "embed"))
        for block in self.blocks:
            x = block(x, mask)
        return x


class AttentionPool(nnx.Module):
    """Multi-head attention pooling with a learned probe (SigLIP's ``MultiheadAttentionPoolingHead``).

    ``y = attn(probe, x, x); y = y + mlp(LN(y))``; returns the single pooled vector.
    """

    def __init__(self, cfg: BlockConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        h, d = cfg.heads, cfg.head_dim
        self.dtype = dtype
        self.probe = param(rngs, nnx.initializers.normal(0.02), (cfg.hidden,), ("embed",))
        self.q_kernel = param(rngs, Q_INIT, (cfg.hidden, h, d), ("embed", "heads", "kv"))
        self.q_bias = param(rngs, ZEROS, (h, d), ("heads", "kv"))
        self.kv_kernel = param(rngs, QKV_INIT, (cfg.hidden, 2, h, d), ("embed", None, "heads", "kv"))
        self.kv_bias = param(rngs, ZEROS, (2, h, d), (None, "heads", "kv"))
        self.out_kernel = param(rngs, OUT_INIT, (h, d, cfg.hidden), ("heads", "kv", "embed"))
        self.out_bias = param(rngs, ZEROS, (cfg.hidden,), ("embed",))
        self.ln = layer_norm(cfg.hidden, cfg.ln_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg.hidden, cfg.mlp_dim, cfg.act, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """x [b, s, embed], mask [b, s] or None -> [b, embed]."""
        dt = self.dtype
        probe = self.probe[...].astype(dt)
        q = jnp.einsum("e,ehd->hd", probe, self.q_kernel[...].astype(dt)) + self.q_bias[...].astype(dt)
        q = jnp.broadcast_to(q[None, None], (x.shape[0], 1, *q.shape))
        kv = jnp.einsum("bse,ethd->bsthd", x.astype(dt), self.kv_kernel[...].astype(dt)) + self.kv_bias[...].astype(dt)
        out = _attend(q, kv[:, :, 0], kv[:, :, 1], mask, dt)
        y = jnp.einsum("bshd,hde->bse", out, self.out_kernel[...].astype(dt)) + self.out_bias[...].astype(dt)
        y = y + self.mlp(self.ln(y))
        return y[:, 0]
