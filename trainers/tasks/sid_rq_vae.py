"""RQ-VAE semantic IDs (models/rq_vae.py): reconstruction + residual-quantisation loss with the
straight-through estimator (or the rotation trick); the codebooks start as k-means of the first batch's
latents, level by level; codes a window of batches left unused are re-seeded. ``model.collision`` adds a
collision regulariser on batches of co-engaged item pairs: QuaSID (HaMR + CVPM + dual-tower InfoNCE) or
AdaSID (relaxed, load-weighted repulsion + a progress schedule). Evaluation assigns the items and reports
the SID metrics, as RQ-KMeans does."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.sid.embeddings import (EmbeddingRows, PairedEmbeddingRows, item_vectors, read_id_map,
                                           synthetic_catalogue, synthetic_pairs)
from data_pipelines.sid.pairs import load_pairs, partner_table
from models.rq_vae import RQVAE, revive_codes
from models.semantic_ids import kmeans_plus_plus, lloyd_sums, nearest
from trainers.evaluators.sid_plots import sid_report
from trainers.losses import semantic_ids as L
from trainers.tasks import EvalContext, Task, Tower, register, with_axes

COLLISION = ("none", "quasid", "adasid")


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

    @property
    def collision(self) -> str:
        method = self.config.model.collision
        if method not in COLLISION:
            raise ValueError(f"model.collision must be one of {', '.join(COLLISION)}, not {method!r}")
        return method

    @functools.cached_property
    def pairs(self) -> np.ndarray:
        """Co-engaged pairs as rows of ``vectors``, ``[P, 2]``: ``data.pairs`` (item ids; ``none``: no pairs, so
        no collaborative term, repulsion only), or the synthetic catalogue's (items of one category)."""
        d = self.config.data
        if d.pairs == "none":
            return np.zeros((0, 2), np.int32)
        if d.pairs:
            return load_pairs(d.pairs, self._ids())
        if not d.synthetic or d.embeddings:
            raise ValueError(f"model.collision={self.collision} trains on co-engaged item pairs: set data.pairs="
                             "PAIRS.npy ([P, 2] item ids; ecomax sid pairs writes them from KuaiSearch sessions)")
        _, category = synthetic_catalogue(d.num_items, self.config.model.dim, d.clusters, self.config.seed)
        return synthetic_pairs(category, d.pairs_per_item, self.config.seed)

    def _ids(self) -> np.ndarray:
        return (read_id_map(self.config.data.embeddings, len(self.vectors)) if self.config.data.embeddings
                else np.arange(len(self.vectors), dtype=np.int64))

    def build_model(self, rngs: nnx.Rngs) -> RQVAE:
        m = self.config.model
        return RQVAE([m.dim, *m.hidden, m.latent], m.levels, m.codes, rngs, rotation=m.rotation_trick)

    def inputs(self):
        x = jax.ShapeDtypeStruct((self.config.model.dim,), np.float32)
        scalar = jax.ShapeDtypeStruct((), np.float32)
        if self.collision == "none":
            return {"x": x, "w": scalar}
        index = jax.ShapeDtypeStruct((), np.int32)
        return {"x": x, "w": scalar, "x_pos": x, "item": index, "pos": index, "has_pos": scalar}

    def train_source(self):
        if self.collision == "none":
            return EmbeddingRows(self.vectors), None
        offsets, partners = partner_table(self.pairs, len(self.vectors))
        return PairedEmbeddingRows(self.vectors, offsets, partners, self.config.data.pair_rounds), None

    def init_extra(self, params, rng: jax.Array) -> dict:
        m = self.config.model
        return {"usage": with_axes(jnp.zeros((m.levels, m.codes), jnp.float32), ("levels", "codes"))}

    def loss(self, model: RQVAE, batch, rng, step: jax.Array | int = 0, *, keep_codes: bool = False):
        """RQ-VAE's loss (+ the collision regulariser); ``keep_codes`` adds the batch's codes and residuals
        under ``"quantised"`` so the update counts code usage without a second encoder pass."""
        out = model(batch["x"])
        total, metrics = L.rq_vae_loss(batch["x"], out, self.config.model.beta)
        if self.collision != "none":
            regulariser, more = self.collision_loss(model, batch, out, step)
            total, metrics = total + regulariser, {**metrics, **more}
        if keep_codes:
            metrics["quantised"] = jax.lax.stop_gradient({"codes": out["codes"], "residuals": out["residuals"]})
        return total, metrics

    def collision_loss(self, model: RQVAE, batch, out, step):
        """The 2B items of a batch of co-engaged pairs (triggers, then targets) -> QuaSID's
        ``L_HaMR + lam_cl L_cl`` or AdaSID's ``lam_col(t) L_col + lam_cf(t) L_cf``."""
        c, b = self.config, batch["x"].shape[0]
        z_pos = model.encode(batch["x_pos"])
        z = jnp.concatenate([out["z"], z_pos])
        codes = jax.lax.stop_gradient(jnp.concatenate([out["codes"], model.quantise(z_pos)["codes"]]))
        valid = L.valid_pair_mask(jnp.concatenate([batch["item"], batch["pos"]]), jnp.tile(jnp.arange(b), 2))
        q = c.quasid if self.collision == "quasid" else c.adasid
        cf = L.pair_contrastive_loss(out["z"], z_pos, batch["pos"], batch["has_pos"], q.temperature)
        if self.collision == "quasid":
            rep, metrics = L.hamr_loss(z, codes, valid, radius=q.radius, m_full=q.m_full, m_partial=q.m_partial,
                                       lam_full=q.lam_full, lam_partial=q.lam_partial)
            return rep + q.lam_cl * cf, {**metrics, "hamr_loss": rep, "cf_loss": cf}
        lam_col, lam_cf = L.progress_weights(step, t_start=q.t_start * c.train.steps, t_end=q.t_end * c.train.steps,
                                             lam_col_min=q.lam_col_min, lam_cf_max=q.lam_cf_max)
        if q.similarity not in ("latent", "input"):
            raise ValueError(f"adasid.similarity must be 'latent' or 'input', not {q.similarity!r}")
        sim = None if q.similarity == "latent" else 1.0 - L.cosine_distance(
            jnp.concatenate([batch["x"], batch["x_pos"]]))
        rep, metrics = L.adasid_collision_loss(z, codes, valid, eta=jnp.asarray(q.eta), margins=jnp.asarray(q.margins),
                                               f_min=q.f_min, f_max=q.f_max, d_max=q.d_max, alpha=q.alpha,
                                               similarity=sim)
        return lam_col * rep + lam_cf * cf, {**metrics, "col_loss": rep, "cf_loss": cf, "lam_col": lam_col}

    def update(self, ctx, state, batch, rng):
        """At step 0 the codebooks become residual k-means of the first batch's latents (TIGER, Sec. 3.1:
        "k-means clustering-based initialization"); then the gradient step; every ``model.reset_every``
        steps the codes no row of those batches chose are re-seeded (``revive_codes``)."""
        m = self.config.model

        def init(params):
            z = ctx.model(params).encode(batch["x"])
            return {**params, "codebooks": kmeans_codebooks(z, m.codes, m.levels, rng, m.init_iterations)}

        params = jax.lax.cond(state.step == 0, init, lambda p: p, state.params)
        loss = functools.partial(self.loss, step=state.step, keep_codes=bool(m.reset_every))
        state, metrics = ctx.gradient_step(state.replace(params=params), batch, rng, loss_fn=loss)
        if not m.reset_every:
            return state, metrics
        q = metrics.pop("quantised")  # this batch's codes under the pre-step params
        usage = state.extra["usage"] + jax.vmap(lambda c: jnp.bincount(c, batch["w"], length=m.codes))(q["codes"].T)
        reset = (state.step + 1) % m.reset_every == 0
        books = jax.lax.cond(reset, lambda: revive_codes(state.params["codebooks"], usage, q["residuals"],
                                                         jax.random.fold_in(rng, 1)),
                             lambda: state.params["codebooks"])
        return (state.replace(params={**state.params, "codebooks": books},
                              extra={"usage": jnp.where(reset, 0.0, usage)}),
                {**metrics, "unused_codes": jnp.sum(usage <= 0)})  # in the window so far, all levels

    def towers(self) -> dict[str, Tower]:
        return {"assign": Tower(encode_codes, {"x": jax.ShapeDtypeStruct((self.config.model.dim,), np.float32)})}

    def assign(self, ctx: EvalContext, vectors: np.ndarray) -> np.ndarray:
        """``vectors [n, D] -> codes [n, L]`` on the mesh, in chunks of ``eval.batch_size`` rows."""
        return ctx.apply(encode_codes, vectors, batch_size=self.config.eval.batch_size)

    def codebooks(self, state) -> jax.Array:
        return state.params["codebooks"]  # [L, K, latent]

    @property
    def sid_sizes(self) -> list[int]:
        """Each SID level's codebook size: ``[K] * L``."""
        return [self.config.model.codes] * self.config.model.levels

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        """SID metrics of the first ``eval.max_examples`` items (0: all), and their PNG (``sid_report``)."""
        limit = self.config.eval.max_examples or len(self.vectors)
        return sid_report(self.assign(ctx, self.vectors[:limit]), self.sid_sizes, ctx.workdir, ctx.step)
