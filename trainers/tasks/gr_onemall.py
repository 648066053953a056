"""OneMall's generator on KuaiSearch: a user's click, purchase and search-query sequences -> the SID of an item
of their next session, generated with the trie-constrained beam search of DSI.

    ecomax gr sids --config configs/onemall.py:tiny --out runs/gr_sids
    ecomax train --config configs/onemall.py:tiny --workdir runs/onemall --set data.sid_table=runs/gr_sids

Data: ``examples.behaviour_examples`` over the recall rows (every session of a user sees the sessions
before it in time, any split); train targets are one relevant item per train session drawn per example.
Model: ``models/onemall.py`` (Query-Formers per behaviour, cross-attention fusion, sparse-MoE decoder).
Loss: ``dsi_loss`` + ``moe.balance_weight`` x the Switch load-balancing loss + ``moe.z_weight`` x the router
z-loss (``models/moe.py``). Evaluation on the ``eval.split`` sessions: ``hit_rate@k``, ``recall@k`` and
``mrr`` with relevant = the session's clicked ∪ purchased items, beside the most-clicked-items ranking; with
``rl.ranker`` (a KuaiSearch ranking run) also ``ranker@k``, the frozen ranker's mean click probability of the
top-k generated items (``rank_features.CandidateRows`` makes their rank rows), the quantity RL raises
(``gr_onemall_rl``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from flax import nnx

from data_pipelines.kuaisearch import examples as ex
from data_pipelines.kuaisearch import rank_features as rf
from data_pipelines.kuaisearch.transforms import BehaviourTransform, stack
from data_pipelines.kuaisearch.worlds import candidate_rows
from data_pipelines.sid.trie import TrieConstraint
from models.beam_search import beam_search
from models.gr import SIDVocab, code_log_probs, code_step
from models.moe import MoEConfig, capture_aux
from models.onemall import OneMall, OneMallConfig, inputs_of
from trainers.flops import onemall_forward
from trainers.frozen import Frozen
from trainers.losses import dsi_loss
from trainers.tasks import Batch, EvalContext, Metrics, register
from trainers.tasks.gr_dsi import DSITask


def generate(model: OneMall, *arrays: jax.Array, keys: tuple[str, ...], trie, vocab: SIDVocab, beams: int
             ) -> dict[str, jax.Array]:
    """The batch's behaviour arrays (in ``keys`` order) -> the ``beams`` best valid SIDs (``gr_dsi.generate``)."""
    batch = dict(zip(keys, arrays))
    context, cache = model.start(batch, vocab.depth)
    out = beam_search(code_step(model, vocab), context, cache, batch=arrays[0].shape[0], beams=beams,
                      sizes=vocab.sizes, constraint=TrieConstraint(trie))
    return {"codes": out.codes, "scores": out.scores, "leaves": out.leaves}


