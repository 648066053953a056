"""TIGER-style sequential recommendation (Rajput et al. 2023): the SIDs of a user's time-ordered clicked
items -> the next item's SID, generated with the same trie-constrained beam search as DSI.

    ecomax train --config configs/gr.py:tiger_tiny --workdir runs/gr_tiger --set data.sid_table=runs/gr_sids

Data: every user's clicks over all KuaiSearch recall sessions ordered by ``time_index``
(``examples.click_sequences``), split leave-one-out (``next_item_examples``: last item test, the one
before it valid, the rest train targets), the last ``data.max_history`` items as the history; the
encoder reads the history's code tokens (id 0 pads; no text pieces). Loss: ``dsi_loss``. Evaluation on the
``eval.split`` users: Recall@K and NDCG@K (K = ``eval.ks``: TIGER's 5 and 10) of the one next item,
beside the most-clicked-items ranking.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from data_pipelines.kuaisearch import examples as ex
from data_pipelines.kuaisearch.transforms import HistoryTransform, stack
from models.gr import SIDVocab
from trainers.tasks import EvalContext, register
from trainers.tasks.gr_dsi import DSITask, generate


@register("gr_tiger")
class TigerTask(DSITask):
    @functools.cached_property
    def vocab(self) -> SIDVocab:
        """One padding id (0), the decoder start token, then the code blocks: histories are codes only."""
        return SIDVocab(1, self.sid_sizes)

    @functools.cached_property
    def examples(self) -> dict[str, list[ex.NextItem]]:
        w = self.world
        return ex.next_item_examples(ex.click_sequences(ex.read_rows(w.recall.root, "recall"), w.recall.corpus),
                                     self.config.data.max_history)

    @functools.cached_property
    def transform(self) -> HistoryTransform:
        return HistoryTransform(self.world.item_codes, self.vocab.offsets, self.config.data.max_history)

    def inputs(self) -> dict[str, jax.ShapeDtypeStruct]:
        n = self.config.data.max_history * self.vocab.depth
        return {"input_ids": jax.ShapeDtypeStruct((n,), np.int32), "input_mask": jax.ShapeDtypeStruct((n,), np.bool_),
                "codes": jax.ShapeDtypeStruct((self.vocab.depth,), np.int32)}

    def train_source(self):
        has = self.world.item_codes[:, 0] >= 0
        train = [e for e in self.examples["train"] if has[e.target] and all(has[r] for r in e.history)]
        if not train:
            raise ValueError(f"{self.world.recall.root}: no user has 3 or more clicked items with SIDs")
        return train, self.transform

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        from trainers.evaluators import metrics  # noqa: PLC0415
        from trainers.evaluators.baselines import popularity_ranking  # noqa: PLC0415

        w, e = self.world, self.config.eval
        ks = tuple(int(k) for k in e.ks)
        tests = self.examples[e.split][:e.max_examples or None]
        batch = stack([self.transform(x) for x in tests])
        fn = functools.partial(generate, vocab=self.vocab, beams=e.beams)
        beam = ctx.apply(fn, batch["input_ids"], batch["input_mask"], batch_size=e.batch_size,
                         replicated={"trie": w.trie})
        ids = w.recall.corpus.ids
        items = self.leaves_to_items(beam["leaves"], max(ks))
        relevant = [(int(ids[x.target]),) for x in tests]
        hits, num_relevant = metrics.hit_matrix(items, relevant)
        out = {**metrics.metrics_from_hits(hits, num_relevant, ks), **metrics.ndcg_at_k(hits, num_relevant, ks)}
        top = popularity_ranking(ids, w.recall.clicks, max(ks))
        pop_hits, _ = metrics.hit_matrix(np.broadcast_to(top, (len(tests), top.size)), relevant)
        out.update({f"popularity/{k}": v for k, v in {**metrics.metrics_from_hits(pop_hits, num_relevant, ks),
                                                      **metrics.ndcg_at_k(pop_hits, num_relevant, ks)}.items()
                    if not k.startswith("num_")})
        return out
