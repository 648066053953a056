"""Losses of the semantic-ID tokenizers. Each is a short function citing the equation it implements;
shapes are ``[b, d]`` per level, ``[L, b, d]`` stacked over levels."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reconstruction_loss(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """RQ-VAE's reconstruction term (Rajput et al. 2023, TIGER, Sec. 3.1: ``L_recon = ||x - x_hat||^2``).
    ``x, x_hat [b, D]`` -> the batch mean of the squared L2 error."""
    return jnp.mean(jnp.sum((x - x_hat) ** 2, axis=-1))


def rq_loss(residuals: jax.Array, codewords: jax.Array, beta: float) -> jax.Array:
    """RQ-VAE's quantisation term (TIGER, Sec. 3.1; the VQ-VAE loss of van den Oord et al. 2017, Eq. 3, summed
    over levels): ``sum_l ||sg[r_l] - e_l||^2 + beta ||r_l - sg[e_l]||^2``, the codebook term pulling each
    chosen codeword ``e_l`` to its residual, the commitment term (weight ``beta``, 0.25) the encoder to it.
    ``residuals, codewords [L, b, d]`` -> the batch mean."""
    codebook = jnp.sum((jax.lax.stop_gradient(residuals) - codewords) ** 2, axis=-1)
    commitment = jnp.sum((residuals - jax.lax.stop_gradient(codewords)) ** 2, axis=-1)
    return jnp.mean(jnp.sum(codebook + beta * commitment, axis=0))


def rq_vae_loss(x: jax.Array, out: dict[str, jax.Array], beta: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``L = L_recon + L_rqvae`` (TIGER, Sec. 3.1) on the outputs of ``models.rq_vae.RQVAE``."""
    recon, rq = reconstruction_loss(x, out["x_hat"]), rq_loss(out["residuals"], out["codewords"], beta)
    return recon + rq, {"recon_loss": recon, "rq_loss": rq}


# --- collision regulation: QuaSID (Hu et al. 2026, arXiv 2603.00632) and AdaSID (Pan et al. 2026, 2604.23522) --
# Both act on the encoder output ``z`` of a batch of 2B items (B triggers, then their B co-engaged targets),
# over all ordered in-batch pairs; codes and masks are constants, the gradient flows through ``z`` only.


def cosine_distance(z: jax.Array) -> jax.Array:
    """``d_ij = 1 - cos(z_i, z_j)`` (QuaSID Eq. 10) of ``z [n, d]`` -> ``[n, n]`` in ``[0, 2]``."""
    zn = z / jnp.sqrt(jnp.sum(z * z, axis=-1, keepdims=True) + 1e-12)
    return 1.0 - zn @ zn.T


def code_agreement(codes: jax.Array) -> jax.Array:
    """``eq_ijl = 1[s_i^l = s_j^l]`` of ``codes [n, L]`` -> ``[n, n, L]`` bool. Position-wise: QuaSID's Hamming
    distance is ``H = L - sum_l eq`` (Eq. 9), AdaSID's overlap depth ``o = sum_l eq`` and its collision
    signature the pattern ``eq_ij`` itself."""
    return codes[:, None, :] == codes[None, :, :]


def valid_pair_mask(items: jax.Array, pair: jax.Array) -> jax.Array:
    """Conflict-Aware Valid Pair Masking (QuaSID Eq. 8, ``M = M^item * M^i2i``): a pair may be repelled unless it
    is the same item (``items [n]``, e.g. sampled twice) or the trigger-target pair the batch was built from
    (``pair [n]``: the index of the pair a row belongs to). -> ``[n, n]`` bool, the diagonal excluded."""
    return (items[:, None] != items[None, :]) & (pair[:, None] != pair[None, :])