@register("gr_onemall")
class OneMallTask(DSITask):
    def __init__(self, config):
        super().__init__(config)
        if config.rl.ranker:
            _ = self.ranker   # a wrong path fails now, not at the first evaluation

    @property
    def lengths(self) -> dict[str, int]:
        return {b: int(self.config.data.lengths[b]) for b in self.config.model.behaviours}

    @functools.cached_property
    def sessions(self) -> dict[str, list[ex.Behaviours]]:
        """Every session with a relevant item and its behaviour history, by split."""
        w = self.world
        return ex.behaviour_examples(ex.read_rows(w.recall.root, "recall"), w.recall.corpus,
                                     max(self.lengths.values()), self.lengths.get("query", 0))

    @functools.cached_property
    def rank_rows(self) -> rf.CandidateRows:
        """The rank rows' session contexts and item fields of the sessions (cached after the first read)."""
        return candidate_rows(self.world.recall.root, [e.session_id for split in self.sessions.values() for e in split])

    @functools.cached_property
    def examples(self) -> dict[str, list[ex.Behaviours]]:
        """The sessions, with their scenario when ``data.scenarios`` is set: the rule is the ``search_entrance``
        of the session's rank rows (KuaiSearch's recall rows do not carry it); unknown without rank rows."""
        if not self.config.data.scenarios:
            return self.sessions
        return ex.with_scenarios(self.sessions, {s: c["search_entrance"] for s, c in self.rank_rows.contexts.items()})

    @functools.cached_property
    def transform(self) -> BehaviourTransform:
        d = self.config.data
        return BehaviourTransform(self.world.recall.tokenizer, self.world.item_codes, self.vocab.offsets,
                                  self.lengths, d.piece_len, d.query_len if self.config.model.encoder_layers else 0,
                                  tuple(d.scenarios))

    def model_config(self) -> OneMallConfig:
        m = self.config.model
        moe = (MoEConfig(num_experts=m.moe.num_experts, top_k=m.moe.top_k, capacity_factor=m.moe.capacity_factor,
                         d_ff=m.moe.d_ff, group_size=m.moe.group_size) if m.moe.num_experts else None)
        generator = dataclasses.replace(super().model_config(), moe=moe, moe_every=m.moe.every)
        return OneMallConfig(generator, behaviours=tuple(m.behaviours), num_queries=m.num_queries,
                             qformer_layers=m.qformer_layers, compress=m.compress,
                             max_events=max(self.lengths.values()),
                             scenarios=len(self.config.data.scenarios) + 1 if self.config.data.scenarios else 0)

    def build_model(self, rngs: nnx.Rngs) -> OneMall:
        return OneMall(self.model_config(), rngs=rngs)

    def inputs(self) -> dict[str, jax.ShapeDtypeStruct]:
        d, depth = self.config.data, self.vocab.depth
        spec = {"codes": jax.ShapeDtypeStruct((depth,), np.int32)}
        for b, n in self.lengths.items():
            ids, mask = inputs_of(b)
            width = d.piece_len if b == "query" else depth
            spec[ids] = jax.ShapeDtypeStruct((n, width), np.int32)
            spec[mask] = jax.ShapeDtypeStruct((n, width) if b == "query" else (n,), np.bool_)
        if self.config.data.scenarios:
            spec["scenario"] = jax.ShapeDtypeStruct((), np.int32)
        if self.config.model.encoder_layers:
            spec["input_ids"] = jax.ShapeDtypeStruct((d.query_len,), np.int32)
            spec["input_mask"] = jax.ShapeDtypeStruct((d.query_len,), np.bool_)
        return spec

    @functools.cached_property
    def train_examples(self) -> list[ex.Behaviours]:
        """The train sessions with a relevant item that has a SID."""
        has = self.world.item_codes[:, 0] >= 0
        train = [e for e in self.examples.get("train", []) if any(has[r] for r in e.relevant)]
        if not train:
            raise ValueError(f"{self.world.recall.root}: no train session has a relevant item with a SID")
        return train

    def train_source(self):
        return self.train_examples, self.transform

    def loss(self, model: OneMall, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        logits, aux = capture_aux(lambda model, b, d: model(b, d), model, batch, self.vocab.decoder_inputs(batch["codes"]))
        gen, metrics = dsi_loss(code_log_probs(self.vocab, logits), batch["codes"])
        moe, moe_metrics = self.moe_terms(aux)
        return gen + moe, {**metrics, **moe_metrics, "gen_loss": gen}

    def moe_terms(self, aux: dict) -> tuple[jax.Array | float, Metrics]:
        """The weighted MoE auxiliary losses of ``capture_aux``'s ``aux`` (0 for a dense model) and their metrics."""
        if not aux:
            return 0.0, {}
        m, aux = self.config.model.moe, dict(aux)
        load = aux.pop("expert_load")
        return (m.balance_weight * aux["balance_loss"] + m.z_weight * aux["z_loss"],
                {**aux, "expert_load_max": load.max() * load.size})

    # --- the frozen ranker: RL's reward, and ranker@k beside HR@k -------------------------------------------

    @functools.cached_property
    def ranker(self) -> Frozen | None:
        return Frozen.load(self.config.rl.ranker) if self.config.rl.ranker else None

    @functools.cached_property
    def ranker_featurizer(self) -> rf.RankFeaturizer:
        """The ranker's featurizer over the world's ``users`` and ``items``."""
        from trainers.tasks.kuaisearch_rank import ranker_featurizer  # noqa: PLC0415

        return ranker_featurizer(self.ranker, self.world.recall.root)

    def ranker_scores(self, examples: list[ex.Behaviours], items: np.ndarray) -> np.ndarray:
        """The ranker's click probability of ``items [n, k]`` (item ids, -1: none) proposed in the sessions of
        ``examples`` (one per row) -> ``[n, k]`` float32, NaN where there is no item."""
        from trainers.tasks.kuaisearch_rank import candidate_click_probabilities  # noqa: PLC0415

        corpus_ids = self.world.recall.corpus.ids
        contexts = [{"session_id": e.session_id, "user_id": e.user_id, "query": e.query,
                     "recently_clicked_item_ids": [int(x) for x in corpus_ids[list(e.clicks[-20:])][::-1]]}
                    for e in examples]
        return candidate_click_probabilities(self.ranker, self.ranker_featurizer, self.rank_rows, contexts, items,
                                             self.config.rl.ranker_batch)

    def towers(self) -> dict:
        return {}

    def forward_flops(self, batch_size: int) -> dict[str, float]:
        """Analytic matmul FLOPs (``trainers/flops.py:onemall_forward``; MoE layers: active FLOPs)."""
        d = self.config.data
        return onemall_forward(self.model_config(), batch_size, self.lengths, self.vocab.depth,
                               d.query_len if self.config.model.encoder_layers else 0)

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        from trainers.evaluators import metrics  # noqa: PLC0415
        from trainers.evaluators.baselines import popularity_ranking  # noqa: PLC0415

        w, e = self.world, self.config.eval
        ks = tuple(int(k) for k in e.ks)
        tests = self.examples.get(e.split, [])[:e.max_examples or None]
        if not tests:
            raise ValueError(f"{w.recall.root}: no {e.split!r} session with a relevant corpus item to evaluate")
        batch = stack([self.transform(x) for x in tests])
        keys = tuple(k for k in OneMallTask.inputs(self) if k != "codes")   # what the generator reads
        fn = functools.partial(generate, keys=keys, vocab=self.vocab, beams=e.beams)
        beam = ctx.apply(fn, *[batch[k] for k in keys], batch_size=e.batch_size, replicated={"trie": w.trie})
        ids = w.recall.corpus.ids
        relevant = [tuple(int(ids[r]) for r in x.relevant) for x in tests]
        generated = self.leaves_to_items(beam["leaves"], max(ks))
        out = metrics.retrieval_metrics(generated, relevant, ks)
        out["beam_fill"] = float((beam["leaves"] >= 0).mean())
        for name in self.config.data.scenarios:   # HR@k of each scenario's sessions
            rows = [i for i, x in enumerate(tests) if x.scenario == name]
            by = metrics.retrieval_metrics(generated[rows], [relevant[i] for i in rows], ks) if rows else {}
            out.update({f"scenario/{name}/{k}": v for k, v in by.items() if k.startswith("hit_rate@") or k == "num_queries_evaluated"})
        top = popularity_ranking(ids, w.recall.clicks, max(ks))
        pop = metrics.retrieval_metrics(np.broadcast_to(top, (len(tests), top.size)), relevant, ks)
        out.update({f"popularity/{k}": v for k, v in pop.items() if not k.startswith("num_")})
        if self.ranker is not None:
            k = int(self.config.rl.eval_k)
            out[f"ranker@{k}"] = float(np.nanmean(self.ranker_scores(tests, generated[:, :k])))
            out[f"popularity/ranker@{k}"] = float(np.nanmean(self.ranker_scores(tests, np.broadcast_to(
                top[:k], (len(tests), k)))))
        return out
