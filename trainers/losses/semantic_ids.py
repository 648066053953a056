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
