"""TIGER-FG on ECom-RF-IMMR: cropped product photo -> multimodal item (image(s) + structured text).

Model (``config.model.name``): ``tigerfg`` (text-conditioned visual slots + appearance branch),
``clip`` (item = image only) or ``late_fusion`` (item = image CLS + text, added). See ``models/tigerfg.py``.

Loss = ``sum_t config.loss.t * L_t`` over the terms of ``trainers/losses/tigerfg.py`` (a weight of 0
switches a term off; terms a variant cannot compute, e.g. text terms for ``clip``, are skipped): ``q2i``
(query -> item InfoNCE with image–text-mismatch hard negatives, sharded over the batch axes), ``v2t``
(box region <-> item text), ``i2v`` (region -> fused item), ``srd`` (patch-relation distillation inside
the box) and ``sdd`` (similarity-distribution distillation from a teacher that sees the boxed target).

The teacher: with ``--set init_from.teacher.path=RUN`` (the stage-1 run of ``configs/tigerfg.py:SIZE_teacher``,
or a Hugging Face ViT with ``format=hf``; or ``teacher.in_params=True``) a ``teacher`` subtree of the
parameters, frozen by ``optimizer.frozen="^teacher/"``; without, a frozen random-feature ViT that is **not a
parameter**: rebuilt inside the step from ``config.teacher.seed``, never updated, not in checkpoints. Its
L_SDD side compares its pooled query crop with its embedding of the item's boxed target (``teacher.region``:
``crop``, the box cropped and resized, or ``patches``, the mean of its patch tokens in the box).
``loss.item_view="box_crop"`` gives the item tower the boxed target instead of the image (stage 1).

Data (``data_pipelines/ecom_rf_immr/world.py``): the built dataset of ``data.root`` (with
``data.tokenizer``), else ECom-RF-IMMR synthesised once per parameter set; training examples carry a
negative item text (``neg_ids``, ``neg_mask``, ``neg_index``: another target of the same mosaic canvas,
else another product), and with ``data.mosaic_batches`` the items of one canvas share a global batch (the
loader's index shuffle is then off, ``Task.shuffle``). ``evaluate`` embeds the unique test items with the
item tower and the test queries with the query tower, and scores Normal and Mosaic queries separately
(gallery = all test items, with their normal images resp. their mosaic canvases), in batches of
``eval.batch_size``. Slot heat maps: ``trainers/evaluators/heatmaps.py``.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.ecom_rf_immr import world
from data_pipelines.ecom_rf_immr.pipeline import photometric
from models.text_encoder import TextEncoderConfig, l2_normalize, mean_pool
from models.tigerfg import TigerFGConfig, box_patch_mask, build_model, crop_boxes, teacher_vit
from models.vit import ViT, ViTConfig
from trainers.flops import accumulate, matmul, text_encoder_forward, vit_forward
from trainers.losses import i2v_loss, q2i_loss, sdd_loss, srd_loss, v2t_loss
from trainers.tasks import Batch, EvalContext, Metrics, Task, Tower, register

LAYOUTS = ("normal", "mosaic")


# --- serving functions (module level: stable identities for EvalContext.apply's cache) ------------------


def pixels(images: jax.Array, jitter: jax.Array | None = None) -> jax.Array:
    """Model input from a batch's images: uint8 [b, h, w, 3] (``data.photometric="device"``) are colour-jittered
    by ``jitter`` [b, 3] and normalised here, inside the step; float32 ones come normalised from the host."""
    return photometric(images, jitter, xp=jnp) if images.dtype == jnp.uint8 else images


def embed_queries(model, images: jax.Array) -> jax.Array:
    """Query tower: images [b, h, w, 3] (uint8 pixels or normalised float) -> [b, D]."""
    return model.embed_query(pixels(images))


def embed_items(model, images: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Item tower: images [b, h, w, 3] (uint8 pixels or normalised float), ids/mask [b, s] -> [b, D]."""
    return model.embed_item(pixels(images), ids, mask)


# --- the task -------------------------------------------------------------------------------------------


