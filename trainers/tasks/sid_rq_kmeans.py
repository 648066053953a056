"""RQ-KMeans semantic IDs: level-by-level residual k-means over item embeddings (models/semantic_ids.py).

The model has no parameters: the codebooks, the pass accumulators and the schedule (which level, which
pass, which batch of the pass) are task state; a step is a sharded, streamed Lloyd step (``model.balanced``:
OneRec's balanced assignment). Evaluation assigns the items (nearest code at every level, then with
``model.fsq_levels`` one FSQ level on the final residual, OneMall) and reports collisions, utilisation and
entropy (trainers/evaluators/sid_metrics.py), writing ``WORKDIR/sid_step{step}.png``
(trainers/evaluators/sid_plots.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.sid.embeddings import EmbeddingRows, item_vectors
from models.semantic_ids import fsq_last_level, fsq_projection, init_rq_kmeans_state, residual_codes, rq_kmeans_step
from trainers.evaluators.sid_plots import sid_report
from trainers.mesh import BATCH_AXES
from trainers.tasks import EvalContext, Task, Tower, register, with_axes

AXES = {"codebooks": ("levels", "codes", "embed"), "usage": ("levels", "codes"), "mse": ("levels",),
        "sums": ("codes", "embed"),
        "counts": ("codes",), "far_d2": ("codes",), "far_points": ("codes", "embed"),
        "item_codes": ("items", None)}  # [items of a pass, L - 1]: replicated unless sharding.rules.items


class NoParams(nnx.Module):
    """RQ-KMeans keeps everything in task state."""


def assign(model: nnx.Module, x: jax.Array, codebooks: jax.Array, chunk_rows: int = 0, projection=None,
           mse=None, fsq_levels: tuple[int, ...] = ()) -> jax.Array:
    """``x [b, d] -> codes [b, L]`` int32 against ``codebooks [L, K, d]``: the nearest code at every level
    (also for a ``model.balanced`` fit: OneRec's balanced k-means shapes the codebooks, and an item's code is
    its nearest centroid, a function of the item alone). With ``fsq_levels`` (``projection [d, m]``,
    ``mse [L]`` the fit's per-level mean squared residual): ``[b, L + 1]``, the last column the FSQ code of
    the final residual, scaled by its per-coordinate RMS ``sqrt(mse[-1] / d)`` (``fsq_last_level``)."""
    codes, r = residual_codes(x, codebooks, chunk_rows)
    if not fsq_levels:
        return codes
    scale = jnp.sqrt(jnp.maximum(mse[-1], 1e-30) / x.shape[-1])
    return jnp.concatenate([codes, fsq_last_level(r, projection, scale, fsq_levels)[:, None]], axis=1)


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
                                        init=m.init, reset_dead=m.dead_code_reset, chunk_rows=m.chunk_rows,
                                        balanced=m.balanced, init_rows=m.init_rows)
        return state.replace(extra=extra), metrics

    def towers(self) -> dict[str, Tower]:
        return {"assign": Tower(assign, {"x": jax.ShapeDtypeStruct((self.config.model.dim,), np.float32)})}

    @property
    def sid_sizes(self) -> list[int]:
        """Each SID level's codebook size: ``[K] * L``, then ``prod(model.fsq_levels)`` with FSQ."""
        m = self.config.model
        return [m.codes] * m.levels + ([math.prod(m.fsq_levels)] if m.fsq_levels else [])

    def assign(self, ctx: EvalContext, vectors: np.ndarray) -> np.ndarray:
        """``vectors [n, d] -> codes [n, len(sid_sizes)]`` on the mesh, in chunks of ``eval.batch_size`` rows."""
        m = self.config.model
        levels = tuple(int(v) for v in m.fsq_levels)
        if any(v < 2 for v in levels):
            raise ValueError(f"model.fsq_levels={list(levels)}: every FSQ dimension needs at least 2 levels")
        fn = functools.partial(assign, chunk_rows=m.chunk_rows, fsq_levels=levels)
        replicated = {"codebooks": ctx.extra["codebooks"]}
        if levels:
            replicated |= {"projection": fsq_projection(m.dim, len(levels), self.config.seed), "mse": ctx.extra["mse"]}
        return ctx.apply(fn, vectors, batch_size=self.config.eval.batch_size, replicated=replicated)

    def codebooks(self, state) -> jax.Array:
        return state.extra["codebooks"]  # [L, K, d]

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        """SID metrics of the first ``eval.max_examples`` items (0: all), and their PNG
        (``WORKDIR/sid_step{step}.png``, ``sid_report``)."""
        limit = self.config.eval.max_examples or len(self.vectors)
        return sid_report(self.assign(ctx, self.vectors[:limit]), self.sid_sizes, ctx.workdir, ctx.step)