def _group_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def hamr_loss(z: jax.Array, codes: jax.Array, valid: jax.Array, *, radius: int, m_full: float, m_partial: float,
              lam_full: float, lam_partial: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Hamming-guided Margin Repulsion (QuaSID Eqs. 11-13): identical SIDs (``H = 0``) are pushed to cosine
    distance ``m_full`` with weight ``lam_full``, near collisions (``0 < H <= radius``) to ``m_partial`` with
    ``lam_partial``, each a hinge averaged over its own valid pairs:
    ``L = lam_full mean_full [m_full - d]_+ + lam_partial mean_partial [m_partial - d]_+``.
    ``z [n, d], codes [n, L], valid [n, n]`` -> ``(loss, {hamr/full_pairs, hamr/partial_pairs})``."""
    h = codes.shape[1] - jnp.sum(code_agreement(codes), axis=-1)
    d = cosine_distance(z)
    full, partial = valid & (h == 0), valid & (h > 0) & (h <= radius)
    loss = (lam_full * _group_mean(jax.nn.relu(m_full - d), full)
            + lam_partial * _group_mean(jax.nn.relu(m_partial - d), partial))
    return loss, {"hamr/full_pairs": jnp.sum(full) / 2, "hamr/partial_pairs": jnp.sum(partial) / 2}


def load_weight(load: jax.Array, *, f_min: float, f_max: float, d_max: float, alpha: float) -> jax.Array:
    """AdaSID's load-adaptive strengthening coefficient ``a = g(c)``, bounded in ``[f_min, f_max]`` and
    increasing in the local collision load ``c`` (the paper names ``f_min, f_max, d_max, alpha`` without the
    form; ecomax: ``a = f_min + (f_max - f_min) (min(c, d_max) / d_max)^alpha``). ``load [...]`` -> same."""
    return f_min + (f_max - f_min) * (jnp.minimum(load, d_max) / d_max) ** alpha


def adasid_collision_loss(z: jax.Array, codes: jax.Array, valid: jax.Array, *, eta: jax.Array, margins: jax.Array,
                          f_min: float, f_max: float, d_max: float, alpha: float,
                          similarity: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """AdaSID's adaptive overlap regulation (Pan et al. 2026, Sec. 3): over the valid pairs that share at least
    one code (overlap depth ``o = sum_l 1[s_i^l = s_j^l] > 0``),
    1. semantic-adaptive relaxation: a pair with ``similarity_ij >= eta[o - 1]`` is admissible sharing and
       is not repelled (``eta [L]``, non-decreasing: a deeper overlap needs more evidence; ``similarity
       [n, n]`` defaults to ``cos(z_i, z_j)``, or e.g. the cosine of the items' input embeddings);
    2. load-adaptive strengthening: the rest get the hinge ``[m_o - d_ij]_+`` (``margins [L]`` by depth)
       times ``load_weight(c_ij)``, ``c_ij`` the number of candidate pairs in the batch with the same
       collision signature (the per-level equality pattern).
    ``L_col = sum a (1 - g) l / #repelled``. ``z [n, d], codes [n, L], valid [n, n]`` -> ``(loss, metrics)``."""
    eq = code_agreement(codes)
    depth = jnp.sum(eq, axis=-1)                                                  # [n, n] in 0..L
    candidate = valid & (depth > 0)
    d = cosine_distance(z)
    relaxed = (1.0 - d if similarity is None else similarity) >= eta[jnp.maximum(depth - 1, 0)]
    pattern = jnp.sum(eq * (2 ** jnp.arange(codes.shape[1])), axis=-1)             # signature as an integer
    counts = jax.ops.segment_sum(candidate.ravel().astype(jnp.float32), pattern.ravel(),
                                 2 ** codes.shape[1])
    weight = jax.lax.stop_gradient(load_weight(counts[pattern], f_min=f_min, f_max=f_max, d_max=d_max,
                                               alpha=alpha))
    repelled = candidate & ~jax.lax.stop_gradient(relaxed)
    hinge = jax.nn.relu(margins[jnp.maximum(depth - 1, 0)] - d)
    loss = _group_mean(weight * hinge, repelled)
    return loss, {"adasid/candidate_pairs": jnp.sum(candidate) / 2, "adasid/relaxed_pairs":
                  jnp.sum(candidate & relaxed) / 2, "adasid/full_pairs": jnp.sum(valid & (depth == codes.shape[1])) / 2}


def progress_weights(step: jax.Array, *, t_start: float, t_end: float, lam_col_min: float,
                     lam_cf_max: float) -> tuple[jax.Array, jax.Array]:
    """AdaSID's progress-adaptive rebalancing: ``tau = clip((t - T_start) / (T_end - T_start), 0, 1)``,
    ``lambda_col = 1 - (1 - lambda_col_min) tau`` (the collision weight decays), ``lambda_cf = lambda_cf_max tau``
    (the collaborative alignment weight grows). ``step []`` -> ``(lambda_col, lambda_cf)``."""
    tau = jnp.clip((step - t_start) / max(t_end - t_start, 1e-9), 0.0, 1.0)
    return 1.0 - (1.0 - lam_col_min) * tau, lam_cf_max * tau


def pair_contrastive_loss(z_a: jax.Array, z_b: jax.Array, items_b: jax.Array, weights: jax.Array,
                          temperature: float) -> jax.Array:
    """The dual-tower collaborative term of QuaSID (Sec. 4.3) and AdaSID (``L_cf``): symmetric in-batch InfoNCE
    (van den Oord et al. 2018, Eq. 4) between the L2-normalised encodings of triggers ``z_a [B, d]`` and their
    co-engaged targets ``z_b [B, d]``, at temperature ``temperature``; a column holding the row's own target
    item again (``items_b [B]``) is no negative, rows of ``weights [B]`` 0 (no partner) are left out."""
    norm = lambda v: v / jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True) + 1e-12)  # noqa: E731
    logits = norm(z_a) @ norm(z_b).T / temperature
    duplicate = (items_b[:, None] == items_b[None, :]) & ~jnp.eye(len(items_b), dtype=bool)
    logits = jnp.where(duplicate, -1e9, logits)
    diag = jnp.sum(norm(z_a) * norm(z_b), axis=-1) / temperature  # not jnp.diagonal: see contrastive.info_nce
    per_row = 0.5 * (jax.nn.logsumexp(logits, axis=1) - diag) + 0.5 * (jax.nn.logsumexp(logits, axis=0) - diag)
    return jnp.sum(weights * per_row) / jnp.maximum(jnp.sum(weights), 1.0)