@register("tigerfg")
class TigerFGTask(Task):

    # model ------------------------------------------------------------------------------------------

    def model_config(self) -> TigerFGConfig:
        m, d = self.config.model, self.config.data

        def vit(v) -> ViTConfig:
            return ViTConfig(image_size=d.image_size, patch_size=v.patch_size, hidden=v.hidden, depth=v.depth,
                             heads=v.heads, mlp_dim=v.mlp_dim)

        t = m.text
        text = TextEncoderConfig(vocab_size=t.vocab_size, hidden=t.hidden, depth=t.depth, heads=t.heads,
                                 mlp_dim=t.mlp_dim, max_len=max(t.max_len, d.max_text_len), pooler=False)
        return TigerFGConfig(name=m.name, query_vit=vit(m.query_vit), item_vit=vit(m.item_vit), text=text,
                             embed_dim=m.embed_dim, proj_bias=m.proj_bias, num_slots=m.num_slots,
                             fusion_heads=m.fusion_heads, share_image_encoder=m.share_image_encoder)

    def teacher_config(self) -> ViTConfig:
        t, item = self.config.teacher, self.model_config().item_vit
        return ViTConfig(image_size=item.image_size, patch_size=item.patch_size, hidden=t.hidden, depth=t.depth,
                         heads=t.heads, mlp_dim=t.mlp_dim)

    @property
    def teacher_in_params(self) -> bool:
        """The teacher is a frozen ``teacher`` subtree of the parameters (loadable with ``init_from.teacher``)."""
        imported = self.config.get("init_from", {}).get("teacher", {}).get("path", "")
        return bool(self.config.teacher.get("in_params", False) or imported)

    def build_model(self, rngs: nnx.Rngs):
        dtype = jnp.dtype(self.config.train.compute_dtype)
        model = build_model(self.model_config(), rngs=rngs, dtype=dtype)
        if self.teacher_in_params:
            # frozen by the config's optimizer.frozen="^teacher/" (no update, no optimizer state)
            model.teacher = ViT(self.teacher_config(), rngs=rngs, dtype=dtype)
        return model

    # loss -------------------------------------------------------------------------------------------

    def loss(self, model, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        w = self.config.loss
        scale = jnp.exp(jnp.minimum(model.logit_scale[...].astype(jnp.float32), jnp.log(100.0)))
        query_image = pixels(batch["query_image"], batch.get("query_jitter"))
        item_image = pixels(batch["item_image"], batch.get("item_jitter"))
        q = model.embed_query(query_image)
        use_hard = model.uses_text and w.hard_negatives
        valid = batch["has_box"].astype(bool)
        box = batch["target_box"]
        target = jnp.where(valid[:, None], box, jnp.array([0.0, 0.0, 1.0, 1.0], box.dtype))  # no box: the image
        images = item_image
        if w.get("item_view", "image") == "box_crop":  # a teacher's training: the item tower sees the boxed target
            images = crop_boxes(images, target)
        out = model.item_outputs(images, batch["item_ids"], batch["item_mask"],
                                 batch["neg_ids"] if use_hard else None, batch["neg_mask"] if use_hard else None)
        item, hard = out["item"], out.get("hard")
        terms: dict[str, jax.Array] = {}
        if w.q2i:
            terms["q2i"] = q2i_loss(q, item, scale, item_index=batch["item_index"], hard=hard,
                                    hard_index=batch["neg_index"])
        if model.uses_text and (w.v2t or w.i2v):
            region = model.region_embedding(out["patches"], box)
            if w.v2t:
                terms["v2t"] = v2t_loss(region, out["text"], scale, valid)
            if w.i2v:
                terms["i2v"] = i2v_loss(item, region, scale, valid, hard=hard)
        if w.srd or w.sdd:
            teacher = (model.teacher if self.teacher_in_params
                       else teacher_vit(self.teacher_config(), self.config.teacher.seed, dtype=q.dtype))
            t_tokens = jax.lax.stop_gradient(teacher(item_image))
            t_patches = teacher.patch_tokens(t_tokens)
            box_mask = box_patch_mask(box, self.teacher_config().grid)
            if w.srd:
                terms["srd"] = srd_loss(out["patches"], t_patches, box_mask, valid)
            if w.sdd:
                t_query = l2_normalize(jax.lax.stop_gradient(teacher.pooled(query_image)).astype(jnp.float32))
                if self.config.teacher.get("region", "crop") == "crop":  # the teacher embeds the boxed target
                    t_region = teacher.pooled(crop_boxes(item_image, target))
                else:  # "patches": the mean of its patch tokens in the box (one teacher pass less)
                    t_region = mean_pool(t_patches, jnp.where(valid[:, None], box_mask, 1.0))
                t_region = l2_normalize(jax.lax.stop_gradient(t_region).astype(jnp.float32))
                terms["sdd"] = sdd_loss(q @ item.T, t_query @ t_region.T, student_temp=w.sdd_student_temp,
                                        teacher_temp=w.sdd_teacher_temp)
        total = sum(getattr(w, k) * v for k, v in terms.items())
        return total, {**{f"loss_{k}": v for k, v in terms.items()}, "logit_scale": scale}

    # data -------------------------------------------------------------------------------------------

    @functools.cached_property
    def root(self) -> pathlib.Path:
        """Folder with ``data/`` (the built dataset) and ``spm.model``: ``data.root``, else synthesised once."""
        return world.dataset_root(self.config.data)

    @functools.cached_property
    def tokenizer(self):
        path = self.config.data.get("tokenizer") or self.root / "spm.model"
        return world.load_tokenizer(path, self.config.model.text.vocab_size)

    def _split(self, split: str):
        return world.open_split(self.root, split)

    def transform(self, train: bool):
        return world.record_transform(self.config.data, self.tokenizer, train=train)

    def train_source(self):
        t = self.config.train
        source, transform = world.training_source(self._split("train"), self.transform(train=True),
                                                  self.config.data, batch_size=t.batch_size, steps=t.steps,
                                                  seed=self.config.seed)
        if self.config.data.get("mosaic_batches", False):
            self.shuffle = False  # the mosaic-grouped order replaces the loader's index shuffle
        return source, transform

    def inputs(self) -> dict[str, jax.ShapeDtypeStruct]:
        """One example's shapes from the config alone (no data needed to compile)."""
        d = self.config.data
        on_device = d.get("photometric", "host") == "device"  # uint8 pixels + jitter factors, normalised in the step
        img = jax.ShapeDtypeStruct((d.image_size, d.image_size, 3), np.uint8 if on_device else np.float32)
        txt = lambda dt: jax.ShapeDtypeStruct((d.max_text_len,), dt)  # noqa: E731
        one = lambda dt, *s: jax.ShapeDtypeStruct(s, dt)  # noqa: E731
        jitter = {"query_jitter": one(np.float32, 3), "item_jitter": one(np.float32, 3)} if on_device else {}
        return {"query_image": img, "item_image": img, "item_ids": txt(np.int32), "item_mask": txt(np.bool_),
                "item_index": one(np.int32), "target_box": one(np.float32, 4), "has_box": one(np.bool_),
                "is_mosaic": one(np.bool_), "neg_ids": txt(np.int32), "neg_mask": txt(np.bool_),
                "neg_index": one(np.int32), **jitter}

    def forward_flops(self, batch_size: int) -> dict[str, float]:
        """Encoder matmuls of one step (query ViT, item ViT, item + negative texts, the q2i logits) and the
        frozen teacher's passes (``frozen/``: forward only); the slot fusion and box terms are left out."""
        m, w, b = self.model_config(), self.config.loss, batch_size
        out: dict[str, float] = {}
        accumulate(out, vit_forward(m.query_vit, b), prefix="query_vit/")
        accumulate(out, vit_forward(m.item_vit, b), prefix="item_vit/")
        if m.name != "clip":
            texts = 2 if w.hard_negatives else 1
            accumulate(out, text_encoder_forward(m.text, b, self.config.data.max_text_len), texts, "text/")
        out["loss/logits"] = 2 * matmul(b, m.embed_dim, b)
        if w.srd or w.sdd:
            crop = self.config.teacher.get("region", "crop") == "crop"
            passes = 1 + (bool(w.sdd) + (bool(w.sdd) and crop))  # item image; query and box crop for L_SDD
            accumulate(out, vit_forward(self.teacher_config(), b), passes, "frozen/teacher/")
        return out

    # serving and evaluation -------------------------------------------------------------------------

    def towers(self) -> dict[str, Tower]:
        spec = self.inputs()
        return {"query": Tower(embed_queries, {"query_image": spec["query_image"]}),
                "item": Tower(embed_items, {k: spec[k] for k in ("item_image", "item_ids", "item_mask")})}

    def eval_sets(self) -> dict[str, dict[str, np.ndarray]]:
        """Per layout, the test queries and the gallery of unique test items (``world.eval_sets``). Cached."""
        if getattr(self, "_eval_sets", None) is None:
            records = list(self._split(self.config.data.eval_split))
            self._eval_sets = world.eval_sets(records, self.transform(train=False), LAYOUTS)
        return self._eval_sets

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        from trainers.evaluators.retrieval import evaluate_retrieval

        results: dict[str, float] = {}
        for layout, s in self.eval_sets().items():
            bs = self.config.eval.batch_size
            q = ctx.apply(embed_queries, s["query_image"], batch_size=bs)
            g = ctx.apply(embed_items, s["item_image"], s["item_ids"], s["item_mask"], batch_size=bs)
            res = evaluate_retrieval(q, g, s["item_index"], s["relevant"], ks=(1, 5, 10), ann="auto",
                                     out_dir=ctx.workdir / "retrieval" / f"step_{ctx.step}" / layout)
            results.update({f"{layout}/{k}": float(v) for k, v in res.items()
                            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)})
        return results
