"""KuaiSearch recall: query -> items with a DPR dual encoder (shared SDE or asymmetric ADE).

    ecomax train --config configs/kuaisearch_recall.py:tiny --workdir runs/ks_recall
    ecomax train --config configs/kuaisearch_recall.py:lite --workdir W --set data.root=DIR --set model.name=dpr_ade

Data (``data_pipelines/kuaisearch/examples.py``): a query per session, relevant = clicked ∪ purchased,
train/test from the row's ``split``, sessions without interaction dropped. A training example is a
query, one of its relevant items (drawn per step) and one random corpus item that is not relevant
(drawn per step in the transform), all as ``<s> text </s>`` sentencepiece ids.

Loss: DPR's InfoNCE over the batch's positives and random negatives (``trainers/losses/contrastive.py:dpr_loss``).

Evaluation on the test sessions over the whole item corpus (``evaluate_retrieval``, ScaNN above ~20k
items): ``recall@k``, ``hit_rate@k``, ``mrr`` for k = 10, 20, 50 (the ANN's numbers when one ran,
else the exact ones; ``exact/...`` always), and the trivial baselines computed on the same queries:
``popularity/...`` (items ranked by train click count) and, with ``eval.bm25``, ``bm25/...``
(Okapi BM25 over the same token ids), both from ``trainers/evaluators/baselines.py``. Data: the
``RecallWorld`` and ``RecallTransform`` of ``data_pipelines/kuaisearch/``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data_pipelines.kuaisearch import examples as ex
from data_pipelines.kuaisearch.transforms import RecallTransform
from data_pipelines.kuaisearch.worlds import RecallWorld, batched
from models.kuaisearch_text import DualEncoder, DualEncoderConfig
from models.text_encoder import TextEncoderConfig, l2_normalize
from trainers.losses import dpr_loss
from trainers.tasks import Batch, Corpus, EvalContext, Metrics, Task, Tower, register

MODEL_NAMES = {"dpr_sde": True, "dpr_ade": False}  # name -> shared encoder


# ----------------------------------------------------------------------------- shared with relevance


def encoder_config(m: ml_collections.ConfigDict, vocab_size: int, *, pooler: bool = False) -> TextEncoderConfig:
    """The BERT-family encoder of ``config.model`` (``hidden, depth, heads, mlp_dim, max_positions``)."""
    return TextEncoderConfig(vocab_size=vocab_size, hidden=m.hidden, depth=m.depth, heads=m.heads,
                             mlp_dim=m.mlp_dim, max_len=m.max_positions, type_vocab=2, pooler=pooler)


# ----------------------------------------------------------------------------- task


def _embed_query(model: DualEncoder, ids: jax.Array, mask: jax.Array, normalize: bool) -> jax.Array:
    e = model.encode_query(ids, mask).astype(jnp.float32)
    return l2_normalize(e) if normalize else e


def _embed_item(model: DualEncoder, ids: jax.Array, mask: jax.Array, normalize: bool) -> jax.Array:
    e = model.encode_item(ids, mask).astype(jnp.float32)
    return l2_normalize(e) if normalize else e


@register("kuaisearch_recall")
class KuaiSearchRecallTask(Task):
    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        if config.model.name not in MODEL_NAMES:
            raise ValueError(f"model.name {config.model.name!r}: expected one of {sorted(MODEL_NAMES)}")
        if config.model.similarity not in ("dot", "cosine"):
            raise ValueError(f"model.similarity {config.model.similarity!r}: expected 'dot' or 'cosine'")

    @functools.cached_property
    def world(self) -> RecallWorld:
        return RecallWorld.load(self.config.data, max_vocab=self.config.model.vocab_size)

    @property
    def cosine(self) -> bool:
        return self.config.model.similarity == "cosine"

    def model_config(self) -> DualEncoderConfig:
        m = self.config.model
        vocab = m.vocab_size or self.world.tokenizer.vocab_size
        return DualEncoderConfig(encoder_config(m, vocab, pooler=m.pooling == "pooler"),
                                 shared=MODEL_NAMES[m.name], pooling=m.pooling)

    def build_model(self, rngs: nnx.Rngs) -> DualEncoder:
        return DualEncoder(self.model_config(), rngs=rngs)

    def loss(self, model: DualEncoder, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        q = model.encode_query(batch["query_ids"], batch["query_mask"])
        # positives and negatives in one encoder pass (a smaller program to compile): [2b, s] -> [2b, d]
        items = model.encode_item(jnp.concatenate([batch["pos_ids"], batch["neg_ids"]]),
                                  jnp.concatenate([batch["pos_mask"], batch["neg_mask"]]))
        pos, neg = jnp.split(items, 2)
        if self.cosine:
            q, pos, neg = l2_normalize(q), l2_normalize(pos), l2_normalize(neg)
        loss, accuracy = dpr_loss(q, pos, neg, self.config.model.scale)
        return loss, {"in_batch_accuracy": accuracy}

    def train_source(self):
        w, d = self.world, self.config.data
        return w.training_pairs(), RecallTransform(w.tokenizer, w.corpus.texts, d.query_len, d.item_len)

    def inputs(self) -> dict[str, jax.ShapeDtypeStruct]:
        d, spec = self.config.data, {}
        for name, length in (("query", d.query_len), ("pos", d.item_len), ("neg", d.item_len)):
            spec[f"{name}_ids"] = jax.ShapeDtypeStruct((length,), np.int32)
            spec[f"{name}_mask"] = jax.ShapeDtypeStruct((length,), np.bool_)
        return spec

    @functools.cached_property
    def _towers(self) -> dict[str, Tower]:
        spec, norm = self.inputs(), self.cosine
        return {"query": Tower(functools.partial(_embed_query, normalize=norm),
                               {"query_ids": spec["query_ids"], "query_mask": spec["query_mask"]}),
                "item": Tower(functools.partial(_embed_item, normalize=norm),
                              {"item_ids": spec["pos_ids"], "item_mask": spec["pos_mask"]})}

    def towers(self) -> dict[str, Tower]:
        return self._towers

    def export_corpus(self, name: str = "eval", size: int | None = None) -> Corpus:
        """The item corpus for ``ecomax export --format scann``: the ``item`` tower's inputs in batches of
        ``(item ids [n], (ids, mask))``."""
        if name not in ("eval", "items"):
            raise ValueError(f"kuaisearch_recall has one export corpus, 'eval' (every item); got {name!r}")
        w, d = self.world, self.config.data
        n = len(w.corpus) if size is None else min(int(size), len(w.corpus))

        def batches():
            for s in batched(n, self.config.eval.batch_size):
                yield w.corpus.ids[s], ex.encode_texts(w.tokenizer, w.corpus.texts[s], d.item_len)

        return Corpus("item", batches(), {"name": name, "size": n, "source": str(w.root), "ids": "item_id",
                                          "text": "title brand categories"})

    # --- evaluation -----------------------------------------------------------------------------------

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        from trainers.evaluators.baselines import query_baselines  # noqa: PLC0415
        from trainers.evaluators.retrieval import evaluate_retrieval  # noqa: PLC0415

        w, d, e = self.world, self.config.data, self.config.eval
        ks = tuple(int(k) for k in e.ks)
        towers = self.towers()
        queries = w.eval_queries(e.split, e.max_examples)
        relevant = [q.relevant for q in queries]
        q_ids, q_mask = ex.encode_texts(w.tokenizer, [q.query for q in queries], d.query_len)
        i_ids, i_mask = ex.encode_texts(w.tokenizer, w.corpus.texts, d.item_len)
        q_emb = ctx.apply(towers["query"].fn, q_ids, q_mask, batch_size=e.batch_size)
        i_emb = ctx.apply(towers["item"].fn, i_ids, i_mask, batch_size=e.batch_size)
        res = evaluate_retrieval(q_emb, i_emb, w.corpus.ids, relevant, ks=ks, ann=e.ann, normalize=self.cosine)
        src = "ann" if res.get("ann_kind", "none") != "none" else "exact"
        out: dict[str, Any] = {}
        for key in [f"recall@{k}" for k in ks] + [f"hit_rate@{k}" for k in ks] + ["mrr"]:
            out[key] = res[f"{src}/{key}"]
            out[f"exact/{key}"] = res[f"exact/{key}"]
        for key in ("num_queries", "num_gallery", "num_relevant_not_in_gallery", "ann_recall_vs_exact"):
            if key in res:
                out[key] = res[key]

        out.update(query_baselines(w.corpus.ids, w.clicks, relevant, ks, bm25=(
            q_ids, q_mask, i_ids, i_mask, w.tokenizer.vocab_size) if e.bm25 else None))
        return out
