"""TIGER-FG on ECom-RF-IMMR: cropped product photo -> multimodal item (image(s) + structured text).

Model (``config.model.name``): ``tigerfg`` (text-conditioned visual slots + appearance branch),
``clip`` (item = image only) or ``late_fusion`` (item = image CLS + text, added). See ``models/tigerfg.py``.

Loss = ``sum_t config.loss.t * L_t`` over the terms of ``trainers/losses/tigerfg.py`` (a weight of 0
switches a term off; terms a variant cannot compute, e.g. text terms for ``clip``, are skipped):

* ``q2i``  query -> item InfoNCE, in-batch negatives + image–text-mismatch hard negatives (the item
           image fused with a negative text, see below), sharded over the batch axes;
* ``v2t``  region (student patches pooled in the target box) <-> item text;
* ``i2v``  region -> fused item, the cross-category hard negative as an extra negative;
* ``srd``  patch-relation distillation from the frozen teacher inside the box;
* ``sdd``  KL(teacher || student) of in-batch query -> candidate similarity distributions, the
           teacher comparing the query with the *boxed target region* (privileged at training time).

By default the teacher is a frozen ViT that is **not a parameter**: it is rebuilt inside the step from
``config.teacher.seed`` (XLA computes the weights from the seed; outputs are ``stop_gradient``-ed), so no
optimizer can update it and checkpoints do not carry it: a random-feature teacher. With
``--set init_from.teacher.path=HF_VIT_FOLDER`` (or ``teacher.in_params=True``) the teacher is instead a
``teacher`` subtree of the parameters, frozen by ``optimizer.frozen="^teacher/"`` (no update, no optimizer
state), filled from the pretrained checkpoint when the run starts and carried by checkpoints.

Negative text per example (batch keys ``neg_ids``, ``neg_mask``, ``neg_index``), added by this task's
transform: with ``data.mosaic_grouping`` a training record on a mosaic canvas takes the text of another
target of the same canvas (a product of another category: the text must select the target, the grouping's
purpose); other records take the text of a random other training record. With ``data.mosaic_batches`` the
training order itself is mosaic-grouped (``MosaicGroupedSource``: the items of one canvas share a global
batch, as the paper trains) and the loader's index shuffle is turned off (``Task.shuffle``).
``data.mosaic_training=False`` drops the mosaic-canvas training records (the paper's "w/o Mosaic" setting).

Data: ``train_source`` synthesises ECom-RF-IMMR once per parameter set (``data_pipelines.cache``:
synthesize + build + a sentencepiece model on the training item texts) unless ``data.data_dir`` names a
built dataset (with ``data.tokenizer``). ``evaluate`` embeds the unique test items with the item tower and
the test queries with the query tower, and scores Normal and Mosaic queries separately (gallery = all test
items, with their normal images resp. their mosaic canvases).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.ecom_rf_immr import schema
from data_pipelines.ecom_rf_immr.pipeline import MosaicGroupedSource
from models.text_encoder import TextEncoderConfig, l2_normalize, mean_pool
from models.tigerfg import TigerFGConfig, box_patch_mask, build_model, teacher_vit
from models.vit import ViT, ViTConfig
from trainers.losses import i2v_loss, q2i_loss, sdd_loss, srd_loss, v2t_loss
from trainers.tasks import Batch, EvalContext, Metrics, Task, Tower, register

LAYOUTS = ("normal", "mosaic")


def _record_text(record: Mapping[str, Any]) -> str:
    return schema.item_text(record["title"], list(record["category"]), list(record["attribute_keys"]),
                            list(record["attribute_values"]))


# --- serving functions (module level: stable identities for EvalContext.apply's cache) ------------------


def embed_queries(model, images: jax.Array) -> jax.Array:
    """Query tower: images [b, h, w, 3] -> [b, D]."""
    return model.embed_query(images)


def embed_items(model, images: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Item tower: images [b, h, w, 3], ids/mask [b, s] -> [b, D]."""
    return model.embed_item(images, ids, mask)


