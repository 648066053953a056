"""KuaiSearch relevance: is this item an exact match (score 3) for the query? Cross- or bi-encoder.

    ecomax train --config configs/kuaisearch_relevance.py:tiny --workdir runs/ks_rel [--set model.name=bi]
    ecomax train --config configs/kuaisearch_relevance.py:lite --workdir W --set data.root=DIR

Data (``data_pipelines/kuaisearch/examples.py:relevance_splits``): label = 1 iff score == 3; text =
item_title, brand, seller_name, attr_value; record i % 10 == 0 is test, 1% of the rest (Python
``random.Random(42)`` shuffle) is validation, the others train.

Models (``models/kuaisearch_text.py``): ``model.name=cross`` reads ``<s> query </s> text </s>``
(segments 0/1) and maps the pooled CLS to a logit; ``model.name=bi`` embeds query and text with one
shared encoder and scores ``scale * cos + bias``. Loss: binary cross-entropy on the logit
(``trainers/losses/relevance.py``).

Evaluation on ``eval.split`` (default test): ``roc_auc``, ``pr_auc``, ``accuracy`` and ``macro_f1``
(threshold: probability 0.5), ``logloss``, ``positive_rate``; and the majority-class baseline on the
same records (the most frequent train label predicted for all): ``majority/accuracy``,
``majority/macro_f1``, ``majority/roc_auc`` (0.5: a constant score) and ``majority/pr_auc`` (the
positive rate), from ``trainers/evaluators/metrics.py``. Data: the ``RelevanceWorld`` and the
transforms of ``data_pipelines/kuaisearch/``.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np
from flax import nnx

from data_pipelines.kuaisearch import examples as ex
from data_pipelines.kuaisearch.transforms import BiTransform, CrossTransform, stack
from data_pipelines.kuaisearch.worlds import RelevanceWorld
from models.kuaisearch_text import BiEncoderScorer, CrossEncoder, DualEncoderConfig
from trainers.evaluators.metrics import classification_metrics, majority_metrics
from trainers.losses import binary_relevance_loss
from trainers.tasks import Batch, EvalContext, Metrics, Task, Tower, register
from trainers.tasks.kuaisearch_recall import encoder_config

MODEL_NAMES = ("cross", "bi")


def _cross_logits(model: CrossEncoder, ids: jax.Array, mask: jax.Array, types: jax.Array) -> jax.Array:
    return model(ids, mask, types)


def _bi_logits(model: BiEncoderScorer, q_ids: jax.Array, q_mask: jax.Array, i_ids: jax.Array,
               i_mask: jax.Array) -> jax.Array:
    return model(q_ids, q_mask, i_ids, i_mask)


def _bi_query(model: BiEncoderScorer, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return model.embed_query(ids, mask)


def _bi_item(model: BiEncoderScorer, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return model.embed_item(ids, mask)


def relevance_probabilities(relevance, queries: list[str], texts: list[str], batch_size: int = 1024) -> np.ndarray:
    """A frozen relevance run's (``trainers.frozen.Frozen``) probability that each (query, item text) pair is
    relevant (grade 3) -> ``[n]`` float32."""
    task = relevance.task
    arrays = stack([task.transform()(ex.RelevanceExample(q, t, 0, 0)) for q, t in zip(queries, texts)])
    if task.cross:
        logits = relevance.apply(_cross_logits, arrays["ids"], arrays["mask"], arrays["token_type_ids"],
                                 batch_size=batch_size)
    else:
        logits = relevance.apply(_bi_logits, arrays["query_ids"], arrays["query_mask"], arrays["item_ids"],
                                 arrays["item_mask"], batch_size=batch_size)
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


@register("kuaisearch_relevance")
class KuaiSearchRelevanceTask(Task):
    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        if config.model.name not in MODEL_NAMES:
            raise ValueError(f"model.name {config.model.name!r}: expected one of {MODEL_NAMES}")

    @functools.cached_property
    def world(self) -> RelevanceWorld:
        return RelevanceWorld.load(self.config.data, max_vocab=self.config.model.vocab_size)

    @property
    def cross(self) -> bool:
        return self.config.model.name == "cross"

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        m = self.config.model
        vocab = m.vocab_size or self.world.tokenizer.vocab_size
        enc = encoder_config(m, vocab, pooler=m.pooling == "pooler")
        if self.cross:
            return CrossEncoder(enc, rngs=rngs, pooling=m.pooling)
        return BiEncoderScorer(DualEncoderConfig(enc, shared=True, pooling=m.pooling), rngs=rngs,
                               init_scale=m.init_scale, init_bias=m.init_bias)

    def loss(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        if self.cross:
            logits = model(batch["ids"], batch["mask"], batch["token_type_ids"])
        else:
            logits = model(batch["query_ids"], batch["query_mask"], batch["item_ids"], batch["item_mask"])
        loss, accuracy = binary_relevance_loss(logits, batch["label"])
        return loss, {"accuracy": accuracy}

    def transform(self):
        d = self.config.data
        if self.cross:
            return CrossTransform(self.world.tokenizer, d.max_len)
        return BiTransform(self.world.tokenizer, d.query_len, d.max_len)

    def train_source(self):
        return self.world.records("train"), self.transform()

    def inputs(self) -> dict[str, jax.ShapeDtypeStruct]:
        d = self.config.data
        text = lambda n, dtype=np.int32: jax.ShapeDtypeStruct((n,), dtype)  # noqa: E731
        label = {"label": jax.ShapeDtypeStruct((), np.float32)}
        if self.cross:
            return {"ids": text(d.max_len), "mask": text(d.max_len, np.bool_), "token_type_ids": text(d.max_len),
                    **label}
        return {"query_ids": text(d.query_len), "query_mask": text(d.query_len, np.bool_),
                "item_ids": text(d.max_len), "item_mask": text(d.max_len, np.bool_), **label}

    def towers(self) -> dict[str, Tower]:
        if self.cross:
            return {}
        spec = self.inputs()
        return {"query": Tower(_bi_query, {k: spec[k] for k in ("query_ids", "query_mask")}),
                "item": Tower(_bi_item, {k: spec[k] for k in ("item_ids", "item_mask")})}

    def logits(self, ctx: EvalContext, records: list[ex.RelevanceExample]) -> np.ndarray:
        """Logits ``[n]`` of ``records`` under the model in ``ctx``."""
        arrays = stack([self.transform()(e) for e in records])
        if self.cross:
            out = ctx.apply(_cross_logits, arrays["ids"], arrays["mask"], arrays["token_type_ids"],
                            batch_size=self.config.eval.batch_size)
        else:
            out = ctx.apply(_bi_logits, arrays["query_ids"], arrays["query_mask"], arrays["item_ids"],
                            arrays["item_mask"], batch_size=self.config.eval.batch_size)
        return out.astype(np.float64)

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        e = self.config.eval
        records = self.world.records(e.split, e.max_examples)
        labels = np.array([r.label for r in records], np.int64)
        out: dict[str, float] = {"num_records": len(records), "positive_rate": float(labels.mean())}
        out.update(classification_metrics(labels, self.logits(ctx, records)))
        majority = ex.majority_class([r.label for r in self.world.splits["train"]])
        out.update({f"majority/{k}": v for k, v in majority_metrics(labels, majority).items()})
        return out
