"""Vision Transformer towers: ViT (timm / HF ``ViTModel``), CLIP vision, SigLIP vision, by config flags.

``ViTConfig()`` defaults are ViT-B/16 without head, exactly timm ``vit_base_patch16_224(num_classes=0)``
(85,798,656 parameters): patch 16, hidden 768, depth 12, heads 12, mlp 3072, CLS token, learned position
embeddings, pre-LN blocks, LayerNorm eps 1e-6, exact GELU, a final LayerNorm on all tokens.

Variants (set by ``models.hf_import`` from a checkpoint's config.json):

=============  =========  ==========  ==========  ============  ==========  ===========  ==========
family         cls_token  patch_bias  pre_norm    final_norm    pool        act          ln_eps
=============  =========  ==========  ==========  ============  ==========  ===========  ==========
timm ViT       True       True        False       "tokens"      "cls"       gelu         1e-6
HF ViTModel    True       True        False       "tokens"      "cls"+dense  gelu        1e-12
CLIP vision    True       False       True        "pooled"      "cls"       quick_gelu   1e-5
SigLIP vision  False      True        False       "tokens"      "map"       gelu_tanh    1e-6
=============  =========  ==========  ==========  ============  ==========  ===========  ==========

Images are NHWC floats, already normalised by the caller (mean/std of the checkpoint's preprocessor).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.partitioning import constrain
from models.transformer import (EMBED_INIT, ZEROS, AttentionPool, BlockConfig, Encoder, dense, layer_norm, param)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    hidden: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    channels: int = 3
    ln_eps: float = 1e-6
    act: str = "gelu"             # "gelu" (exact) | "gelu_tanh" | "quick_gelu" | ...
    qkv_bias: bool = True
    patch_bias: bool = True       # CLIP's patch conv has no bias
    cls_token: bool = True        # SigLIP has none
    pre_norm: bool = False        # CLIP: LayerNorm on the embeddings before the encoder ("pre_layrnorm")
    final_norm: str = "tokens"    # "tokens": LN on every output token; "pooled": LN on the pooled vector only
                                  # (CLIP's post_layernorm); "none"
    pool: str = "cls"             # "cls" | "mean" (over patch tokens) | "map" (attention-pooling head)
    pooler_dense: bool = False    # HF ViTModel's pooler: tanh(dense(pooled))

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.final_norm not in ("tokens", "pooled", "none"):
            raise ValueError(f"final_norm must be 'tokens', 'pooled' or 'none', got {self.final_norm!r}")
        if self.pool not in ("cls", "mean", "map"):
            raise ValueError(f"pool must be 'cls', 'mean' or 'map', got {self.pool!r}")
        if self.pool == "cls" and not self.cls_token:
            raise ValueError("pool='cls' needs cls_token=True")
        self.block  # validates heads / activation

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_prefix(self) -> int:
        """Tokens before the patch tokens (the CLS token, if any)."""
        return 1 if self.cls_token else 0

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches

    @property
    def block(self) -> BlockConfig:
        return BlockConfig(hidden=self.hidden, heads=self.heads, mlp_dim=self.mlp_dim, ln_eps=self.ln_eps,
                           act=self.act, pre_norm=True, qkv_bias=self.qkv_bias)


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patches -> hidden: a stride-p convolution, kernel [p, p, channels, embed]."""

    def __init__(self, cfg: ViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        p = cfg.patch_size
        init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)
        self.kernel = param(rngs, init, (p, p, cfg.channels, cfg.hidden), ("patch", "patch", "channels", "embed"))
        self.bias = param(rngs, ZEROS, (cfg.hidden,), ("embed",)) if cfg.patch_bias else None
        self.patch_size, self.dtype = p, dtype

    def __call__(self, images: Array) -> Array:
        """images [b, h, w, c] -> patch embeddings [b, (h/p)*(w/p), embed], row-major over the grid."""
        p, dt = self.patch_size, self.dtype
        x = jax.lax.conv_general_dilated(images.astype(dt), self.kernel[...].astype(dt), (p, p), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.bias is not None:
            x = x + self.bias[...].astype(dt)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class ViT(nnx.Module):
    """Vision Transformer encoder. ``__call__``: images [b, h, w, c] -> tokens [b, num_prefix + n, hidden]."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        cfg = self.config = config
        self.dtype = dtype
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.cls_token = param(rngs, EMBED_INIT, (cfg.hidden,), ("embed",)) if cfg.cls_token else None
        self.pos_embed = param(rngs, EMBED_INIT, (cfg.num_tokens, cfg.hidden), (None, "embed"))
        self.pre_norm = layer_norm(cfg.hidden, cfg.ln_eps, dtype=dtype, rngs=rngs) if cfg.pre_norm else None
        self.encoder = Encoder(cfg.block, cfg.depth, dtype=dtype, rngs=rngs)
        self.norm = layer_norm(cfg.hidden, cfg.ln_eps, dtype=dtype, rngs=rngs) if cfg.final_norm != "none" else None
        self.head = AttentionPool(cfg.block, dtype=dtype, rngs=rngs) if cfg.pool == "map" else None
        self.pooler = (dense(cfg.hidden, cfg.hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
                       if cfg.pooler_dense else None)

    def __call__(self, images: Array) -> Array:
        """images [b, h, w, c] float -> tokens [b, num_prefix + n, hidden].

        With ``final_norm="tokens"`` the tokens are layer-normed (HF ``last_hidden_state`` of ViT and
        SigLIP); with ``"pooled"`` (CLIP) they are the raw encoder output, as in HF CLIP.
        """
        cfg, dt = self.config, self.dtype
        b, h, w, c = images.shape
        if (h, w, c) != (cfg.image_size, cfg.image_size, cfg.channels):
            raise ValueError(f"ViT expects images [b, {cfg.image_size}, {cfg.image_size}, {cfg.channels}], "
                             f"got {images.shape}")
        x = self.patch_embed(images)
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...].astype(dt), (b, 1, cfg.hidden))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.pos_embed[...].astype(dt)
        x = constrain(x, ("batch", "seq", "embed"))
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        x = self.encoder(x)
        if cfg.final_norm == "tokens":
            x = self.norm(x)
        return constrain(x, ("batch", "seq", "embed"))

    def pool(self, tokens: Array) -> Array:
        """tokens [b, num_prefix + n, hidden] (from ``__call__``) -> pooled [b, hidden]."""
        cfg = self.config
        if cfg.pool == "cls":
            y = tokens[:, 0]
        elif cfg.pool == "mean":
            y = jnp.mean(tokens[:, cfg.num_prefix:], axis=1)
        else:
            y = self.head(tokens)
        if cfg.final_norm == "pooled":
            y = self.norm(y)
        if self.pooler is not None:
            y = jnp.tanh(self.pooler(y))
        return constrain(y, ("batch", "embed"))

    def encode(self, images: Array) -> tuple[Array, Array]:
        """images [b, h, w, c] -> (tokens [b, num_prefix + n, hidden], pooled [b, hidden])."""
        tokens = self(images)
        return tokens, self.pool(tokens)

    def pooled(self, images: Array) -> Array:
        """images [b, h, w, c] -> pooled [b, hidden] (CLS, mean or attention pooling per config)."""
        return self.pool(self(images))

    def patch_tokens(self, tokens: Array) -> Array:
        """tokens [b, num_prefix + n, hidden] -> patch tokens [b, n, hidden] (drops the CLS token)."""
        return tokens[:, self.config.num_prefix:]

    def patch_grid(self, tokens: Array) -> Array:
        """tokens [b, num_prefix + n, hidden] -> patch tokens as a grid [b, h/p, w/p, hidden]."""
        g = self.config.grid
        return self.patch_tokens(tokens).reshape(tokens.shape[0], g, g, -1)