def item_attention_maps(model, images: jax.Array, ids: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """TIGER-FG slot attention over the item's patches (``TigerFG.attention_maps``)."""
    return model.attention_maps(images, ids, mask)


# --- data -----------------------------------------------------------------------------------------------


class _Indexed:
    """A view of ``source`` at ``indices`` whose records also carry ``_index`` (the position in ``source``)."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        j = int(self.indices[int(i)])
        return {**self.source[j], "_index": j}


class NegativeTextTransform(grain.transforms.RandomMap):
    """The ECom-RF-IMMR ``RecordTransform`` plus a negative item text per example.

    Adds ``neg_ids [s] int32``, ``neg_mask [s] bool``, ``neg_index [] int64``: the text of another
    target on the same mosaic canvas (``mosaic_grouping`` and a canvas record) or of a random other
    training record (another product).
    """

    def __init__(self, base, source, groups: np.ndarray, item_index: np.ndarray, *, mosaic_grouping: bool,
                 tokenizer, max_text_len: int):
        self.base, self.source, self.tokenizer, self.max_text_len = base, source, tokenizer, max_text_len
        self.groups, self.item_index = np.asarray(groups), np.asarray(item_index)
        self.mosaic_grouping = mosaic_grouping
        self.members: dict[int, np.ndarray] = {}
        if mosaic_grouping:
            order = np.argsort(self.groups, kind="stable")
            for g, start, count in zip(*np.unique(self.groups[order], return_index=True, return_counts=True)):
                if g >= 0:
                    self.members[int(g)] = order[start:start + count]

    def _negative(self, index: int, rng: np.random.Generator) -> int:
        own = self.item_index[index]
        group = self.members.get(int(self.groups[index]))
        if group is not None:
            others = group[self.item_index[group] != own]
            if len(others):
                return int(others[rng.integers(len(others))])
        for _ in range(16):
            j = int(rng.integers(len(self.item_index)))
            if self.item_index[j] != own:
                return j
        return (index + 1) % len(self.item_index)

    def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        example = self.base(element, rng)
        j = self._negative(int(element["_index"]), rng)
        ids, mask = self.tokenizer.encode_batch([_record_text(self.source[j])], self.max_text_len)
        example.update(neg_ids=np.asarray(ids[0], np.int32), neg_mask=np.asarray(mask[0], bool),
                       neg_index=np.int64(self.item_index[j]))
        return example

    def __call__(self, element, rng: np.random.Generator | None = None):
        return self.random_map(element, rng if rng is not None else np.random.default_rng(0))


def _build_synthetic(folder: pathlib.Path, *, items: int, queries_per_item: int, seed: int, image_size: int,
                     vocab_size: int) -> None:
    """synthesize + build + a sentencepiece model on the training item texts, into ``folder``."""
    from data_pipelines.ecom_rf_immr import build, synthesize
    from data_pipelines.ecom_rf_immr.builder import open_split
    from data_pipelines.tokenizer import train_sentencepiece

    manifest = synthesize(folder / "raw", items=items, queries_per_item=queries_per_item, seed=seed,
                          image_size=image_size)
    build(manifest, folder / "data", workers=1, progress=False)
    train = open_split(folder / "data", "train")
    texts = sorted({_record_text(r) for r in train})
    train_sentencepiece(texts, folder / "spm.model", vocab_size=vocab_size, seed=seed)


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
        q = model.embed_query(batch["query_image"])
        use_hard = model.uses_text and w.hard_negatives
        out = model.item_outputs(batch["item_image"], batch["item_ids"], batch["item_mask"],
                                 batch["neg_ids"] if use_hard else None, batch["neg_mask"] if use_hard else None)
        item, hard = out["item"], out.get("hard")
        valid = batch["has_box"].astype(bool)
        box = batch["target_box"]
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
            t_tokens = jax.lax.stop_gradient(teacher(batch["item_image"]))
            t_patches = teacher.patch_tokens(t_tokens)
            box_mask = box_patch_mask(box, self.teacher_config().grid)
            if w.srd:
                terms["srd"] = srd_loss(out["patches"], t_patches, box_mask, valid)
            if w.sdd:
                region_mask = jnp.where(valid[:, None], box_mask, 1.0)
                t_query = l2_normalize(jax.lax.stop_gradient(teacher.pooled(batch["query_image"])).astype(jnp.float32))
                t_region = l2_normalize(mean_pool(t_patches, region_mask).astype(jnp.float32))
                terms["sdd"] = sdd_loss(q @ item.T, t_query @ t_region.T, student_temp=w.sdd_student_temp,
                                        teacher_temp=w.sdd_teacher_temp)
        total = sum(getattr(w, k) * v for k, v in terms.items())
        return total, {**{f"loss_{k}": v for k, v in terms.items()}, "logit_scale": scale}

    # data -------------------------------------------------------------------------------------------

    @functools.cached_property
    def data_dir(self) -> pathlib.Path:
        """Folder with ``data/`` (the built dataset) and ``spm.model``; synthesised on first use."""
        d = self.config.data
        if d.get("data_dir"):
            return pathlib.Path(d.data_dir)
        from data_pipelines.cache import cached_dataset

        params = {"items": d.num_items, "queries_per_item": d.queries_per_item, "seed": d.synth_seed,
                  "image_size": d.synth_image_size, "vocab_size": d.vocab_size, "version": 1}
        build = {k: v for k, v in params.items() if k != "version"}
        return cached_dataset("ecom_rf_immr_synth", params, functools.partial(_build_synthetic, **build))

    @functools.cached_property
    def tokenizer(self):
        from data_pipelines.tokenizer import Tokenizer

        path = self.config.data.get("tokenizer") or self.data_dir / "spm.model"
        tok = Tokenizer.load(path)
        if tok.vocab_size > self.config.model.text.vocab_size:
            raise ValueError(f"tokenizer {path} has {tok.vocab_size} pieces but model.text.vocab_size is "
                             f"{self.config.model.text.vocab_size}")
        return tok

    def _split(self, split: str):
        from data_pipelines.ecom_rf_immr.builder import open_split

        return open_split(self.data_dir / "data", split)

    def transform(self, train: bool):
        from data_pipelines.ecom_rf_immr.pipeline import AugmentConfig, make_transform

        d = self.config.data
        aug = AugmentConfig(query_crop_scale=tuple(d.query_crop_scale), hflip_prob=0.5, augment_item=True)
        return make_transform(image_size=d.image_size, tokenizer=self.tokenizer, max_text_len=d.max_text_len,
                              train=train, augment=aug)

    def train_source(self):
        d = self.config.data
        src = self._split("train")
        groups = src.mosaic_group_ids()
        item_index = np.asarray([r["item_index"] for r in src], np.int64)
        keep = np.arange(len(src)) if d.mosaic_training else np.nonzero(groups < 0)[0]
        transform = NegativeTextTransform(self.transform(train=True), src, groups, item_index,
                                          mosaic_grouping=d.mosaic_grouping, tokenizer=self.tokenizer,
                                          max_text_len=d.max_text_len)
        source = _Indexed(src, keep)
        if d.get("mosaic_batches", False):
            # The paper's Mosaic training: the items of one canvas land in the same global batch, so each
            # is the others' hard negative. The grouped order replaces the loader's index shuffle.
            b = self.config.train.batch_size
            epochs = -(-self.config.train.steps * b // max(len(keep) // b * b, 1)) + 1
            source = MosaicGroupedSource(source, block_size=b, seed=self.config.seed, num_epochs=epochs,
                                         group_ids=groups[keep])
            self.shuffle = False
        return source, transform

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of a global batch from the config alone (no data needed to compile)."""
        d = self.config.data
        img = jax.ShapeDtypeStruct((batch_size, d.image_size, d.image_size, 3), np.float32)
        txt = lambda dt: jax.ShapeDtypeStruct((batch_size, d.max_text_len), dt)  # noqa: E731
        one = lambda dt, *s: jax.ShapeDtypeStruct((batch_size, *s), dt)  # noqa: E731
        return {"query_image": img, "item_image": img, "item_ids": txt(np.int32), "item_mask": txt(np.bool_),
                "item_index": one(np.int32), "target_box": one(np.float32, 4), "has_box": one(np.bool_),
                "is_mosaic": one(np.bool_), "neg_ids": txt(np.int32), "neg_mask": txt(np.bool_),
                "neg_index": one(np.int32)}

    # serving and evaluation -------------------------------------------------------------------------

    def towers(self) -> dict[str, Tower]:
        d = self.config.data
        img = jax.ShapeDtypeStruct((d.image_size, d.image_size, 3), np.float32)
        txt = lambda dt: jax.ShapeDtypeStruct((d.max_text_len,), dt)  # noqa: E731
        return {"query": Tower(embed_queries, {"query_image": img}),
                "item": Tower(embed_items, {"item_image": img, "item_ids": txt(np.int32),
                                            "item_mask": txt(np.bool_)})}

    def eval_sets(self) -> dict[str, dict[str, np.ndarray]]:
        """Per layout: queries (``query_image``, ``relevant`` item index) and the gallery of unique test items
        (``item_image``, ``item_ids``, ``item_mask``, ``item_index``, ``target_box``, ``title``). Cached."""
        if getattr(self, "_eval_sets", None) is None:
            from data_pipelines.ecom_rf_immr.pipeline import stack_examples

            transform = self.transform(train=False)
            records = list(self._split(self.config.data.eval_split))
            sets = {}
            for layout in LAYOUTS:
                recs = [r for r in records if r["layout"] == layout]
                examples = [transform(r) for r in recs]
                first: dict[int, int] = {}
                for k, r in enumerate(recs):
                    first.setdefault(int(r["item_index"]), k)
                gallery = stack_examples([examples[k] for k in first.values()])
                sets[layout] = {
                    "query_image": np.stack([e["query_image"] for e in examples]),
                    "relevant": np.asarray([int(r["item_index"]) for r in recs], np.int64),
                    "item_image": gallery["item_image"], "item_ids": gallery["item_ids"],
                    "item_mask": gallery["item_mask"], "item_index": gallery["item_index"],
                    "target_box": gallery["target_box"],
                    "title": np.asarray([recs[k]["title"] for k in first.values()]),
                }
            self._eval_sets = sets
        return self._eval_sets

    def embed(self, ctx: EvalContext, fn, *arrays: np.ndarray) -> np.ndarray:
        bs = self.config.data.eval_batch_size
        return np.concatenate([ctx.apply(fn, *(a[i:i + bs] for a in arrays))
                               for i in range(0, len(arrays[0]), bs)])

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        from trainers.evaluators.retrieval import evaluate_retrieval

        results: dict[str, float] = {}
        for layout, s in self.eval_sets().items():
            q = self.embed(ctx, embed_queries, s["query_image"])
            g = self.embed(ctx, embed_items, s["item_image"], s["item_ids"], s["item_mask"])
            res = evaluate_retrieval(q, g, s["item_index"], s["relevant"], ks=(1, 5, 10), ann="auto",
                                     out_dir=ctx.workdir / "retrieval" / f"step_{ctx.step}" / layout)
            results.update({f"{layout}/{k}": float(v) for k, v in res.items()
                            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)})
        return results


