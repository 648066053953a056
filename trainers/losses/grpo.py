"""GRPO (Shao et al. 2024, DeepSeekMath, Sec. 4.1): group-relative advantages and the clipped policy
objective with a KL penalty to a reference policy, for policies trained on their own rollouts.

A rollout task records ``old_logp`` when it samples, the host (or the device) scores the samples, and
each of the ``updates_per_rollout`` updates (GRPO's mu) calls ``grpo_loss`` against those log-probs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def group_advantages(rewards: np.ndarray | jax.Array, group: int, eps: float = 1e-4):
    """GRPO's outcome advantage (Shao et al. 2024, Sec. 4.1.2): each reward minus its group's mean, over the
    group's standard deviation (``eps`` keeps a group of equal rewards at 0).

    ``rewards [n]`` with ``n`` a multiple of ``group`` (the ``group`` samples of one prompt are adjacent)
    -> ``[n]``. Numpy in, numpy out (a host scorer); jax in, jax out (a device rollout).
    """
    xp = jnp if isinstance(rewards, jax.Array) else np
    r = rewards.reshape(-1, group)
    adv = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + eps)
    return adv.reshape(-1).astype(xp.float32)


def grpo_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array, advantages: jax.Array,
              mask: jax.Array | None = None, *, clip: float = 0.2, kl: float = 0.04
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO's objective (Shao et al. 2024, Eq. 3), negated for descent: the PPO clipped surrogate of the
    per-token ratio ``pi / pi_old`` times the sequence's advantage, minus ``kl`` times the unbiased KL
    estimate to the reference policy (Eq. 4: ``pi_ref/pi - log(pi_ref/pi) - 1``), averaged over each
    sequence's tokens, then over sequences.

    ``logp, old_logp, ref_logp [b, L]`` log-probs of the generated tokens under the current, rollout-time
    and reference policies; ``advantages [b]`` (or ``[b, L]``, per token); ``mask [b, L]`` (1 for generated tokens, default all)
    -> (scalar loss, {kl, clip_fraction}). The paper's defaults: ``clip`` 0.2, ``kl`` 0.04.
    """
    mask = jnp.ones_like(logp) if mask is None else mask.astype(logp.dtype)
    ratio = jnp.exp(logp - old_logp)
    adv = advantages[:, None] if advantages.ndim == 1 else advantages  # per sequence, or per token (IG-Search)
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip, 1 + clip) * adv)
    log_ref_ratio = ref_logp - logp
    kl_est = jnp.exp(log_ref_ratio) - log_ref_ratio - 1
    per_token = surrogate - kl * kl_est
    per_seq = jnp.sum(per_token * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1)
    tokens = jnp.maximum(jnp.sum(mask), 1)
    return -jnp.mean(per_seq), {"kl": jnp.sum(kl_est * mask) / tokens,
                                "clip_fraction": jnp.sum((jnp.abs(ratio - 1) > clip) * mask) / tokens}
