"""OneSearch-V2's objectives: reasoning-internalised self-distillation with its regularisers (R-Drop, FGM, focal
loss), and TPMA-GRPO's position-weighted, prefix-gated advantages over a SID's codes.

Logits are ``[B, T, V]`` float, targets ``[B, T]`` int, masks ``[B, T]`` (1 = a token that counts); every loss
averages over the counted tokens. A SID here has ``L`` positions (OneSearch-V2: 3 residual k-means codes + 2 OPQ
sub-codes, L = 5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    mask = jnp.ones_like(x) if mask is None else mask.astype(x.dtype)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Token cross-entropy ``-log softmax(logits)[target]``, averaged over the counted tokens."""
    return _masked_mean(_token_nll(logits, targets), mask)


def kl_divergence(p_logits: jax.Array, q_logits: jax.Array, tau: float = 1.0) -> jax.Array:
    """``KL(softmax(p / tau) || softmax(q / tau))`` per token: ``[..., V]`` x 2 -> ``[...]``."""
    logp = jax.nn.log_softmax(p_logits.astype(jnp.float32) / tau, axis=-1)
    logq = jax.nn.log_softmax(q_logits.astype(jnp.float32) / tau, axis=-1)
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def self_distillation_loss(student: jax.Array, teacher: jax.Array, targets: jax.Array, mask: jax.Array | None = None,
                           *, w_teacher: float = 1.0, w_kl: float = 0.1, tau: float = 1.0, token_loss=cross_entropy
                           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """OneSearch-V2's reasoning-internalised self-distillation (Sec. 3.2): the teacher pass sees the keyword
    reasoning, the student pass does not, ``L = CE(student) + w_T CE(teacher) + w_KL tau^2 KL(teacher || student)``
    (paper: w_KL 0.1, tau 1, w_T 1). The KL's teacher side is a fixed target (stop-gradient), so it moves only
    the student; ``CE(teacher)`` trains the teacher pass (joint mode: the same model) and is a constant for an
    EMA teacher.

    ``student, teacher [B, T, V]`` logits at the same target positions; ``targets, mask [B, T]`` -> (loss, parts).
    ``token_loss(logits, targets, mask)``: the CE (default), or ``focal_loss`` in its place.
    """
    ce_s = token_loss(student, targets, mask)
    ce_t = token_loss(teacher, targets, mask)
    kl = _masked_mean(kl_divergence(jax.lax.stop_gradient(teacher), student, tau), mask) * tau ** 2
    return ce_s + w_teacher * ce_t + w_kl * kl, {"ce_student": ce_s, "ce_teacher": ce_t, "kl_teacher_student": kl}


def r_drop_loss(logits_a: jax.Array, logits_b: jax.Array, mask: jax.Array | None = None, alpha: float = 0.5
                ) -> jax.Array:
    """R-Drop (Liang et al. 2021, Eq. 2): ``alpha * (KL(a || b) + KL(b || a)) / 2`` between two passes of the same
    input under independent dropout (OneSearch-V2: alpha 0.5). ``[B, T, V]`` x 2, ``mask [B, T]`` -> scalar."""
    both = kl_divergence(logits_a, logits_b) + kl_divergence(logits_b, logits_a)
    return alpha * 0.5 * _masked_mean(both, mask)


def fgm_perturbation(grad: jax.Array, epsilon: float = 0.6) -> jax.Array:
    """FGM (Miyato et al. 2017, "Adversarial Training Methods for Semi-Supervised Text Classification", Eq. 2):
    the adversarial perturbation of the input embeddings ``r = epsilon g / ||g||_2``, ``g`` the loss gradient
    with respect to them, the norm over each example's whole embedding block (OneSearch-V2: epsilon 0.6).

    ``grad [B, ...]`` -> ``[B, ...]`` (zero where the gradient is zero)."""
    g = grad.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(g * g, axis=tuple(range(1, g.ndim)), keepdims=True))
    return (epsilon * g / jnp.where(norm > 0, norm, 1.0)).astype(grad.dtype)


def focal_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None, *, alpha: float = 2.0,
               gamma: float = 3.0) -> jax.Array:
    """Focal loss (Lin et al. 2017, Eq. 5) in place of the cross-entropy: ``-alpha (1 - p_t)^gamma log p_t`` per
    token (OneSearch-V2: alpha 2, gamma 3). ``logits [B, T, V]``, ``targets, mask [B, T]`` -> scalar."""
    nll = _token_nll(logits, targets)
    return _masked_mean(alpha * (1.0 - jnp.exp(-nll)) ** gamma * nll, mask)


