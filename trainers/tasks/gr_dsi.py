"""Generative retrieval on KuaiSearch, DSI-style: a T5 reads the query and generates the semantic ID of an
item to return; decoding is a beam search constrained by the SID trie, so every result exists.

    ecomax gr sids --config configs/gr.py:tiny --out runs/gr_sids
    ecomax train --config configs/gr.py:tiny --workdir runs/gr_dsi --set data.sid_table=runs/gr_sids

Data (``GenerativeWorld``): the recall world's train sessions (query -> the SID of one clicked or
purchased item, drawn per example) mixed with DSI's indexing examples (item text -> its SID,
``data.index_repeats`` per item per pass). Loss: ``trainers/losses/generative.py:dsi_loss``.
Evaluation on the test sessions: beam search (``eval.beams``) -> SIDs -> items (``leaf_items``: an item
per SID with the dedup digit; several items sharing a SID come back together, in table order, ranked by
their SID's score) -> ``recall@k``, ``hit_rate@k``, ``mrr`` with the DPR rows' definitions (relevant =
clicked ∪ purchased), ``valid_sid_rate`` (returned SIDs that are in the table; 1 by construction), and
the ``popularity/`` and ``bm25/`` rows on the same queries.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.kuaisearch import examples as ex
from data_pipelines.kuaisearch.transforms import GenerativeTransform
from data_pipelines.kuaisearch.worlds import GenerativeWorld
from data_pipelines.sid.trie import Trie, TrieConstraint, leaves_to_items
from models.beam_search import beam_search
from models.gr import SIDVocab, code_log_probs, code_step
from models.seq2seq import Seq2Seq, Seq2SeqConfig
from trainers.losses import dsi_loss
from trainers.tasks import Batch, EvalContext, Metrics, Task, Tower, register


def generate(model: Seq2Seq, input_ids: jax.Array, input_mask: jax.Array, trie, *, vocab: SIDVocab, beams: int
             ) -> dict[str, jax.Array]:
    """``input_ids, input_mask [B, S]`` (query pieces, or a history's code tokens) -> the ``beams`` best valid
    SIDs: ``codes [B, W, D]``, ``scores [B, W]`` (log-probabilities, best first) and ``leaves [B, W]`` (trie
    leaf ids, -1 past the valid ones)."""
    context, cache = model.start(input_ids, input_mask, vocab.depth)
    out = beam_search(code_step(model, vocab), context, cache, batch=input_ids.shape[0], beams=beams,
                      sizes=vocab.sizes, constraint=TrieConstraint(trie))
    return {"codes": out.codes, "scores": out.scores, "leaves": out.leaves}


def retrieve(model: Seq2Seq, input_ids: jax.Array, input_mask: jax.Array, *, trie, item_of_leaf: jax.Array,
             vocab: SIDVocab, beams: int) -> dict[str, jax.Array]:
    """The serving function, trie and SID -> item table baked in: ``input_ids, input_mask [B, S]`` ->
    ``items [B, W]`` int32 item ids, best first (-1 past the valid SIDs), and their ``scores [B, W]``. A SID
    shared by several items (no dedup digit) serves its first item here; ``leaves_to_items`` serves all."""
    out = generate(model, input_ids, input_mask, trie, vocab=vocab, beams=beams)
    leaves = out["leaves"]
    return {"items": jnp.where(leaves >= 0, item_of_leaf[jnp.maximum(leaves, 0)], -1), "scores": out["scores"]}


@register("gr_dsi")
class DSITask(Task):
    @property
    def sid_sizes(self) -> tuple[int, ...]:
        """``model.sid_sizes`` when set (a paper-scale config lowers from it without data), else the table's."""
        return tuple(int(k) for k in self.config.model.sid_sizes) or self.world.sizes

    @functools.cached_property
    def world(self) -> GenerativeWorld:
        world = GenerativeWorld.load(self.config.data, max_vocab=self.config.model.text_vocab)
        sizes = tuple(int(k) for k in self.config.model.sid_sizes)
        if sizes and sizes != world.sizes:
            raise ValueError(f"model.sid_sizes={sizes}, but the SID table {self.config.data.sid_table} has "
                             f"{world.sizes} codes per level")
        return world

    @functools.cached_property
    def vocab(self) -> SIDVocab:
        """Text pieces + the SID levels: ``model.text_vocab`` / ``model.sid_sizes`` when set (a paper-scale
        config lowers from them without data), else the tokenizer's and the SID table's sizes."""
        m = self.config.model
        return SIDVocab(m.text_vocab or self.world.recall.tokenizer.vocab_size, self.sid_sizes)

    def model_config(self) -> Seq2SeqConfig:
        m = self.config.model
        if m.arch not in ("encoder_decoder", "decoder_only"):
            raise ValueError(f"model.arch {m.arch!r}: expected 'encoder_decoder' or 'decoder_only'")
        rows = -(-self.vocab.size // m.vocab_multiple) * m.vocab_multiple  # padded: shards evenly, rows never read
        return Seq2SeqConfig(vocab_size=rows, d_model=m.d_model, num_heads=m.num_heads,
                             head_dim=m.head_dim, d_ff=m.d_ff, encoder_layers=m.encoder_layers,
                             decoder_layers=m.decoder_layers, feed_forward=m.feed_forward,
                             relative_buckets=m.relative_buckets, relative_max_distance=m.relative_max_distance,
                             tie_embeddings=m.tie_embeddings, decoder_only=m.arch == "decoder_only",
                             decoder_start_token=self.vocab.start)

    def build_model(self, rngs: nnx.Rngs) -> Seq2Seq:
        return Seq2Seq(self.model_config(), rngs=rngs)

    def inputs(self) -> dict[str, jax.ShapeDtypeStruct]:
        q = self.config.data.query_len
        return {"input_ids": jax.ShapeDtypeStruct((q,), np.int32), "input_mask": jax.ShapeDtypeStruct((q,), np.bool_),
                "codes": jax.ShapeDtypeStruct((self.vocab.depth,), np.int32)}

    def train_source(self):
        w, d = self.world, self.config.data
        return w.training_pairs(d.index_repeats), GenerativeTransform(w.recall.tokenizer, w.item_codes, d.query_len)

    def teacher_forced(self, model: Seq2Seq, batch: Batch) -> jax.Array:
        """``[B, D, V]`` logits of the batch's SIDs given its queries."""
        return model(batch["input_ids"], batch["input_mask"], self.vocab.decoder_inputs(batch["codes"]))

    def loss(self, model: Seq2Seq, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        return dsi_loss(code_log_probs(self.vocab, self.teacher_forced(model, batch)), batch["codes"])

    def towers(self) -> dict[str, Tower]:
        """``retrieve``: query tokens -> the top ``eval.beams`` item ids (what ``ecomax export --format stablehlo``
        writes, the trie and the item table inside)."""
        w, spec = self.world, self.inputs()
        a = w.trie.arrays
        first_rows = np.asarray(a["leaf_rows"])[np.asarray(a["leaf_offsets"])[:-1]]
        ids = w.table_ids[first_rows]
        if ids.max(initial=0) >= 2**31 or ids.min(initial=0) < 0:
            raise ValueError("the serving function returns int32 item ids; this SID table's ids do not fit")
        trie = jax.tree.map(jnp.asarray, w.trie)
        fn = functools.partial(retrieve, trie=trie, item_of_leaf=jnp.asarray(ids, jnp.int32), vocab=self.vocab,
                               beams=self.config.eval.beams)
        return {"retrieve": Tower(fn, {"input_ids": spec["input_ids"], "input_mask": spec["input_mask"]})}

    # --- evaluation -----------------------------------------------------------------------------------

    def retrieve(self, ctx: EvalContext, queries: list[str]) -> dict[str, np.ndarray]:
        """Query texts -> ``items [Q, K]`` (ids, -1 padded; K = max(eval.ks)) and the raw beam."""
        w, e = self.world, self.config.eval
        ids, mask = ex.encode_texts(w.recall.tokenizer, queries, self.config.data.query_len)
        fn = functools.partial(generate, vocab=self.vocab, beams=e.beams)
        beam = ctx.apply(fn, ids, mask, batch_size=e.batch_size, replicated={"trie": w.trie})
        items = self.leaves_to_items(beam["leaves"], max(int(k) for k in e.ks))
        return {**beam, "items": items, "input_ids": ids, "input_mask": mask}

    def trie_state(self) -> dict[str, jax.Array]:
        """The SID trie's arrays, for a task that decodes inside its train step to keep in its state (replicated)."""
        return {k: jnp.asarray(v) for k, v in self.world.trie.arrays.items()}

    def trie(self, extra) -> Trie:
        """The trie of ``trie_state`` held in the task state ``extra["trie"]``."""
        t = self.world.trie
        return Trie(extra["trie"], t.sizes, t.dense_levels, t.max_degree)

    def leaves_to_items(self, leaves: np.ndarray, k: int) -> np.ndarray:
        """Beam leaves ``[Q, W]`` -> item ids ``[Q, k]`` (-1 padded; a shared SID gives all its items)."""
        a = self.world.trie.arrays
        return leaves_to_items(a["leaf_offsets"], a["leaf_rows"], self.world.table_ids, leaves, k)

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        from data_pipelines.sid.trie import accepts  # noqa: PLC0415
        from trainers.evaluators import metrics  # noqa: PLC0415
        from trainers.evaluators.baselines import query_baselines  # noqa: PLC0415

        w, d, e = self.world, self.config.data, self.config.eval
        ks = tuple(int(k) for k in e.ks)
        queries = w.recall.eval_queries(e.split, e.max_examples)
        relevant = [q.relevant for q in queries]
        got = self.retrieve(ctx, [q.query for q in queries])
        out = metrics.retrieval_metrics(got["items"], relevant, ks)
        live = got["leaves"] >= 0
        out["valid_sid_rate"] = float(np.asarray(accepts(w.trie, got["codes"][live])).mean()) if live.any() else 0.0
        out["beam_fill"] = float(live.mean())
        corpus = w.recall.corpus
        i_ids, i_mask = ex.encode_texts(w.recall.tokenizer, corpus.texts, d.item_len) if e.bm25 else (None, None)
        out.update(query_baselines(corpus.ids, w.recall.clicks, relevant, ks, bm25=(
            got["input_ids"], got["input_mask"], i_ids, i_mask, w.recall.tokenizer.vocab_size) if e.bm25 else None))
        return out
