"""Search agents: an LLM policy that interleaves reasoning with calls to a retriever, trained with GRPO on
the outcome (Search-R1, Jin et al. 2025), optionally with SD-Search's hindsight self-distillation or
IG-Search's information-gain advantages; ``search_agent_sft`` is the supervised warm start a policy trained
from scratch needs first.

    ecomax agents synth --out runs/world && ecomax agents corpus --passages runs/world/corpus.jsonl \\
        --encoder bm25 --out runs/world_index
    ecomax train --config configs/search_agent.py:sft_tiny --workdir runs/agent_sft \\
        --set data.world=runs/world --set data.index=runs/world_index
    ecomax train --config configs/search_agent.py:tiny --workdir runs/agent \\
        --set init_from.policy.path=runs/agent_sft --set data.world=runs/world --set data.index=runs/world_index

One train step: ``train.batch_size`` questions, each sampled ``agent.group`` times. Turn 1 generates from
Search-R1's prompt (``rollout``: jitted, KV-cached, ``models/policy.py``); between turns the host
environment (``interact``, ``data_pipelines/agents/environment.py``) cuts each rollout at its first
``</search>`` / ``</answer>``, runs the searches and appends the documents; up to ``agent.max_turns``
searches, then ``score`` reads the answers (reward: exact match, plus ``rl.format_bonus`` for a well-formed
rollout), lays the rollouts out and the update takes GRPO's step on the policy's own tokens (documents
masked), with SD-Search's JSD term (``method="sd_search"``) or IG-Search's per-token advantages
(``"ig_search"``; their inputs: ``data_pipelines/agents/teachers.py``).
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.agents import metrics as qa_metrics
from data_pipelines.agents.environment import Episode, SearchEnvironment
from data_pipelines.agents.qa import read_qa
from data_pipelines.agents.rollout import final_answer, format_reward
from data_pipelines.agents.teachers import counterfactual_inputs, hindsight_inputs
from data_pipelines.agents.tokenizer import PROMPT, AgentTokenizer, hf_tokenizer, word_tokenizer
from data_pipelines.loader import InMemorySource
from models import policy
from trainers.losses import grpo_loss, group_advantages
from trainers.losses.search_agent import answer_score, ig_token_advantages, jensen_shannon, step_gains
from trainers.tasks import Batch, EvalContext, Task, register

METHODS = ("search_r1", "sd_search", "ig_search")


class _SearchAgentBase(Task):
    """What the GRPO task and its supervised warm start share: questions, retriever, tokenizer, environment,
    the policy and the greedy multi-turn evaluation."""

    # --- data -------------------------------------------------------------------------------------------------

    def _path(self, key: str) -> pathlib.Path:
        value = self.config.data[key]
        if not value:
            raise ValueError(f"data.{key} is not set (ecomax agents synth / corpus write them; see the README)")
        return pathlib.Path(value)

    @functools.cached_property
    def questions(self) -> dict[str, list]:
        d = self.config.data
        return {split: read_qa(self._path("world") / f"{split}.jsonl") for split in (d.split, d.eval_split)}

    @functools.cached_property
    def retriever(self):
        from trainers.evaluators.passage_retriever import PassageRetriever

        return PassageRetriever(self._path("index"))

    @functools.cached_property
    def tokenizer(self) -> AgentTokenizer:
        m = self.config.model
        if m.tokenizer == "hf":
            return hf_tokenizer(m.hf_dir)
        if m.tokenizer != "world":
            raise ValueError(f"model.tokenizer={m.tokenizer!r}: 'world' or 'hf'")
        texts = [p.title + " " + p.text for p in self.retriever.passages]
        texts += [q.question + " " + " ".join(q.golden_answers)
                  for qs in self.questions.values() for q in qs]
        return word_tokenizer(texts)

    def prompt_ids(self, question: str) -> list[int]:
        ids = self.tokenizer.encode(PROMPT.format(question=question))
        if len(ids) > self.config.agent.context - self.config.agent.turn_tokens:
            raise ValueError(f"the prompt of {question!r} is {len(ids)} tokens; agent.context leaves "
                             f"{self.config.agent.context - self.config.agent.turn_tokens}")
        return ids

    def _prompts(self, split: str, limit: int = 0, offset: int = 0) -> dict[str, np.ndarray]:
        qs = self.questions[split][offset:offset + limit if limit else None]
        C, pad = self.config.agent.context, self.tokenizer.pad_id
        prompt, valid = np.full((len(qs), C), pad, np.int32), np.zeros((len(qs), C), bool)
        for i, q in enumerate(qs):
            ids = self.prompt_ids(q.question)
            prompt[i, C - len(ids):], valid[i, C - len(ids):] = ids, True
        return {"prompt": prompt, "prompt_valid": valid, "question": np.arange(len(qs), dtype=np.int32)}

    @functools.cached_property
    def env(self) -> SearchEnvironment:
        a = self.config.agent
        search = functools.partial(self.retriever.search, k=a.k)
        return SearchEnvironment(self.tokenizer, search, k=a.k, max_turns=a.max_turns, context=a.context,
                                 doc_tokens=a.doc_tokens)

    # --- model ------------------------------------------------------------------------------------------------

    @functools.cached_property
    def policy_config(self):
        m = self.config.model
        dtype = self.config.train.compute_dtype
        if m.hf_dir:
            return policy.qwen2_config(None, policy.hf_model_config(m.hf_dir), dtype)
        return policy.qwen2_config({**m.to_dict(), "vocab": m.vocab or self.tokenizer.vocab_size}, dtype=dtype)

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return policy.build(self.policy_config, rngs)

    @property
    def turns(self) -> int:
        return self.config.agent.max_turns + 1  # every search needs one more turn to read its documents

    def _sample(self, model, context, valid, active, rng, temperature: float):
        a = self.config.agent
        return policy.sample(model, self.policy_config, context, valid, rng, steps=a.turn_tokens,
                             temperature=temperature, stop_ids=self.tokenizer.stop_ids,
                             pad_id=self.tokenizer.pad_id, active=active)

    # --- evaluation -------------------------------------------------------------------------------------------

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        """Greedy rollouts on ``eval.questions`` test questions from the ``eval.offset``-th: EM, F1, searches per
        question, well-formed, and EM per hop count (``em_hop1`` ...) where the questions carry one (the synthetic
        world's do)."""
        c = self.config
        split, offset = c.data.eval_split, c.eval.offset
        prompts = self._prompts(split, c.eval.questions, offset)
        env = self.env
        episodes = env.start([p[v] for p, v in zip(prompts["prompt"], prompts["prompt_valid"])])
        context, valid, active = prompts["prompt"], prompts["prompt_valid"], np.ones(len(episodes), bool)
        for turn in range(self.turns):
            tokens, logp = ctx.apply(self._greedy, context, valid, active, batch_size=c.eval.batch_size)
            env.absorb(episodes, tokens, logp, last=turn == self.turns - 1)
            context, valid, active = env.contexts(episodes)
            if not active.any():
                break
        qs = self.questions[split][offset:offset + len(episodes)]
        _, grades = self.grade(episodes, [q.golden_answers for q in qs])
        hops = np.array([q.hops or 0 for q in qs])
        by_hop = {f"em_hop{h}": float(grades["em"][hops == h].mean()) for h in sorted(set(hops) - {0})}
        return {**{k: float(v.mean()) for k, v in grades.items()}, **by_hop,
                "searches": float(np.mean([len(e.queries) for e in episodes]))}

    def grade(self, episodes: list[Episode], golds: list) -> tuple[list[str], dict[str, np.ndarray]]:
        """Each rollout's text after the prompt and its ``em``, ``f1`` (of the final answer, best gold) and
        ``format`` (``format_reward``), ``[B]`` each."""
        texts = [e.policy_text(self.tokenizer) for e in episodes]
        answers = [final_answer(t) or "" for t in texts]
        grades = {"em": [qa_metrics.exact_match(a, g) for a, g in zip(answers, golds)],
                  "f1": [qa_metrics.f1(a, g) for a, g in zip(answers, golds)],
                  "format": [format_reward(t, self.config.agent.max_turns) for t in texts]}
        return texts, {k: np.asarray(v, np.float32) for k, v in grades.items()}

    @functools.cached_property
    def _greedy(self):
        def greedy(model, context, valid, active):
            return self._sample(model, context, valid, active, jax.random.key(0), temperature=0.0)
        return greedy


@register("search_agent")
class SearchAgentTask(_SearchAgentBase):
    """Search-R1's GRPO (``method="search_r1"``) or SD-Search (``"sd_search"``) on the QA world."""

    def __init__(self, config):
        super().__init__(config)
        if config.method not in METHODS:
            raise ValueError(f"method={config.method!r}: one of {METHODS}")
        if config.method == "ig_search" and config.rl.updates_per_rollout != 1:
            raise ValueError("ig_search scores the gold answer under the rollout-time policy inside the first "
                             "update: rl.updates_per_rollout must be 1")

    def train_source(self):
        return InMemorySource.from_arrays(self._prompts(self.config.data.split)), None

    def inputs(self) -> dict[str, jax.ShapeDtypeStruct]:
        C = self.config.agent.context
        return {"prompt": jax.ShapeDtypeStruct((C,), np.int32), "prompt_valid": jax.ShapeDtypeStruct((C,), bool),
                "question": jax.ShapeDtypeStruct((), np.int32)}

    def init_extra(self, params, rng: jax.Array) -> dict:
        return {"reference": params}  # GRPO's frozen reference policy, sharded like the parameters

    @property
    def updates_per_rollout(self) -> int:
        return self.config.rl.updates_per_rollout

    # --- one train step: rollout -> interact ... -> score -> update -----------------------------------------

    def rollout(self, ctx, state, batch: Batch, rng: jax.Array) -> Batch:
        """Turn 1: each question ``agent.group`` times from its prompt; later turns: the host's contexts."""
        if "context" not in batch:
            g = self.config.agent.group
            batch = {"context": jnp.repeat(batch["prompt"], g, 0), "valid": jnp.repeat(batch["prompt_valid"], g, 0),
                     "active": jnp.ones((batch["prompt"].shape[0] * g,), bool),
                     "question": jnp.repeat(batch["question"], g, 0)}
        tokens, logp = self._sample(ctx.model(state.params), batch["context"], batch["valid"], batch["active"], rng,
                                    self.config.agent.temperature)
        return {**batch, "generated": tokens, "gen_logp": logp}

    def _absorb(self, rollout: dict[str, np.ndarray], first: bool, last: bool) -> list[Episode]:
        """The step's episodes (``first``: started from this turn's contexts) with this turn's tokens added."""
        if first:
            self._episodes = self.env.start([c[v] for c, v in zip(rollout["context"], rollout["valid"])])
        self.env.absorb(self._episodes, rollout["generated"], rollout["gen_logp"], last=last)
        return self._episodes

    def interact(self, rollout: dict[str, np.ndarray], step: int, turn: int) -> dict[str, np.ndarray]:
        context, valid, active = self.env.contexts(self._absorb(rollout, first=turn == 1, last=False))
        return {"context": context, "valid": valid, "active": active, "question": rollout["question"]}

    def score(self, rollout: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
        episodes = self._absorb(rollout, first=self.turns == 1, last=True)
        c = self.config
        golds = [self.questions[c.data.split][int(q)].golden_answers for q in rollout["question"]]
        texts, grades = self.grade(episodes, golds)
        em, f1, fmt = grades["em"], grades["f1"], grades["format"]
        reward = em + c.rl.format_bonus * fmt
        out = {**self.env.layout(episodes, c.agent.context + c.agent.turn_tokens), "reward": reward, "em": em,
               "format": fmt, "advantage": group_advantages(reward, c.agent.group),
               "searches": np.array([len(e.queries) for e in episodes], np.float32),
               "overflow": np.array([e.overflow for e in episodes], np.float32)}
        if c.method == "sd_search":
            out.update(self.hindsight_teacher(episodes, texts, f1 >= c.sd.correct_f1))
        if c.method == "ig_search":
            out.update(self.counterfactuals(episodes, golds, step))
        return out

    def counterfactuals(self, episodes: list[Episode], golds: list, step: int) -> dict[str, np.ndarray]:
        """IG-Search's scoring inputs (``teachers.counterfactual_inputs``), drawn with a (seed, step) rng; with
        ``ig.share_prefix`` only the part after the rollout's own prefix (documents, lead, answer)."""
        c = self.config
        return counterfactual_inputs(episodes, golds, self.tokenizer, np.random.default_rng([c.seed, step]),
                                     steps=c.agent.max_turns, counterfactuals=c.ig.counterfactuals,
                                     max_golds=c.ig.max_golds, answer_tokens=c.ig.answer_tokens,
                                     length=c.agent.context + c.agent.turn_tokens + c.ig.answer_tokens,
                                     documents_tokens=self.env.documents_tokens if c.ig.share_prefix else 0)

    def information_gains(self, model: nnx.Module, batch: Batch) -> jax.Array:
        """``IG [B, S]`` under the current policy, which in the first update is the rollout-time pi_old: each
        sequence's ``answer_score``, then ``step_gains``. Shared prefixes (``ig_start`` in the batch) are
        scored from one cached pass over the rollout (``policy.continuation_logprobs``)."""
        ig = self.config.ig
        if "ig_start" in batch:
            logp = policy.continuation_logprobs(model, self.policy_config, batch["tokens"], batch["valid"],
                                                batch["ig_start"], batch["ig_tokens"], batch["ig_valid"],
                                                scored_from=self.env.documents_tokens)
            B, M, S = logp.shape
            scores = answer_score(logp.reshape(B * M, S), batch["ig_answer"].reshape(B * M, S), ig.first_tokens,
                                  ig.first_weight).reshape(B, M)
        else:
            def row_scores(row):
                tokens, valid, answer = row
                logp = policy.token_logprobs(model, tokens, valid)                      # [M, L]
                return answer_score(logp, answer, ig.first_tokens, ig.first_weight)    # [M]

            scores = jax.lax.map(row_scores, (batch["ig_tokens"], batch["ig_valid"], batch["ig_answer"]))
        return step_gains(jax.lax.stop_gradient(scores), batch["ig_index"], steps=self.config.agent.max_turns,
                          variants=1 + ig.counterfactuals, golds=ig.max_golds)

    def hindsight_teacher(self, episodes: list[Episode], texts: list[str], correct: np.ndarray) -> dict:
        """SD-Search's teacher input (``teachers.hindsight_inputs``)."""
        c = self.config
        return hindsight_inputs(episodes, texts, correct, self.tokenizer, group=c.agent.group,
                                length=c.agent.context + c.agent.turn_tokens, max_positions=c.sd.max_positions,
                                hindsight_tokens=c.sd.hindsight_tokens)

    def update(self, ctx, state, batch: Batch, rng: jax.Array):
        c = self.config
        reference = ctx.model(state.extra["reference"])
        temperature = c.agent.temperature

        def loss(model, batch, rng):
            logits = policy.logits_of(model, batch["tokens"], batch["valid"])
            logp = policy.picked_logprobs(logits, batch["tokens"], batch["valid"], temperature)
            ref = jax.lax.stop_gradient(policy.token_logprobs(reference, batch["tokens"], batch["valid"], temperature))
            advantage, extra = batch["advantage"], {}
            if c.method == "ig_search":
                ig = self.information_gains(model, batch)
                advantage = ig_token_advantages(advantage, batch["query_step"], ig, alpha=c.ig.alpha,
                                                dead_zone=c.ig.dead_zone, negative_scale=c.ig.negative_scale)
                steps = jnp.maximum(jnp.sum(ig != 0), 1)
                extra = {"ig_mean": jnp.sum(ig) / steps, "ig_positive": jnp.sum(ig > 0) / steps}
            value, metrics = grpo_loss(logp, batch["old_logp"], ref, advantage, batch["mask"],
                                       clip=c.rl.clip, kl=c.rl.kl)
            metrics = {**metrics, **extra}
            if c.method == "sd_search":
                t_logits = policy.logits_of(model, batch["teacher_tokens"], batch["teacher_valid"])
                pick = lambda x, pos: jnp.take_along_axis(x, pos[..., None], axis=1)  # noqa: E731
                jsd = jensen_shannon(pick(logits, batch["sd_student_pos"]),
                                     jax.lax.stop_gradient(pick(t_logits, batch["sd_teacher_pos"])),
                                     batch["sd_positions"])
                value, metrics = value + c.sd.weight * jsd, {**metrics, "jsd": jsd}
            means = {k: jnp.mean(batch[k]) for k in ("reward", "em", "format", "searches", "overflow")}
            return value, {**metrics, **means, "response_tokens": jnp.mean(jnp.sum(batch["mask"], 1))}

        return ctx.gradient_step(state, batch, rng, loss)


@register("search_agent_sft")
class SearchAgentSFTTask(_SearchAgentBase):
    """The supervised warm start a policy trained from scratch needs before RL (an instruct model does not):
    teacher-forced cross-entropy on the policy's tokens of oracle rollouts (``oracle_episode``), the
    retriever's real documents in between (masked)."""

    @functools.cached_property
    def layouts(self) -> dict[str, np.ndarray]:
        a, qs = self.config.agent, self.questions[self.config.data.split]
        titles = {p.id: p.title for p in self.retriever.passages}
        episodes = [oracle_episode(self.env, self.prompt_ids(q.question), [titles[p] for p in q.supporting_passages],
                                   q.golden_answers[0]) for q in qs]
        out = self.env.layout(episodes, a.context + a.turn_tokens)
        return {k: out[k] for k in ("tokens", "valid", "mask")}

    def train_source(self):
        return InMemorySource.from_arrays(self.layouts), None

    def loss(self, model: nnx.Module, batch: Batch, rng: jax.Array):
        logp = policy.token_logprobs(model, batch["tokens"], batch["valid"])
        tokens = jnp.maximum(jnp.sum(batch["mask"]), 1.0)
        return -jnp.sum(logp * batch["mask"]) / tokens, {"tokens_per_row": jnp.mean(jnp.sum(batch["mask"], 1))}


def oracle_episode(env: SearchEnvironment, prompt: list[int], titles: list[str], answer: str) -> Episode:
    """The rollout an oracle writes: one ``<search>`` per hop for the title of that hop's supporting passage
    (the retriever answers it), then ``<answer>``; searches past ``agent.max_turns`` are dropped."""
    (e,) = env.start([prompt])
    for title in titles[:env.max_turns]:
        ids = env.tok.encode(f" <search> {title} </search>")
        env.absorb([e], np.array([ids]), np.zeros((1, len(ids))), last=False)
    ids = env.tok.encode(f" <answer> {answer} </answer>")
    env.absorb([e], np.array([ids]), np.zeros((1, len(ids))), last=True)
    return e
