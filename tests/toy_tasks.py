"""Two tiny tasks that exercise the engine's contract beyond the gradient step, and their configs.

* ``toy_kmeans``: Lloyd's k-means. The centroids and usage counts are task-owned state (``init_extra``,
  sharded by logical names); the update is one sharded Lloyd iteration (a ``psum`` of per-shard centroid
  sums and counts) instead of a gradient step.
* ``toy_grpo``: a tiny autoregressive policy that must emit a target token sequence, trained from reward
  alone with GRPO. Each step's batch is made by the live policy (``rollout``: sampling, rollout-time
  log-probs), scored on the host (``score``: the exact-match reward, group-relative advantages, a running
  reward mean kept in ``host_state``), then ``updates_per_rollout`` clipped-surrogate updates; a frozen
  copy of the initial policy (task state) anchors a KL penalty.

Used as ``task = "tests.toy_tasks:toy_kmeans"``; ``get_config`` makes this file a config file too:
``ecomax train --config tests/toy_tasks.py:kmeans``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from configs.common import base_config
from data_pipelines.loader import InMemorySource
from trainers.losses import group_advantages, grpo_loss
from trainers.mesh import BATCH_AXES
from trainers.tasks import Batch, EvalContext, Task, register, with_axes

# --- k-means -----------------------------------------------------------------------------------------------


def mixture(num_points: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """``[num_points, dim]`` float32 points from ``clusters`` well-separated Gaussians."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 4.0, (clusters, dim))
    return (centres[rng.integers(clusters, size=num_points)] + rng.normal(size=(num_points, dim))).astype(np.float32)


