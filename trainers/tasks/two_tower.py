"""The first task: an image–text two-tower model trained with CLIP's symmetric InfoNCE on procedural shapes.

Evaluation: text -> image retrieval over a held-out gallery; an image is relevant to a caption when it
shows the same class (shape, colour, pattern, size).
"""

from __future__ import annotations

import types
from typing import Any

import jax
import numpy as np
from flax import nnx

from data_pipelines import shapes
from data_pipelines.loader import InMemorySource, eval_batches
from models.two_tower import TwoTower, TwoTowerConfig
from trainers.losses import symmetric_info_nce
from trainers.tasks import Batch, EvalContext, Metrics, Task, Tower, register


def _embed_images(model: TwoTower, images: jax.Array) -> jax.Array:
    """``uint8 [b, h, w, 3] -> [b, d]``: images travel as bytes and are normalised on device."""
    return model.image(shapes.normalise_image(images))


def _embed_texts(model: TwoTower, tokens: jax.Array) -> jax.Array:
    return model.text(tokens)


@register("two_tower")
class TwoTowerTask(Task):
    def model_config(self) -> TwoTowerConfig:
        m = self.config.model
        return TwoTowerConfig(image_size=self.config.data.image_size, patch_size=m.patch_size,
                              vocab_size=len(shapes.VOCAB), max_words=self.config.data.max_words,
                              width=m.width, depth=m.depth, mlp_ratio=m.mlp_ratio, embed_dim=m.embed_dim)

    def build_model(self, rngs: nnx.Rngs) -> TwoTower:
        return TwoTower(self.model_config(), rngs)

    def loss(self, model: TwoTower, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        image_emb = _embed_images(model, batch["image"])
        text_emb = model.text(batch["tokens"])
        loss = symmetric_info_nce(image_emb, text_emb, model.logit_scale[...])
        return loss, {"logit_scale": model.logit_scale[...]}

    def train_source(self):
        d = self.config.data
        source = shapes.ShapesSource(d.num_train, d.image_size, d.max_words, seed=self.config.seed)
        return (InMemorySource(source, "render shapes") if d.in_memory else source), None

    def towers(self) -> dict[str, Tower]:
        d = self.config.data
        return {"image": Tower(_embed_images, {"image": jax.ShapeDtypeStruct((d.image_size, d.image_size, 3),
                                                                              np.uint8)}),
                "text": Tower(_embed_texts, {"tokens": jax.ShapeDtypeStruct((d.max_words,), np.int32)})}

    def heldout(self, size: int | None = None) -> shapes.ShapesSource:
        """The held-out world that evaluation searches and export indexes: another seed than training."""
        d = self.config.data
        return shapes.ShapesSource(size or d.num_eval, d.image_size, d.max_words, seed=self.config.seed + 10_007)

    def export_corpus(self, name: str = "eval", size: int | None = None) -> Any:
        """The held-out images as ``(ids [n], (uint8 images,))`` batches (duck-typed ``launch.export.Corpus``)."""
        if name != "eval":
            raise ValueError(f"two_tower has one export corpus, 'eval' (the held-out images); got {name!r}")
        source, bs = self.heldout(size), self.config.eval.batch_size
        batches = ((np.arange(i, i + len(b["image"]), dtype=np.int64), (b["image"],))
                   for i, b in zip(range(0, len(source), bs), eval_batches(source, bs)))
        return types.SimpleNamespace(tower="image", batches=batches, description={
            "name": name, "size": len(source), "source": "ShapesSource", "seed": source.seed,
            "ids": "example index in the source"})

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        from trainers.evaluators.retrieval import evaluate_retrieval

        image_emb, text_emb, labels = [], [], []
        for batch in eval_batches(self.heldout(), self.config.eval.batch_size):
            image_emb.append(ctx.apply(_embed_images, batch["image"]))
            text_emb.append(ctx.apply(_embed_texts, batch["tokens"]))
            labels.append(batch["label"])
        labels = np.concatenate(labels)
        by_class: dict[int, set[int]] = {}
        for i, label in enumerate(labels.tolist()):
            by_class.setdefault(label, set()).add(i)
        results = evaluate_retrieval(np.concatenate(text_emb), np.concatenate(image_emb), np.arange(len(labels)),
                                     [by_class[label] for label in labels.tolist()], ks=(1, 5, 10), ann="exact")
        return {f"text_to_image/{k}": v for k, v in results.items()}
