"""RQ-KMeans semantic IDs: level-by-level residual k-means over item embeddings (models/semantic_ids.py).

The model has no parameters: the codebooks, the pass accumulators and the schedule (which level, which
pass, which batch of the pass) are task state; a step is a sharded, streamed Lloyd step. Evaluation
assigns the items and reports collisions, utilisation and entropy (trainers/evaluators/sid_metrics.py).
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
from flax import nnx

from data_pipelines.sid.embeddings import EmbeddingRows, item_vectors
from models.semantic_ids import init_rq_kmeans_state, residual_codes, rq_kmeans_step
from trainers.evaluators.sid_metrics import sid_metrics
from trainers.mesh import BATCH_AXES
from trainers.tasks import EvalContext, Task, Tower, register, with_axes

AXES = {"codebooks": ("levels", "codes", "embed"), "usage": ("levels", "codes"), "sums": ("codes", "embed"),
        "counts": ("codes",), "far_d2": ("codes",), "far_points": ("codes", "embed"),
        "item_codes": ("items", None)}  # [items of a pass, L - 1]: replicated unless sharding.rules.items


class NoParams(nnx.Module):
    """RQ-KMeans keeps everything in task state."""


def assign(model: nnx.Module, x: jax.Array, codebooks: jax.Array, chunk_rows: int = 0) -> jax.Array:
    """``x [b, d] -> codes [b, L]`` int32 against ``codebooks [L, K, d]``."""
    return residual_codes(x, codebooks, chunk_rows)[0]


@register("sid_rq_kmeans")
class RQKMeansTask(Task):
    shuffle = False  # a pass is the items in order: exact Lloyd, the same first batch on every run

    @functools.cached_property
    def vectors(self) -> np.ndarray:
        return item_vectors(self.config.data, self.config.model.dim, self.config.seed)

    @property
    def batches_per_pass(self) -> int:
        d = self.config.data
        n = len(self.vectors) if d.embeddings else d.num_items
        if d.embeddings and d.num_items not in (0, n):
            raise ValueError(f"data.num_items={d.num_items} but {d.embeddings} holds {n} rows (0: use the file's)")
        return math.ceil(n / self.config.train.batch_size)

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return NoParams()

    def inputs(self):
        return {"x": jax.ShapeDtypeStruct((self.config.model.dim,), np.float32),
                "w": jax.ShapeDtypeStruct((), np.float32)}

    def train_source(self):
        m, steps = self.config.model, self.config.train.steps
        if steps < m.levels * m.iterations * self.batches_per_pass:  # later steps are no-ops: more is fine
            raise ValueError(f"train.steps={steps} does not fit {m.levels} levels x {m.iterations} passes x "
                             f"{self.batches_per_pass} batches; set train.steps="
                             f"{m.levels * m.iterations * self.batches_per_pass} (ecomax sid build does)")
        return EmbeddingRows(self.vectors, self.batches_per_pass * self.config.train.batch_size), None

    def init_extra(self, params, rng: jax.Array) -> dict:
        m = self.config.model
        rows = self.batches_per_pass * self.config.train.batch_size
        state = init_rq_kmeans_state(m.levels, m.codes, m.dim, rows)
        return {k: with_axes(v, AXES[k]) if k in AXES else v for k, v in state.items()}

    def update(self, ctx, state, batch, rng: jax.Array):
        m = self.config.model
        if self.config.train.batch_size < m.codes:
            raise ValueError(f"train.batch_size={self.config.train.batch_size} < model.codes={m.codes}: a level "
                             "is seeded from one batch, which needs at least one item per code")
        extra, metrics = rq_kmeans_step(state.extra, batch["x"], batch["w"], rng, mesh=ctx.mesh, axes=BATCH_AXES,
                                        iterations=m.iterations, batches_per_pass=self.batches_per_pass,
                                        init=m.init, reset_dead=m.dead_code_reset, chunk_rows=m.chunk_rows)
        return state.replace(extra=extra), metrics

    def towers(self) -> dict[str, Tower]:
        return {"assign": Tower(assign, {"x": jax.ShapeDtypeStruct((self.config.model.dim,), np.float32)})}

    def assign(self, ctx: EvalContext, vectors: np.ndarray) -> np.ndarray:
        """``vectors [n, d] -> codes [n, L]`` on the mesh, in chunks of ``eval.batch_size`` rows."""
        fn = functools.partial(assign, chunk_rows=self.config.model.chunk_rows)
        return ctx.apply(fn, vectors, batch_size=self.config.eval.batch_size,
                         replicated={"codebooks": ctx.extra["codebooks"]})

    def codebooks(self, state) -> jax.Array:
        return state.extra["codebooks"]  # [L, K, d]

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        limit = self.config.eval.max_examples or len(self.vectors)
        m = self.config.model
        return sid_metrics(self.assign(ctx, self.vectors[:limit]), [m.codes] * m.levels)
