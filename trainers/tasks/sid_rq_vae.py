"""RQ-VAE semantic IDs (models/rq_vae.py): reconstruction + residual-quantisation loss with the
straight-through estimator; the codebooks start as k-means of the first batch's latents, level by level.
Evaluation assigns the items and reports the SID metrics, as RQ-KMeans does."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.sid.embeddings import EmbeddingRows, item_vectors
from models.rq_vae import RQVAE
from models.semantic_ids import kmeans_plus_plus, lloyd_sums, nearest
from trainers.evaluators.sid_metrics import sid_metrics
from trainers.losses.semantic_ids import rq_vae_loss
from trainers.tasks import EvalContext, Task, Tower, register


def encode_codes(model: RQVAE, x: jax.Array) -> jax.Array:
    """``x [b, D] -> codes [b, L]``."""
    return model.quantise(model.encode(x))["codes"]


def kmeans_codebooks(z: jax.Array, codes: int, levels: int, rng: jax.Array, iterations: int) -> jax.Array:
    """Residual k-means (k-means++ seeds, ``iterations`` Lloyd steps) of ``z [b, d]`` -> ``[L, K, d]``."""
    books, r = [], z
    for level in range(levels):
        c = kmeans_plus_plus(r, jnp.ones(r.shape[0]), jax.random.uniform(jax.random.fold_in(rng, level), (codes,)))
        for _ in range(iterations):
            s = lloyd_sums(r, jnp.ones(r.shape[0]), c)
            c = jnp.where(s["counts"][:, None] > 0, s["sums"] / jnp.maximum(s["counts"], 1)[:, None], c)
        books.append(c)
        r = r - c[nearest(r, c)[0]]
    return jnp.stack(books)


@register("sid_rq_vae")
class RQVAETask(Task):
    @functools.cached_property
    def vectors(self) -> np.ndarray:
        return item_vectors(self.config.data, self.config.model.dim, self.config.seed)

    def build_model(self, rngs: nnx.Rngs) -> RQVAE:
        m = self.config.model
        return RQVAE([m.dim, *m.hidden, m.latent], m.levels, m.codes, rngs)

    def inputs(self):
        return {"x": jax.ShapeDtypeStruct((self.config.model.dim,), np.float32),
                "w": jax.ShapeDtypeStruct((), np.float32)}

    def train_source(self):
        return EmbeddingRows(self.vectors), None

    def loss(self, model: RQVAE, batch, rng):
        return rq_vae_loss(batch["x"], model(batch["x"]), self.config.model.beta)

    def update(self, ctx, state, batch, rng):
        """At step 0 the codebooks become residual k-means of the first batch's latents (TIGER, Sec. 3.1:
        "k-means clustering-based initialization"), then the gradient step."""
        m = self.config.model

        def init(params):
            z = ctx.model(params).encode(batch["x"])
            return {**params, "codebooks": kmeans_codebooks(z, m.codes, m.levels, rng, m.init_iterations)}

        params = jax.lax.cond(state.step == 0, init, lambda p: p, state.params)
        return ctx.gradient_step(state.replace(params=params), batch, rng)

    def towers(self) -> dict[str, Tower]:
        return {"assign": Tower(encode_codes, {"x": jax.ShapeDtypeStruct((self.config.model.dim,), np.float32)})}

    def assign(self, ctx: EvalContext, vectors: np.ndarray) -> np.ndarray:
        """``vectors [n, D] -> codes [n, L]`` on the mesh, in chunks of ``eval.batch_size`` rows."""
        return ctx.apply(encode_codes, vectors, batch_size=self.config.eval.batch_size)

    def codebooks(self, state) -> jax.Array:
        return state.params["codebooks"]  # [L, K, latent]

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        limit = self.config.eval.max_examples or len(self.vectors)
        m = self.config.model
        return sid_metrics(self.assign(ctx, self.vectors[:limit]), [m.codes] * m.levels)
