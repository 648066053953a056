"""The first task: an image–text two-tower model trained with CLIP's symmetric InfoNCE on procedural shapes.

Evaluation: text -> image retrieval over a held-out gallery; an image is relevant to a caption when it
shows the same class (shape, colour, pattern, size).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from data_pipelines import shapes
from data_pipelines.loader import InMemorySource
from models.two_tower import TwoTower, TwoTowerConfig
from trainers.flops import two_tower_forward
from trainers.losses import symmetric_info_nce
from trainers.tasks import Batch, Corpus, EvalContext, Metrics, Task, Tower, register


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

    def forward_flops(self, batch_size: int) -> dict[str, float]:
        return two_tower_forward(self.model_config(), batch_size)

    def heldout(self, size: int | None = None) -> dict[str, np.ndarray]:
        """The held-out world that evaluation searches and export indexes (another seed than training)."""
        d = self.config.data
        source = shapes.ShapesSource(size or d.num_eval, d.image_size, d.max_words, seed=self.config.seed + 10_007)
        return InMemorySource(source, "render held-out shapes").gather(np.arange(len(source)))

    def export_corpus(self, name: str = "eval", size: int | None = None) -> Corpus:
        """The held-out images, ids 0..n-1, embedded by the ``image`` tower."""
        if name != "eval":
            raise ValueError(f"two_tower has one export corpus, 'eval' (the held-out images); got {name!r}")
        images, bs = self.heldout(size)["image"], self.config.eval.batch_size
        batches = ((np.arange(s, s + len(images[s:s + bs])), (images[s:s + bs],)) for s in range(0, len(images), bs))
        return Corpus("image", batches, {"name": name, "size": len(images), "source": "ShapesSource",
                                         "seed": self.config.seed + 10_007, "ids": "example index in the source"})

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        from trainers.evaluators.retrieval import evaluate_retrieval

        data, bs = self.heldout(), self.config.eval.batch_size
        labels = data["label"].tolist()
        by_class: dict[int, set[int]] = {}
        for i, label in enumerate(labels):
            by_class.setdefault(label, set()).add(i)
        results = evaluate_retrieval(ctx.apply(_embed_texts, data["tokens"], batch_size=bs),
                                     ctx.apply(_embed_images, data["image"], batch_size=bs), np.arange(len(labels)),
                                     [by_class[label] for label in labels], ks=(1, 5, 10), ann="exact")
        return {f"text_to_image/{k}": v for k, v in results.items()}
