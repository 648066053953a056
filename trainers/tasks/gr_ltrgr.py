"""LTRGR (Li et al. 2024, "Learning to Rank in Generative Retrieval"): a DSI model continued with a margin
rank loss over its own beam, so that the SIDs it generates are ordered by relevance, not only likely.

    ecomax train --config configs/gr.py:ltrgr_tiny --workdir runs/gr_ltrgr --set data.sid_table=runs/gr_sids \\
        --set init_from.model.path=runs/gr_dsi

Each step is a rollout and an update in one program: the live model beam-searches the batch's queries
(``ltrgr.beams``, trie-constrained), the beam's SIDs that are none of the query's relevant items are the
negatives, and the loss is ``L_rank + gen_weight * L_dsi`` (``trainers/losses/generative.py``), every
score the model's teacher-forced log-likelihood of a SID. ``ltrgr.loss``: ``pairs`` (the released code:
top relevant vs top negative + a drawn pair, ``ltrgr_pair_loss``) or ``all`` (the training pair's item vs
every negative, ``ltrgr_rank_loss``). The trie rides in the task state (replicated).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.kuaisearch.transforms import GenerativeTransform
from models.gr import code_log_probs, sequence_log_prob
from trainers.losses import dsi_loss, ltrgr_pair_loss, ltrgr_rank_loss
from trainers.tasks import Batch, Metrics, register
from trainers.tasks.gr_dsi import DSITask, Seq2Seq, generate


@register("gr_ltrgr")
class LTRGRTask(DSITask):
    def inputs(self) -> dict[str, jax.ShapeDtypeStruct]:
        relevant = (self.config.ltrgr.max_relevant, self.vocab.depth)
        return {**super().inputs(), "relevant_codes": jax.ShapeDtypeStruct(relevant, np.int32)}

    def train_source(self):
        w, d = self.world, self.config.data
        return w.training_pairs(d.index_repeats), GenerativeTransform(
            w.recall.tokenizer, w.item_codes, d.query_len, max_relevant=self.config.ltrgr.max_relevant)

    def init_extra(self, params, rng: jax.Array) -> dict:
        return {"trie": self.trie_state()}

    def rollout(self, ctx, state, batch: Batch, rng: jax.Array) -> Batch:
        """The live model's beam on the batch's queries: ``candidates [B, W, D]`` and which are negatives."""
        model = ctx.model(state.params)
        beam = generate(model, batch["input_ids"], batch["input_mask"], self.trie(state.extra),
                        vocab=self.vocab, beams=self.config.ltrgr.beams)
        cands, rel = beam["codes"], batch["relevant_codes"]
        relevant = (cands[:, :, None, :] == rel[:, None, :, :]).all(-1).any(-1)   # [B, W]
        return {**batch, "candidates": jax.lax.stop_gradient(cands), "negative": (beam["leaves"] >= 0) & ~relevant}

    def loss(self, model: Seq2Seq, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        logits = self.teacher_forced(model, batch)
        gen, metrics = dsi_loss(code_log_probs(self.vocab, logits), batch["codes"])
        cfg = self.config.ltrgr
        w = batch["candidates"].shape[1]
        if cfg.loss == "pairs":  # the released code's pairs: beam negatives against the query's relevant SIDs
            relevant = batch["relevant_codes"]
            scores = self._scores(model, batch, jnp.concatenate([batch["candidates"], relevant.clip(0)], 1))
            rank, rank_metrics = ltrgr_pair_loss(scores[:, w:], (relevant >= 0).all(-1), scores[:, :w],
                                                 batch["negative"], rng, cfg.margin, cfg.random_margin)
        elif cfg.loss == "all":  # the training pair's item against every beam negative
            rank, rank_metrics = ltrgr_rank_loss(sequence_log_prob(self.vocab, logits, batch["codes"]),
                                                 self._scores(model, batch, batch["candidates"]), batch["negative"],
                                                 cfg.margin)
        else:
            raise ValueError(f"ltrgr.loss must be 'pairs' or 'all', got {cfg.loss!r}")
        return rank + cfg.gen_weight * gen, {**metrics, **rank_metrics, "dsi_loss": gen, "rank_loss": rank}

    def _scores(self, model: Seq2Seq, batch: Batch, sids: jax.Array) -> jax.Array:
        """``sids [B, S, D]`` -> their teacher-forced log-likelihoods ``[B, S]``; a query's S SIDs share its
        encoder pass."""
        b, n, depth = sids.shape
        flat = sids.reshape(b * n, depth)
        logits = model(batch["input_ids"], batch["input_mask"], self.vocab.decoder_inputs(flat))
        return sequence_log_prob(self.vocab, logits, flat).reshape(b, n)
