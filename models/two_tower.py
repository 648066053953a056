"""A small image–text two-tower model: the first task's model and the trainer's test bed.

Image tower: non-overlapping patches -> linear patch embedding + learned positions -> ``depth``
pre-LN residual MLP blocks applied per patch, each followed by a token-mixing step (mean over
patches) -> mean pool -> projection. Text tower: word embeddings + positions -> the same blocks ->
masked mean pool -> projection. Both end L2-normalised in a shared ``embed_dim`` space.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.partitioning import constrain


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig:
    image_size: int = 32
    patch_size: int = 8
    channels: int = 3
    vocab_size: int = 64
    max_words: int = 8
    width: int = 64
    depth: int = 2
    mlp_ratio: int = 4
    embed_dim: int = 32


def _dense(din: int, dout: int, axes: tuple[str, str], rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, rngs=rngs,
                      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
                      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:]))


def _norm(width: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, rngs=rngs, epsilon=1e-6,
                         scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)))


class MixerBlock(nnx.Module):
    """Per-token MLP plus a global-context mix: ``[b, n, width] -> [b, n, width]``."""

    def __init__(self, width: int, mlp_ratio: int, rngs: nnx.Rngs):
        self.norm1 = _norm(width, rngs)
        self.mix = _dense(width, width, ("embed", "mlp"), rngs)
        self.norm2 = _norm(width, rngs)
        self.up = _dense(width, width * mlp_ratio, ("embed", "mlp"), rngs)
        self.down = _dense(width * mlp_ratio, width, ("mlp", "embed"), rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        context = masked_mean(self.norm1(x), mask)  # [b, width]
        x = x + self.mix(context)[:, None, :]
        x = x + self.down(jax.nn.gelu(self.up(self.norm2(x))))
        return constrain(x, ("batch", "seq", "embed"))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``[b, n, d], [b, n] -> [b, d]``: mean over the positions where mask is true."""
    weights = mask.astype(x.dtype)[..., None]
    return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def l2_normalise(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class ImageTower(nnx.Module):
    def __init__(self, cfg: TwoTowerConfig, rngs: nnx.Rngs):
        self.patch = cfg.patch_size
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.embed = _dense(cfg.patch_size**2 * cfg.channels, cfg.width, ("patch", "embed"), rngs)
        self.pos = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (num_patches, cfg.width)),
                             out_sharding=("seq", "embed"))
        self.blocks = nnx.List([MixerBlock(cfg.width, cfg.mlp_ratio, rngs) for _ in range(cfg.depth)])
        self.norm = _norm(cfg.width, rngs)
        self.proj = _dense(cfg.width, cfg.embed_dim, ("embed", "mlp"), rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        """``[b, h, w, c] -> [b, embed_dim]`` (L2-normalised)."""
        b, h, w, c = images.shape
        p = self.patch
        patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = self.embed(patches.reshape(b, (h // p) * (w // p), p * p * c)) + self.pos[...]
        x = constrain(x, ("batch", "seq", "embed"))
        mask = jnp.ones(x.shape[:2], bool)
        for block in self.blocks:
            x = block(x, mask)
        return l2_normalise(self.proj(self.norm(masked_mean(x, mask))))


class TextTower(nnx.Module):
    def __init__(self, cfg: TwoTowerConfig, rngs: nnx.Rngs):
        self.embed = nnx.Embed(cfg.vocab_size, cfg.width, rngs=rngs,
                               embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")))
        self.pos = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (cfg.max_words, cfg.width)),
                             out_sharding=("seq", "embed"))
        self.blocks = nnx.List([MixerBlock(cfg.width, cfg.mlp_ratio, rngs) for _ in range(cfg.depth)])
        self.norm = _norm(cfg.width, rngs)
        self.proj = _dense(cfg.width, cfg.embed_dim, ("embed", "mlp"), rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``[b, words] int32 (0 = padding) -> [b, embed_dim]`` (L2-normalised)."""
        mask = tokens > 0
        x = constrain(self.embed(tokens) + self.pos[...], ("batch", "seq", "embed"))
        for block in self.blocks:
            x = block(x, mask)
        return l2_normalise(self.proj(self.norm(masked_mean(x, mask))))


class TwoTower(nnx.Module):
    """Image and text towers and a learnable inverse temperature (CLIP's ``logit_scale``)."""

    def __init__(self, cfg: TwoTowerConfig, rngs: nnx.Rngs):
        self.image = ImageTower(cfg, rngs)
        self.text = TextTower(cfg, rngs)
        self.logit_scale = nnx.Param(jnp.asarray(jnp.log(1 / 0.07), jnp.float32))
