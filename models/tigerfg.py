"""TIGER-FG: text-guided implicit fine-grained grounding for image -> multimodal product retrieval.

The query is a cropped product photo; a candidate item is its full image (often a mosaic of several
products) plus structured text (title | category path | attributes). TIGER-FG lets the item's text
pick out the target in the item image, with no detector at retrieval time.

Towers (every parameter carries logical axis names; activations are ``constrain``-ed at block edges)::

    query   images [b, h, w, 3] -> ViT -> CLS [b, H] -> Linear(H, D) -> L2        = q      [b, D]
    item    images -> ViT (own weights, or the query ViT with share_image_encoder) -> CLS c [b, H],
                                                                         patches P [b, n, H]
            ids, mask [b, s] -> BERT-style TextEncoder -> T [b, s, Ht]
            K learnable slot queries Z [K, H]:
              Z <- CrossBlock(Z, T)   (slots read the item text first)
              Z <- CrossBlock(Z, P)   (then look at the patches: text-conditioned visual slots;
                                       its attention over patches are the slot maps [b, K, n])
              f_m = sum_k softmax_k(w . LN(Z_k)) Z_k                   semantic feature [b, H]
            appearance: a = LN(f_m + c); f_a = CrossAttn(a, P)         appearance feature [b, H]
            f = L2(W_m f_m + gate * W_a f_a)                           item embedding [b, D]
    heads used by the losses only (training):
            text_embedding  = L2(W_t meanpool(T))                      [b, D]
            region_embedding = L2(W_r meanpool(P inside the target box))  [b, D]

Baselines in the same file, with the same interface (``embed_query``, ``embed_item``,
``item_outputs``, ``region_embedding``, ``logit_scale``):

* ``ClipStyle``: item = L2(Linear(ViT CLS)) of the item image only (no text).
* ``LateFusion``: item = L2(W_i CLS + W_t meanpool(T)).

``ViTConfig()`` (the default query tower) is ViT-B/16: 85,798,656 parameters, + 768*256 (+256 bias)
for the projection.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.partitioning import constrain
from models.text_encoder import TextEncoder, TextEncoderConfig, l2_normalize, mean_pool
from models.transformer import MLP, OUT_INIT, Q_INIT, QKV_INIT, ZEROS, dense, layer_norm, param
from models.vit import ViT, ViTConfig

Array = jax.Array
MODEL_NAMES = ("tigerfg", "clip", "late_fusion")


@dataclasses.dataclass(frozen=True)
class TigerFGConfig:
    """Everything the three model variants need. ``name`` picks the variant."""

    name: str = "tigerfg"                     # "tigerfg" | "clip" | "late_fusion"
    query_vit: ViTConfig = ViTConfig()
    item_vit: ViTConfig = ViTConfig()
    text: TextEncoderConfig = TextEncoderConfig()
    embed_dim: int = 256
    proj_bias: bool = True
    num_slots: int = 8                        # K text-conditioned visual slots
    fusion_heads: int = 12
    fusion_mlp_ratio: int = 4
    share_image_encoder: bool = False         # item image ViT = the query ViT (same weights)
    init_logit_scale: float = math.log(1 / 0.07)

    def __post_init__(self):
        if self.name not in MODEL_NAMES:
            raise ValueError(f"model name must be one of {MODEL_NAMES}, got {self.name!r}")
        if self.share_image_encoder and self.query_vit != self.item_vit:
            raise ValueError("share_image_encoder needs query_vit == item_vit")
        if self.item_vit.hidden % self.fusion_heads:
            raise ValueError(f"item_vit.hidden {self.item_vit.hidden} is not divisible by fusion_heads "
                             f"{self.fusion_heads}")


# --- small helpers ----------------------------------------------------------------------------------


def box_patch_mask(box: Array, grid: int) -> Array:
    """Patches whose centre lies inside the box: box [b, 4] (x0, y0, x1, y1 in [0, 1]) -> [b, grid*grid] f32.

    The patch holding the box centre is always included, so the mask is never empty.
    """
    c = (jnp.arange(grid, dtype=jnp.float32) + 0.5) / grid
    box = box.astype(jnp.float32)
    inside_x = (c[None, :] >= box[:, 0:1]) & (c[None, :] < box[:, 2:3])        # [b, g]
    inside_y = (c[None, :] >= box[:, 1:2]) & (c[None, :] < box[:, 3:4])        # [b, g]
    mask = inside_y[:, :, None] & inside_x[:, None, :]                          # [b, g(y), g(x)]
    cx = jnp.clip(jnp.floor((box[:, 0] + box[:, 2]) * 0.5 * grid), 0, grid - 1).astype(jnp.int32)
    cy = jnp.clip(jnp.floor((box[:, 1] + box[:, 3]) * 0.5 * grid), 0, grid - 1).astype(jnp.int32)
    centre = jax.nn.one_hot(cy, grid)[:, :, None] * jax.nn.one_hot(cx, grid)[:, None, :]
    return jnp.maximum(mask.astype(jnp.float32), centre).reshape(box.shape[0], grid * grid)


def crop_boxes(images: Array, box: Array) -> Array:
    """Each image's box, cropped and resized back to the image size (bilinear): images [b, h, w, c], box [b, 4]
    (x0, y0, x1, y1 in [0, 1]) -> [b, h, w, c]. The view of the target a box-seeing teacher embeds."""
    h, w = images.shape[1:3]

    def one(image: Array, bx: Array) -> Array:
        sy, sx = 1.0 / jnp.maximum(bx[3] - bx[1], 1e-3), 1.0 / jnp.maximum(bx[2] - bx[0], 1e-3)
        return jax.image.scale_and_translate(image, image.shape, (0, 1), jnp.stack([sy, sx]),
                                             jnp.stack([-bx[1] * h * sy, -bx[0] * w * sx]), "linear")

    return jax.vmap(one)(images, box.astype(jnp.float32)).astype(images.dtype)


def _scalar(value: float) -> nnx.Param:
    return nnx.Param(jnp.asarray(value, jnp.float32), out_sharding=())


# --- cross-attention (transformer.py has self-attention only) ----------------------------------------


class CrossAttention(nnx.Module):
    """Multi-head attention of queries x [b, q, dim] over a context c [b, k, ctx_dim].

    Params: q_kernel [dim, heads, kv], kv_kernel [ctx_dim, 2, heads, kv], out_kernel [heads, kv, dim].
    """

    def __init__(self, dim: int, ctx_dim: int, heads: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d = dim // heads
        self.dtype = dtype
        self.q_kernel = param(rngs, Q_INIT, (dim, heads, d), ("embed", "heads", "kv"))
        self.q_bias = param(rngs, ZEROS, (heads, d), ("heads", "kv"))
        self.kv_kernel = param(rngs, QKV_INIT, (ctx_dim, 2, heads, d), ("embed", None, "heads", "kv"))
        self.kv_bias = param(rngs, ZEROS, (2, heads, d), (None, "heads", "kv"))
        self.out_kernel = param(rngs, OUT_INIT, (heads, d, dim), ("heads", "kv", "embed"))
        self.out_bias = param(rngs, ZEROS, (dim,), ("embed",))

    def __call__(self, x: Array, ctx: Array, mask: Array | None = None) -> tuple[Array, Array]:
        """x [b, q, dim], ctx [b, k, ctx_dim], mask [b, k] (1 = attend) -> (y [b, q, dim], probs [b, heads, q, k])."""
        dt = self.dtype
        q = jnp.einsum("bqe,ehd->bqhd", x.astype(dt), self.q_kernel[...].astype(dt)) + self.q_bias[...].astype(dt)
        kv = (jnp.einsum("bke,ethd->bkthd", ctx.astype(dt), self.kv_kernel[...].astype(dt))
              + self.kv_bias[...].astype(dt))
        k, v = kv[:, :, 0], kv[:, :, 1]
        q = constrain(q, ("batch", "seq", "heads", "kv"))
        scale = q.shape[-1] ** -0.5
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
        if mask is not None:
            logits = jnp.where(mask[:, None, None, :].astype(bool), logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dt), v)
        y = jnp.einsum("bqhd,hde->bqe", out, self.out_kernel[...].astype(dt)) + self.out_bias[...].astype(dt)
        return y, probs


class CrossBlock(nnx.Module):
    """Pre-LN cross-attention block: ``x += attn(LN(x), LN(ctx)); x += mlp(LN(x))``."""

    def __init__(self, dim: int, ctx_dim: int, heads: int, mlp_ratio: int = 4, *, ln_eps: float = 1e-6,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.ln_q = layer_norm(dim, ln_eps, dtype=dtype, rngs=rngs)
        self.ln_ctx = layer_norm(ctx_dim, ln_eps, dtype=dtype, rngs=rngs)
        self.attn = CrossAttention(dim, ctx_dim, heads, dtype=dtype, rngs=rngs)
        self.ln_mlp = layer_norm(dim, ln_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(dim, dim * mlp_ratio, "gelu", dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, ctx: Array, mask: Array | None = None) -> tuple[Array, Array]:
        """x [b, q, dim], ctx [b, k, ctx_dim], mask [b, k] -> (x [b, q, dim], probs [b, heads, q, k])."""
        y, probs = self.attn(self.ln_q(x), self.ln_ctx(ctx), mask)
        x = x + y
        x = x + self.mlp(self.ln_mlp(x))
        return constrain(x, ("batch", "seq", "embed")), probs


# --- towers -----------------------------------------------------------------------------------------


class QueryTower(nnx.Module):
    """Query photo -> ViT CLS -> Linear(H, D) -> L2: images [b, h, w, 3] -> [b, D]."""

    def __init__(self, vit: ViTConfig, embed_dim: int, *, bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        self.vit = ViT(vit, rngs=rngs, dtype=dtype)
        self.proj = dense(vit.hidden, embed_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs, use_bias=bias)

    def __call__(self, images: Array) -> Array:
        return l2_normalize(self.proj(self.vit.pooled(images)).astype(jnp.float32))


class _Base(nnx.Module):
    """The parts every variant shares: the query tower, the item image ViT, the region head, the temperature."""

    def __init__(self, cfg: TigerFGConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.query = QueryTower(cfg.query_vit, cfg.embed_dim, bias=cfg.proj_bias, dtype=dtype, rngs=rngs)
        self.item_vit = (self.query.vit if cfg.share_image_encoder
                         else ViT(cfg.item_vit, rngs=rngs, dtype=dtype))
        self.region_proj = dense(cfg.item_vit.hidden, cfg.embed_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.logit_scale = _scalar(cfg.init_logit_scale)

    def embed_query(self, images: Array) -> Array:
        """images [b, h, w, 3] -> [b, D] (L2-normalised)."""
        return self.query(images)

    def encode_image(self, images: Array) -> tuple[Array, Array]:
        """Item images [b, h, w, 3] -> (CLS [b, H], patch tokens [b, n, H])."""
        tokens = self.item_vit(images)
        return self.item_vit.pool(tokens), self.item_vit.patch_tokens(tokens)

    def region_embedding(self, patches: Array, box: Array) -> Array:
        """patch tokens [b, n, H], box [b, 4] in [0, 1] -> L2(W_r meanpool(patches in box)) [b, D]."""
        mask = box_patch_mask(box, self.config.item_vit.grid)
        return l2_normalize(self.region_proj(mean_pool(patches, mask)).astype(jnp.float32))

    def embed_item(self, images: Array, ids: Array, mask: Array) -> Array:
        """images [b, h, w, 3], ids/mask [b, s] -> item embedding [b, D] (L2-normalised)."""
        return self.item_outputs(images, ids, mask)["item"]


class ClipStyle(_Base):
    """Dual encoder baseline: the item is its image only, ``L2(Linear(ViT CLS))``."""

    uses_text = False

    def __init__(self, cfg: TigerFGConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        self.item_proj = dense(cfg.item_vit.hidden, cfg.embed_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs,
                               use_bias=cfg.proj_bias)

    def item_outputs(self, images: Array, ids: Array, mask: Array, neg_ids: Array | None = None,
                     neg_mask: Array | None = None) -> dict[str, Array]:
        """-> {"item" [b, D], "patches" [b, n, H]} (the text is ignored)."""
        cls, patches = self.encode_image(images)
        return {"item": l2_normalize(self.item_proj(cls).astype(jnp.float32)), "patches": patches}


class _WithText(_Base):
    uses_text = True

    def __init__(self, cfg: TigerFGConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        self.text = TextEncoder(cfg.text, rngs=rngs, dtype=dtype)
        self.text_proj = dense(cfg.text.hidden, cfg.embed_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)

    def text_embedding(self, hidden: Array, mask: Array) -> Array:
        """text hidden [b, s, Ht], mask [b, s] -> L2(W_t meanpool) [b, D]."""
        return l2_normalize(self.text_proj(mean_pool(hidden, mask)).astype(jnp.float32))


class LateFusion(_WithText):
    """Late-fusion baseline: item = ``L2(W_i CLS + W_t meanpool(text))``."""

    def __init__(self, cfg: TigerFGConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        self.image_proj = dense(cfg.item_vit.hidden, cfg.embed_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs,
                                use_bias=cfg.proj_bias)
        self.fuse_text = dense(cfg.text.hidden, cfg.embed_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs,
                               use_bias=False)

    def _fuse(self, cls: Array, hidden: Array, mask: Array) -> Array:
        return l2_normalize((self.image_proj(cls) + self.fuse_text(mean_pool(hidden, mask))).astype(jnp.float32))

    def item_outputs(self, images: Array, ids: Array, mask: Array, neg_ids: Array | None = None,
                     neg_mask: Array | None = None) -> dict[str, Array]:
        """-> {"item", "text", ["hard"]} [b, D] and "patches" [b, n, H]; "hard" = this image with the
        negative text ``neg_ids`` (an image–text-mismatch hard negative)."""
        cls, patches = self.encode_image(images)
        b = cls.shape[0]
        if neg_ids is not None:  # one pass over [true texts; negative texts]
            ids, mask, cls = jnp.concatenate([ids, neg_ids]), jnp.concatenate([mask, neg_mask]), jnp.concatenate([cls, cls])
        hidden = self.text(ids, mask)
        fused = self._fuse(cls, hidden, mask)
        out = {"item": fused[:b], "patches": patches, "text": self.text_embedding(hidden[:b], mask[:b])}
        if neg_ids is not None:
            out["hard"] = fused[b:]
        return out


class TigerFG(_WithText):
    """The TIGER-FG item tower (text-conditioned visual slots + appearance branch) and query tower."""

    def __init__(self, cfg: TigerFGConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        h, heads, r = cfg.item_vit.hidden, cfg.fusion_heads, cfg.fusion_mlp_ratio
        self.slots = param(rngs, nnx.initializers.normal(0.02), (cfg.num_slots, h), (None, "embed"))
        self.text_xattn = CrossBlock(h, cfg.text.hidden, heads, r, dtype=dtype, rngs=rngs)
        self.image_xattn = CrossBlock(h, h, heads, r, dtype=dtype, rngs=rngs)
        self.slot_norm = layer_norm(h, 1e-6, dtype=dtype, rngs=rngs)
        self.slot_score = dense(h, 1, ("embed", None), dtype=dtype, rngs=rngs)
        self.app_norm = layer_norm(h, 1e-6, dtype=dtype, rngs=rngs)
        self.app_attn = CrossAttention(h, h, heads, dtype=dtype, rngs=rngs)
        self.sem_proj = dense(h, cfg.embed_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs, use_bias=cfg.proj_bias)
        self.app_proj = dense(h, cfg.embed_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs, use_bias=False)
        self.gate = _scalar(0.5)

    def fuse(self, cls: Array, patches: Array, hidden: Array, mask: Array) -> dict[str, Array]:
        """CLS [b, H], patches [b, n, H], text hidden [b, s, Ht], mask [b, s] ->
        {"item" [b, D], "semantic" f_m [b, H], "appearance" f_a [b, H], "slot_maps" [b, K, n],
        "slot_weights" [b, K]}."""
        b = cls.shape[0]
        z = jnp.broadcast_to(self.slots[...].astype(cls.dtype), (b, *self.slots.shape))
        z, _ = self.text_xattn(z, hidden, mask)                                  # slots read the text
        z, probs = self.image_xattn(z, patches)                                  # then ground in patches
        w = jax.nn.softmax(self.slot_score(self.slot_norm(z))[..., 0].astype(jnp.float32), axis=-1)  # [b, K]
        f_m = jnp.einsum("bk,bkh->bh", w.astype(z.dtype), z)
        a = self.app_norm(f_m + cls)[:, None]                                    # [b, 1, H]
        f_a, _ = self.app_attn(a, patches)
        f_a = constrain(f_a[:, 0], ("batch", "embed"))
        f = self.sem_proj(f_m) + self.gate[...].astype(f_m.dtype) * self.app_proj(f_a)
        return {"item": l2_normalize(f.astype(jnp.float32)), "semantic": f_m, "appearance": f_a,
                "slot_maps": jnp.mean(probs, axis=1), "slot_weights": w}

    def item_outputs(self, images: Array, ids: Array, mask: Array, neg_ids: Array | None = None,
                     neg_mask: Array | None = None) -> dict[str, Array]:
        """images [b, h, w, 3], ids/mask [b, s] (and a negative text neg_ids/neg_mask [b, s]) ->
        {"item", "text", ["hard"]} [b, D], "patches" [b, n, H], "slot_maps" [b, K, n], "slot_weights" [b, K].
        "hard" is the image fused with the negative text (image–text mismatch hard negative)."""
        cls, patches = self.encode_image(images)
        b = cls.shape[0]
        if neg_ids is not None:  # one pass over [true texts; negative texts], images repeated
            ids, mask = jnp.concatenate([ids, neg_ids]), jnp.concatenate([mask, neg_mask])
            cls, patches = jnp.concatenate([cls, cls]), jnp.concatenate([patches, patches])
        hidden = self.text(ids, mask)
        fused = self.fuse(cls, patches, hidden, mask)
        out = {"item": fused["item"][:b], "patches": patches[:b], "text": self.text_embedding(hidden[:b], mask[:b]),
               "slot_maps": fused["slot_maps"][:b], "slot_weights": fused["slot_weights"][:b]}
        if neg_ids is not None:
            out["hard"] = fused["item"][b:]
        return out

    def attention_maps(self, images: Array, ids: Array, mask: Array) -> dict[str, Array]:
        """For heat maps: images, ids, mask -> {"slot_maps" [b, K, g, g], "slot_weights" [b, K],
        "heatmap" [b, g, g] (slot maps weighted by the slot pooling weights)}."""
        g = self.config.item_vit.grid
        out = self.item_outputs(images, ids, mask)
        maps = out["slot_maps"].reshape(images.shape[0], -1, g, g)
        heat = jnp.einsum("bk,bkyx->byx", out["slot_weights"], maps)
        return {"slot_maps": maps, "slot_weights": out["slot_weights"], "heatmap": heat}


VARIANTS: dict[str, type[_Base]] = {"tigerfg": TigerFG, "clip": ClipStyle, "late_fusion": LateFusion}


def build_model(cfg: TigerFGConfig, *, rngs: nnx.Rngs, dtype=jnp.float32) -> Any:
    """The variant ``cfg.name`` (``tigerfg`` | ``clip`` | ``late_fusion``)."""
    return VARIANTS[cfg.name](cfg, dtype=dtype, rngs=rngs)


def teacher_vit(cfg: ViTConfig, seed: int, dtype=jnp.float32) -> ViT:
    """The frozen distillation teacher: a ViT whose weights come from ``seed`` (callers ``stop_gradient``).

    It is not part of the trained model's parameters, so no optimizer ever sees it. Built so that it can
    be created inside a traced train step cheaply: every weight matrix is drawn from one
    ``N(0, 0.02^2)`` vector (BERT's init scale) from an ``rbg`` key, LayerNorm scales are 1 and biases 0:
    one cheap RNG op instead of one threefry per parameter, which keeps XLA's CPU compile time down.
    """
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(abstract)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    sizes = [int(math.prod(leaf.shape)) for _, leaf in flat]
    noise = 0.02 * jax.random.normal(jax.random.key(seed, impl="rbg"), (sum(sizes),), jnp.float32)
    leaves, offset = [], 0
    for (path, leaf), size in zip(flat, sizes):
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        names = [str(getattr(p, "key", p)) for p in path]
        if leaf.ndim <= 1 and ("scale" in names or name == "scale"):
            leaves.append(jnp.ones(leaf.shape, jnp.float32))
        elif leaf.ndim <= 1 and not ("cls_token" in names or name == "cls_token"):
            leaves.append(jnp.zeros(leaf.shape, jnp.float32))
        else:
            leaves.append(noise[offset:offset + size].reshape(leaf.shape))
        offset += size
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
