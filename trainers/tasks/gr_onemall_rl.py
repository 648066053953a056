"""OneMall's RL phase (OneMall, Sec. 3.3): GRPO on the SID generator with the frozen KuaiSearch ranking model as
the reward, so that retrieval proposes what ranking would rank high.

    ecomax train --config configs/kuaisearch_rank.py:onemall --workdir runs/onemall_ranker
    ecomax train --config configs/onemall.py:tiny_rl --workdir runs/onemall_rl --set data.sid_table=runs/gr_sids \\
        --set init_from.model.path=runs/onemall --set rl.ranker=runs/onemall_ranker

One step: the live generator samples ``rl.group`` SIDs per user from the trie-constrained policy
(``models.beam_search.sample``, so every rollout is a valid SID) and records their teacher-forced log-probs
under the current and the reference (SFT) parameters; on the host the ranker scores each sampled item for the
user and the session's query (``ranker_reward``, ``group_advantages``); the update is ``rl.pg_weight`` x
``grpo_loss`` + ``rl.sft_weight`` x the SFT loss on the session's own item + the MoE auxiliary losses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.kuaisearch.transforms import Indexed
from data_pipelines.sid.trie import TrieConstraint
from models.beam_search import sample
from models.gr import code_log_probs, code_step, path_log_probs
from models.moe import capture_aux
from models.onemall import OneMall
from trainers.losses import dsi_loss, group_advantages, grpo_loss, ranker_reward
from trainers.tasks import Batch, register
from trainers.tasks.gr_onemall import OneMallTask


@register("gr_onemall_rl")
class OneMallRLTask(OneMallTask):
    def __init__(self, config):
        super().__init__(config)
        if not config.rl.ranker:
            raise ValueError("gr_onemall_rl: set rl.ranker to a KuaiSearch ranking run (its workdir or a params export)")

    def train_source(self):
        return list(enumerate(self.train_examples)), Indexed(self.transform)

    def inputs(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {**super().inputs(), "example": jax.ShapeDtypeStruct((), np.int32)}

    def init_extra(self, params, rng: jax.Array) -> dict:
        return {"reference": params, "trie": self.trie_state()}   # GRPO's reference: the SFT generator (init_from)

    def constraint(self, extra) -> TrieConstraint:
        return TrieConstraint(self.trie(extra))

    def sampled_log_probs(self, model: OneMall, batch: Batch, constraint: TrieConstraint) -> jax.Array:
        """``[N, D]`` log-probs of ``batch["sampled"]`` under the policy the sampler draws from."""
        logits = model(batch, self.vocab.decoder_inputs(batch["sampled"]))
        return path_log_probs(self.vocab, logits, batch["sampled"], constraint, self.config.rl.temperature)

    def rollout(self, ctx, state, batch: Batch, rng: jax.Array) -> Batch:
        g, constraint = self.config.rl.group, self.constraint(state.extra)
        model = ctx.model(state.params)
        context, cache = model.start(batch, self.vocab.depth)
        out = sample(code_step(model, self.vocab), context, cache, batch=batch["codes"].shape[0], samples=g,
                     sizes=self.vocab.sizes, rng=rng, constraint=constraint, temperature=self.config.rl.temperature)
        rows = {**{k: jnp.repeat(v, g, 0) for k, v in batch.items()},
                "sampled": out.codes.reshape(-1, self.vocab.depth), "leaves": out.leaves.reshape(-1)}
        old = self.sampled_log_probs(model, rows, constraint)
        ref = self.sampled_log_probs(ctx.model(state.extra["reference"]), rows, constraint)
        return jax.lax.stop_gradient({**rows, "old_logp": old, "ref_logp": ref})

    def score(self, rollout: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
        rl = self.config.rl
        items = self.leaves_to_items(rollout["leaves"][:, None], 1)[:, 0]
        examples = [self.train_examples[int(i)] for i in rollout["example"]]
        ids = self.world.recall.corpus.ids
        hit = np.array([item in set(ids[list(e.relevant)].tolist()) for e, item in zip(examples, items)])
        prob = self.ranker_scores(examples, items[:, None])[:, 0]
        reward = ranker_reward(prob, hit, rl.hit_weight)
        return {**rollout, "reward": reward, "ranker_prob": prob, "hit": hit.astype(np.float32),
                "advantage": group_advantages(reward, rl.group)}

    def update(self, ctx, state, batch: Batch, rng: jax.Array):
        rl, vocab, constraint = self.config.rl, self.vocab, self.constraint(state.extra)

        def loss(model: OneMall, batch: Batch, rng: jax.Array):
            def both(model, batch):
                memory = model.memory(batch)
                return [model.generator.decode(*memory, vocab.decoder_inputs(batch[k])) for k in ("sampled", "codes")]

            (sampled, target), aux = capture_aux(both, model, batch)
            logp = path_log_probs(vocab, sampled, batch["sampled"], constraint, rl.temperature)
            pg, metrics = grpo_loss(logp, batch["old_logp"], batch["ref_logp"], batch["advantage"], clip=rl.clip, kl=rl.kl)
            gen, gen_metrics = dsi_loss(code_log_probs(vocab, target), batch["codes"])
            moe, moe_metrics = self.moe_terms(aux)
            means = {k: jnp.mean(batch[k]) for k in ("reward", "ranker_prob", "hit")}
            return rl.pg_weight * pg + rl.sft_weight * gen + moe, {**metrics, **gen_metrics, **moe_metrics, **means,
                                                     "pg_loss": pg, "gen_loss": gen}

        return ctx.gradient_step(state, batch, rng, loss)
