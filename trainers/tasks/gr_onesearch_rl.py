"""OneSearch-V2's behaviour-preference alignment (Sec. 3.3): GRPO or TPMA-GRPO on the SFT generator, rollouts from the
trie-constrained policy, rewards from the session's clicks and orders and from frozen ranking and relevance runs.

    ecomax train --config configs/onesearch_v2.py:tpma --workdir runs/os_tpma --set data.sid_table=runs/os_sids \\
        --set init_from.model.path=runs/os_focal [--set rl.ranker=RANK_RUN --set rl.relevance=RELEVANCE_RUN]

One step: the live generator samples ``rl.group`` SIDs per query (student input) with ``models.beam_search.sample``
(every rollout a valid SID) and records each position's log-prob under the current and the reference (SFT)
parameters. On the host: ``R_item = onesearch_item_reward`` (4 ordered / 3 clicked / 0, + the ranker's CTR,
+ 3 x the relevance model's probability of grade 3, + the format reward: 1 for a SID the trie accepts);
``rl.mode``:

* ``grpo``: one advantage per sample, ``group_advantages(R_item)``, in ``grpo_loss`` (clip, KL to the reference);
* ``tpma``: per position, ``tpma_advantages`` of the prefix rewards against the session's clicked SIDs
  (``tpma_prefix_rewards``, ``tpma_position_weights``) + ``rl.item_weight`` x the group-normalised
  ``R_item``, gated by ``tpma_gates``, in ``tpma_grpo_loss`` (no clipping).

Both add ``rl.sft_weight`` x the SFT loss on the session's own item.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.kuaisearch.transforms import Indexed
from data_pipelines.sid.trie import TrieConstraint, accepts
from models.beam_search import sample
from models.gr import code_step, path_log_probs
from trainers.frozen import Frozen
from trainers.losses import group_advantages, grpo_loss
from trainers.losses import onesearch as osl
from trainers.tasks import Batch, register
from trainers.tasks.gr_onesearch import OneSearchTask, mean_over_levels

ROLLOUT_KEYS = ("input_ids", "input_mask", "codes", "example")


@register("gr_onesearch_rl")
class OneSearchRLTask(OneSearchTask):
    def __init__(self, config):
        super().__init__(config)
        if config.rl.mode not in ("grpo", "tpma"):
            raise ValueError(f"rl.mode {config.rl.mode!r}: expected 'grpo' or 'tpma'")
        self.ranker, self.relevance   # noqa: B018 - a wrong path fails now, not at the first step

    @functools.cached_property
    def ranker(self) -> Frozen | None:
        return Frozen.load(self.config.rl.ranker) if self.config.rl.ranker else None

    @functools.cached_property
    def relevance(self) -> Frozen | None:
        return Frozen.load(self.config.rl.relevance) if self.config.rl.relevance else None

    @functools.cached_property
    def ranker_inputs(self) -> tuple:
        """The ranker's featurizer and the train sessions' rank rows (read once, cached)."""
        from data_pipelines.kuaisearch.worlds import candidate_rows  # noqa: PLC0415
        from trainers.tasks.kuaisearch_rank import ranker_featurizer  # noqa: PLC0415

        root = self.world.recall.root
        return ranker_featurizer(self.ranker, root), candidate_rows(root, [s.session_id for s in self.train_sessions])

    def train_source(self):
        return list(enumerate(self.example(s) for s in self.train_sessions)), Indexed(self.transform)

    def inputs(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {**super().inputs(), "example": jax.ShapeDtypeStruct((), np.int32)}

    def init_extra(self, params, rng: jax.Array) -> dict:
        return {"reference": params, "trie": self.trie_state()}   # the reference: the SFT generator (init_from)

    def sampled_log_probs(self, model, rows: Batch, constraint: TrieConstraint) -> jax.Array:
        """``[N, D]`` log-probs of ``rows["sampled"]`` under the policy the sampler draws from."""
        logits = model(rows["input_ids"], rows["input_mask"], self.vocab.decoder_inputs(rows["sampled"]))
        return path_log_probs(self.vocab, logits, rows["sampled"], constraint, self.config.rl.temperature)

    def rollout(self, ctx, state, batch: Batch, rng: jax.Array) -> Batch:
        g, constraint = self.config.rl.group, TrieConstraint(self.trie(state.extra))
        model = ctx.model(state.params)
        context, cache = model.start(batch["input_ids"], batch["input_mask"], self.vocab.depth)
        out = sample(code_step(model, self.vocab), context, cache, batch=batch["codes"].shape[0], samples=g,
                     sizes=self.vocab.sizes, rng=rng, constraint=constraint, temperature=self.config.rl.temperature)
        rows = {**{k: jnp.repeat(batch[k], g, 0) for k in ROLLOUT_KEYS},
                "sampled": out.codes.reshape(-1, self.vocab.depth), "leaves": out.leaves.reshape(-1)}
        old = self.sampled_log_probs(model, rows, constraint)
        ref = self.sampled_log_probs(ctx.model(state.extra["reference"]), rows, constraint)
        return jax.lax.stop_gradient({**rows, "old_logp": old, "ref_logp": ref})

    # --- rewards (host) -----------------------------------------------------------------------------------

    def item_rewards(self, sessions, items: np.ndarray, sampled: np.ndarray) -> dict[str, np.ndarray]:
        """OneSearch-V2's ``R_item`` of each sampled item (id, -1: none) and its parts, ``[N]`` each."""
        from trainers.tasks.kuaisearch_rank import candidate_click_probabilities  # noqa: PLC0415
        from trainers.tasks.kuaisearch_relevance import relevance_probabilities  # noqa: PLC0415

        w, rl = self.world, self.config.rl
        ids = w.recall.corpus.ids
        clicked = np.array([item in set(ids[list(s.clicked)].tolist()) for s, item in zip(sessions, items)])
        ordered = np.array([item in set(ids[list(s.ordered)].tolist()) for s, item in zip(sessions, items)])
        ctr = np.zeros(len(items), np.float32)
        if self.ranker is not None:   # the session's rank-row context (rank_features.CandidateRows), the item's fields
            contexts = [{"session_id": s.session_id, "user_id": s.user_id, "query": s.query,
                         "recently_clicked_item_ids": []} for s in sessions]
            ctr = np.nan_to_num(candidate_click_probabilities(self.ranker, *self.ranker_inputs, contexts, items[:, None],
                                                              rl.scorer_batch)[:, 0])
        rel = np.zeros(len(items), np.float32)
        if self.relevance is not None:
            corpus = w.recall.corpus
            texts = [corpus.texts[r[0]] if r else "" for r in (corpus.rows([int(i)]) for i in items)]
            rel = 3.0 * relevance_probabilities(self.relevance, [s.query for s in sessions], texts, rl.scorer_batch)
        well_formed = np.asarray(accepts(w.trie, sampled), bool) & (items >= 0)
        return {"reward": osl.onesearch_item_reward(ordered, clicked, ctr, rel, well_formed), "clicked": clicked,
                "ordered": ordered, "ctr": ctr, "relevance": rel, "well_formed": well_formed}

    def truths(self, sessions) -> tuple[np.ndarray, np.ndarray]:
        """The clicked SIDs of each row's session: ``[N, M, D]`` codes and ``[N, M]`` mask."""
        codes = self.world.item_codes
        rows = [[r for r in s.clicked if codes[r, 0] >= 0] for s in sessions]
        m = max(len(r) for r in rows)
        out, mask = np.zeros((len(rows), m, codes.shape[1]), np.int32), np.zeros((len(rows), m), bool)
        for i, r in enumerate(rows):
            out[i, :len(r)], mask[i, :len(r)] = codes[r], True
        return out, mask

    def score(self, rollout: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
        rl, g = self.config.rl, self.config.rl.group
        sessions = [self.train_sessions[int(i)] for i in rollout["example"]]
        items = self.leaves_to_items(rollout["leaves"][:, None], 1)[:, 0]
        sampled = rollout["sampled"]
        parts = self.item_rewards(sessions, items, sampled)
        item_adv = group_advantages(parts["reward"], g)
        truths, mask = self.truths(sessions)
        length = sampled.shape[1]
        prefix = osl.tpma_prefix_rewards(sampled, truths, mask, osl.tpma_position_weights(length))
        if rl.mode == "grpo":
            advantage, gates = np.repeat(item_adv[:, None], length, 1), np.ones_like(prefix)
        else:
            unweighted = osl.tpma_prefix_rewards(sampled, truths, mask, np.ones(length, np.float32))
            advantage = osl.tpma_advantages(prefix, g, rl.delta) + rl.item_weight * item_adv[:, None]
            gates = osl.tpma_gates(unweighted)
        floats = {k: np.asarray(v, np.float32) for k, v in parts.items()}
        return {**rollout, **floats, "advantage": advantage.astype(np.float32), "gates": gates,
                "prefix_reward": prefix[:, -1]}

    # --- the update ---------------------------------------------------------------------------------------

    def update(self, ctx, state, batch: Batch, rng: jax.Array):
        rl, constraint = self.config.rl, TrieConstraint(self.trie(state.extra))

        def loss(model, batch: Batch, rng: jax.Array):
            logp = self.sampled_log_probs(model, batch, constraint)
            if rl.mode == "grpo":
                pg, metrics = grpo_loss(logp, batch["old_logp"], batch["ref_logp"], batch["advantage"], clip=rl.clip, kl=rl.kl)
            else:
                pg, metrics = osl.tpma_grpo_loss(logp, batch["old_logp"], batch["advantage"], batch["gates"])
            sft, _ = mean_over_levels(self.token_loss, batch["codes"], self.code_levels(model, batch))
            means = {k: jnp.mean(batch[k]) for k in ("reward", "clicked", "ordered", "ctr", "relevance", "well_formed",
                                                     "prefix_reward", "gates")}
            return pg + rl.sft_weight * sft, {**metrics, **means, "pg_loss": pg, "sft_loss": sft}

        return ctx.gradient_step(state, batch, rng, loss)