@dataclasses.dataclass
class HeatMaps:
    """Slot attention of a trained TIGER-FG item tower on a few test items (for heat-map plots)."""

    images: np.ndarray        # [n, h, w, 3] uint8, the item images (denormalised)
    heatmap: np.ndarray       # [n, g, g] slot maps weighted by the slot pooling weights
    slot_maps: np.ndarray     # [n, K, g, g]
    slot_weights: np.ndarray  # [n, K]
    boxes: np.ndarray         # [n, 4] target boxes in [0, 1]
    titles: list[str]


def slot_heatmaps(task: TigerFGTask, ctx: EvalContext, *, layout: str = "mosaic", num_items: int = 4) -> HeatMaps:
    """Slot attention maps of ``num_items`` test gallery items (``layout`` "mosaic" or "normal")."""
    from data_pipelines.ecom_rf_immr.pipeline import IMAGENET_MEAN, IMAGENET_STD

    s = task.eval_sets()[layout]
    n = min(num_items, len(s["item_index"]))
    maps = ctx.apply(item_attention_maps, s["item_image"][:n], s["item_ids"][:n], s["item_mask"][:n])
    pixels = s["item_image"][:n] * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)
    return HeatMaps(images=np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8), heatmap=np.asarray(maps["heatmap"]),
                    slot_maps=np.asarray(maps["slot_maps"]), slot_weights=np.asarray(maps["slot_weights"]),
                    boxes=s["target_box"][:n], titles=[str(t) for t in s["title"][:n]])