def lloyd_reference(points: np.ndarray, centroids: np.ndarray, iterations: int) -> np.ndarray:
    """Plain numpy Lloyd iterations (an empty cluster keeps its centroid)."""
    c = centroids.astype(np.float64)
    for _ in range(iterations):
        assign = np.argmin(((points[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        for j in range(len(c)):
            if np.any(assign == j):
                c[j] = points[assign == j].mean(0)
    return c


class NoParams(nnx.Module):
    """k-means keeps everything in task state: the model has no parameters."""


def _lloyd_sums(points: jax.Array, centroids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One shard's ``[k, d]`` sums of its points per nearest centroid, ``[k]`` counts and summed distance."""
    d2 = jnp.sum((points[:, None, :] - centroids[None]) ** 2, axis=-1)          # [b, k]
    onehot = jax.nn.one_hot(jnp.argmin(d2, axis=1), centroids.shape[0], dtype=points.dtype)
    return onehot.T @ points, onehot.sum(0), jnp.min(d2, axis=1).sum()


@register("toy_kmeans")
class KMeansTask(Task):
    @functools.cached_property
    def points(self) -> np.ndarray:
        d = self.config.data
        return mixture(d.num_points, d.dim, d.clusters, self.config.seed)

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return NoParams()

    def train_source(self):
        return InMemorySource([{"x": p} for p in self.points], "points"), None

    def init_extra(self, params: Any, rng: jax.Array) -> dict:
        k = self.config.model.codes
        return {"centroids": with_axes(jnp.asarray(self.points[:k]), ("codes", "embed")),
                "counts": with_axes(jnp.zeros((k,), jnp.int32), ("codes",))}

    def update(self, ctx, state, batch: Batch, rng: jax.Array):
        """One Lloyd iteration over the global batch: per-shard sums, a ``psum`` over the data axes."""
        centroids = state.extra["centroids"]

        @functools.partial(jax.shard_map, mesh=ctx.mesh, in_specs=(jax.P(BATCH_AXES), jax.P()),
                           out_specs=(jax.P(), jax.P(), jax.P()))
        def sums(points, centroids):
            return jax.tree.map(lambda x: jax.lax.psum(x, BATCH_AXES), _lloyd_sums(points, centroids))

        total, counts, inertia = sums(batch["x"], centroids)
        new = jnp.where(counts[:, None] > 0, total / jnp.maximum(counts, 1)[:, None], centroids)
        extra = {"centroids": new, "counts": state.extra["counts"] + counts.astype(jnp.int32)}
        return state.replace(extra=extra), {"inertia": inertia / batch["x"].shape[0],
                                            "empty_codes": jnp.sum(counts == 0)}

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        centroids = np.asarray(jax.device_get(ctx.extra["centroids"]))
        d2 = ((self.points[:, None, :] - centroids[None]) ** 2).sum(-1)
        return {"inertia": float(d2.min(1).mean())}


# --- GRPO --------------------------------------------------------------------------------------------------


class Policy(nnx.Module):
    """``p(token_t | token_{t-1}, t)``: embeddings of the previous token and the position, an MLP, logits."""

    def __init__(self, vocab: int, length: int, width: int, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.token = nnx.Param(init(rngs.params(), (vocab + 1, width)), out_sharding=(None, "embed"))  # +1: BOS
        self.position = nnx.Param(init(rngs.params(), (length, width)), out_sharding=(None, "embed"))
        self.hidden = nnx.Linear(width, width, rngs=rngs,
                                 kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                                 bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)))
        self.out = nnx.Linear(width, vocab, rngs=rngs,
                              kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("mlp", "vocab")),
                              bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("vocab",)))
        self.bos = vocab

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``tokens [b, L] -> log-probs [b, L, vocab]`` of each token given the one before (teacher forcing)."""
        prev = jnp.concatenate([jnp.full_like(tokens[:, :1], self.bos), tokens[:, :-1]], axis=1)
        h = jax.nn.gelu(self.hidden(self.token[...][prev] + self.position[...][None, : tokens.shape[1]]))
        return jax.nn.log_softmax(self.out(h), axis=-1)


def token_logprobs(model: Policy, tokens: jax.Array) -> jax.Array:
    """``[b, L]`` log-probability of each sampled token."""
    return jnp.take_along_axis(model(tokens), tokens[..., None], axis=-1)[..., 0]


@register("toy_grpo")
class GRPOTask(Task):
    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.reward_mean, self.rollouts = 0.0, 0  # host-side running statistics

    @property
    def target(self) -> np.ndarray:
        return np.asarray(self.config.model.target, np.int32)

    def build_model(self, rngs: nnx.Rngs) -> Policy:
        m = self.config.model
        return Policy(m.vocab, len(m.target), m.width, rngs)

    def init_extra(self, params: Any, rng: jax.Array) -> dict:
        return {"reference": params}  # a frozen copy of the initial policy, sharded like the parameters

    @property
    def updates_per_rollout(self) -> int:
        return self.config.rl.updates_per_rollout

    def rollout(self, ctx, state, batch: Batch, rng: jax.Array) -> Batch:
        """Sample ``train.batch_size`` sequences token by token with the live policy."""
        model, length = ctx.model(state.params), len(self.config.model.target)
        tokens = jnp.zeros((self.config.train.batch_size, length), jnp.int32)
        for t in range(length):  # position t depends only on tokens < t
            logits = model(tokens)[:, t]
            tokens = tokens.at[:, t].set(jax.random.categorical(jax.random.fold_in(rng, t), logits))
        return {"tokens": tokens, "old_logp": token_logprobs(model, tokens)}

    def reward(self, tokens: np.ndarray) -> np.ndarray:
        """The fraction of positions equal to the target: ``[n, L] -> [n]``."""
        return (tokens == self.target[None]).mean(1).astype(np.float32)

    def score(self, rollout: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
        rewards = self.reward(rollout["tokens"])
        self.rollouts += 1
        self.reward_mean += (float(rewards.mean()) - self.reward_mean) / min(self.rollouts, 10)
        n = len(rewards)
        return {**rollout, "reward": rewards, "advantage": group_advantages(rewards, self.config.rl.group),
                "reward_mean": np.full((n,), self.reward_mean, np.float32)}

    def host_state(self) -> dict:
        return {"reward_mean": self.reward_mean, "rollouts": self.rollouts}

    def load_host_state(self, state: dict) -> None:
        self.reward_mean, self.rollouts = state.get("reward_mean", 0.0), state.get("rollouts", 0)

    def update(self, ctx, state, batch: Batch, rng: jax.Array):
        rl = self.config.rl
        reference = ctx.model(state.extra["reference"])

        def loss(model, batch, rng):
            value, metrics = grpo_loss(token_logprobs(model, batch["tokens"]), batch["old_logp"],
                                       jax.lax.stop_gradient(token_logprobs(reference, batch["tokens"])),
                                       batch["advantage"], batch.get("mask"), clip=rl.clip, kl=rl.kl)
            return value, {**metrics, "reward": jnp.mean(batch["reward"]),
                           "reward_mean": jnp.mean(batch["reward_mean"])}

        return ctx.gradient_step(state, batch, rng, loss)

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        """The greedy sequence's reward."""
        tokens = np.zeros((1, len(self.target)), np.int32)
        for t in range(len(self.target)):
            tokens[0, t] = int(np.argmax(ctx.apply(_policy_logprobs, tokens)[0, t]))
        return {"greedy_reward": float(self.reward(tokens)[0])}


def _policy_logprobs(model: Policy, tokens: jax.Array) -> jax.Array:
    return model(tokens)


@register("toy_grpo_turns")
class TwoTurnGRPOTask(GRPOTask):
    """The toy GRPO task as a two-turn agent: turn 1 samples the first half of the sequence, the host
    environment (``interact``) writes the target's next token into the context, as a retriever inserts
    documents, and turn 2 samples the rest after it. The inserted position is masked out of the loss
    (``mask``, which the base task's update passes to ``grpo_loss``)."""

    turns = 2

    @property
    def half(self) -> int:
        return len(self.target) // 2

    def rollout(self, ctx, state, batch: Batch, rng: jax.Array) -> Batch:
        model, length = ctx.model(state.params), len(self.target)
        first = "tokens" not in batch
        tokens = jnp.zeros((self.config.train.batch_size, length), jnp.int32) if first else batch["tokens"]
        for t in range(0, self.half) if first else range(self.half + 1, length):
            logits = model(tokens)[:, t]
            tokens = tokens.at[:, t].set(jax.random.categorical(jax.random.fold_in(rng, t), logits))
        mask = jnp.ones(tokens.shape, jnp.float32).at[:, self.half].set(0.0)
        return {"tokens": tokens, "old_logp": token_logprobs(model, tokens), "mask": mask}

    def interact(self, rollout: dict[str, np.ndarray], step: int, turn: int) -> dict[str, np.ndarray]:
        self.interactions = getattr(self, "interactions", 0) + 1
        tokens = rollout["tokens"].copy()
        tokens[:, self.half] = self.target[self.half]
        return {"tokens": tokens}

    def reward(self, tokens: np.ndarray) -> np.ndarray:
        keep = np.arange(tokens.shape[1]) != self.half  # the environment's token earns nothing
        return (tokens == self.target[None])[:, keep].mean(1).astype(np.float32)


# --- configs -----------------------------------------------------------------------------------------------


def get_config(arg: str = "kmeans") -> ml_collections.ConfigDict:
    c = base_config()
    c.train.log_every = 1
    c.train.async_checkpoints = True
    c.sharding.rules.codes = "tensor"
    c.model = ml_collections.ConfigDict()
    if arg == "kmeans":
        c.task = "tests.toy_tasks:toy_kmeans"
        c.train.steps, c.train.batch_size, c.train.checkpoint_every = 12, 512, 4
        c.data.num_points, c.data.dim, c.data.clusters = 512, 8, 6
        c.model.codes = 8
    elif arg in ("grpo", "grpo_turns"):
        c.task = f"tests.toy_tasks:toy_{arg}"
        c.train.steps, c.train.batch_size, c.train.checkpoint_every = 60, 64, 10
        c.train.grad_clip_norm = 1.0
        c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.schedule = 0.05, 1, "constant"
        c.optimizer.weight_decay = 0.0
        c.model.vocab, c.model.width, c.model.target = 8, 32, [3, 1, 4, 1, 5]
        c.rl = ml_collections.ConfigDict({"group": 8, "updates_per_rollout": 2, "clip": 0.2, "kl": 0.01})
    else:
        raise KeyError(arg)
    return c
