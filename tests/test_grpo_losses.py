"""GRPO's advantage estimator and objective against hand-computed values."""

import jax.numpy as jnp
import numpy as np
import pytest

from trainers.losses import group_advantages, grpo_loss


def test_group_advantages_normalise_within_each_group():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5], np.float32)
    adv = group_advantages(rewards, group=2)
    np.testing.assert_allclose(adv, [1, -1, -1, 1, 0, 0], atol=1e-3)  # std 0.5 per mixed group; equal -> 0
    assert isinstance(adv, np.ndarray)
    np.testing.assert_allclose(np.asarray(group_advantages(jnp.asarray(rewards), group=2)), adv, rtol=1e-6)


def test_grpo_loss_on_policy_is_minus_mean_advantage_and_zero_kl():
    logp = jnp.log(jnp.array([[0.5, 0.25], [0.2, 0.8]]))
    loss, m = grpo_loss(logp, logp, logp, jnp.array([2.0, -1.0]), clip=0.2, kl=0.1)
    assert float(loss) == pytest.approx(-(2.0 - 1.0) / 2)  # ratio 1: surrogate = advantage
    assert float(m["kl"]) == pytest.approx(0.0, abs=1e-7) and float(m["clip_fraction"]) == 0.0


def test_grpo_loss_clips_and_penalises_kl_by_hand():
    old = jnp.log(jnp.array([[0.5, 0.5]]))
    new = jnp.log(jnp.array([[0.75, 0.5]]))                 # ratios 1.5 (clipped to 1.2) and 1.0
    ref = jnp.log(jnp.array([[0.5, 0.25]]))
    mask = jnp.array([[1.0, 1.0]])
    loss, m = grpo_loss(new, old, ref, jnp.array([1.0]), mask, clip=0.2, kl=0.5)
    kl = np.array([0.5 / 0.75 - np.log(0.5 / 0.75) - 1, 0.5 - np.log(0.5) - 1])
    expected = -np.mean(np.array([1.2, 1.0]) - 0.5 * kl)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(m["kl"]) == pytest.approx(kl.mean(), rel=1e-6)
    assert float(m["clip_fraction"]) == pytest.approx(0.5)
    # a negative advantage takes the unclipped (smaller) ratio term: min(1.5 * -1, 1.2 * -1) = -1.5
    loss_neg, _ = grpo_loss(new, old, ref, jnp.array([-1.0]), mask, clip=0.2, kl=0.0)
    assert float(loss_neg) == pytest.approx(-np.mean([-1.5, -1.0]), rel=1e-6)


def test_grpo_loss_mask_averages_over_generated_tokens_only():
    logp = jnp.zeros((1, 3))
    mask = jnp.array([[1.0, 1.0, 0.0]])
    old = jnp.array([[0.0, 0.0, -5.0]])                        # the padded token's ratio must not count
    loss, _ = grpo_loss(logp, old, logp, jnp.array([1.0]), mask, clip=0.2, kl=0.0)
    assert float(loss) == pytest.approx(-1.0)