# ----------------------------------------------------------------------------- TPMA-GRPO


def tpma_position_weights(length: int = 5) -> np.ndarray:
    """OneSearch-V2's position weights (Eq. 12): 2 for the first three positions, 1 after, 0 for the last (the
    second OPQ sub-code, which only disambiguates). ``-> [L]`` float32."""
    w = np.ones(length, np.float32)
    w[:3] = 2.0
    w[-1] = 0.0
    return w


def tpma_prefix_rewards(sampled: np.ndarray, truths: np.ndarray, truth_mask: np.ndarray, weights: np.ndarray
                        ) -> np.ndarray:
    """TPMA's prefix reward (Eq. 13): ``R_{i,l} = max_g sum_{j<=l} w_j 1[s_{i,j} = g_j]`` over the ground-truth SIDs
    ``g`` of sample ``i`` (cumulative weighted position matches). ``sampled [N, L]``, ``truths [N, M, L]``,
    ``truth_mask [N, M]`` (at least one true per row), ``weights [L]`` -> ``[N, L]`` float32."""
    match = (sampled[:, None, :] == truths).astype(np.float32) * np.asarray(weights, np.float32)   # [N, M, L]
    cumulative = np.cumsum(match, axis=-1)
    return np.where(truth_mask[:, :, None], cumulative, -np.inf).max(axis=1).astype(np.float32)


def tpma_advantages(rewards: np.ndarray, group: int, delta: float = 1e-4) -> np.ndarray:
    """TPMA's marginal advantages (Eqs. 14-15): ``dR_{i,l} = R_{i,l} - R_{i,l-1}`` (``R_{i,0} = 0``), normalised per
    position over each group of ``group`` samples: ``(dR - mean_G) / (std_G + delta)``.
    ``rewards [N, L]`` (a prompt's samples adjacent) -> ``[N, L]`` float32."""
    marginal = np.diff(rewards, axis=1, prepend=0.0).reshape(-1, group, rewards.shape[1])
    adv = (marginal - marginal.mean(1, keepdims=True)) / (marginal.std(1, keepdims=True) + delta)
    return adv.reshape(rewards.shape).astype(np.float32)


def tpma_gates(unweighted: np.ndarray) -> np.ndarray:
    """TPMA's prefix gate (Eq. 16): ``g_{i,1} = 1``, ``g_{i,l} = clamp(R^u_{i,l-1} / (l - 1), 0, 1)`` with ``R^u`` the
    unweighted prefix reward (the matched positions among the first ``l - 1``): a code's credit fades when the
    prefix before it was wrong. ``unweighted [N, L]`` -> ``[N, L]`` float32."""
    n, length = unweighted.shape
    gates = np.ones((n, length), np.float32)
    gates[:, 1:] = np.clip(unweighted[:, :-1] / np.arange(1, length, dtype=np.float32), 0.0, 1.0)
    return gates


def tpma_grpo_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, gates: jax.Array
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """TPMA-GRPO's objective (Eqs. 17-18), negated for descent: ``-(1/G) sum_i (1/L) sum_l g_{i,l} r_{i,l} A_{i,l}``
    with ``r = pi_theta / pi_theta_old`` per position and **no clipping**. ``logp, old_logp, advantages, gates
    [N, L]`` -> (scalar loss, {ratio_mean})."""
    ratio = jnp.exp(logp - old_logp)
    return -jnp.mean(gates * ratio * advantages), {"ratio_mean": jnp.mean(ratio)}


def onesearch_item_reward(ordered: np.ndarray, clicked: np.ndarray, ctr: np.ndarray, relevance: np.ndarray,
                          well_formed: np.ndarray) -> np.ndarray:
    """OneSearch-V2's multi-part reward (Sec. 3.3): ``R_order/click`` (4 for an ordered item, 3 for a clicked one,
    else 0) + ``R_CTR`` (a calibrated click probability in [0, 1], from a frozen ranker) + ``R_rel`` (0-3, from a
    frozen relevance model) + the format reward (1 for a well-formed SID). Every input ``[N]`` -> ``[N]`` float32."""
    behaviour = np.where(ordered, 4.0, np.where(clicked, 3.0, 0.0))
    return (behaviour + ctr + relevance + np.asarray(well_formed, np.float32)).astype(np.float32)
