"""OneSearch-V2's loss terms and TPMA-GRPO's rewards, advantages and gates against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainers.losses import onesearch as os2

LN3 = float(np.log(3.0))


def test_self_distillation_is_ce_student_plus_ce_teacher_plus_kl_and_the_kl_moves_only_the_student():
    student, teacher, target = jnp.array([[[0.0, 0.0]]]), jnp.array([[[LN3, 0.0]]]), jnp.array([[0]])
    loss, parts = os2.self_distillation_loss(student, teacher, target)      # p = (.5, .5), q = (.75, .25)
    kl = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)
    np.testing.assert_allclose(parts["ce_student"], np.log(2), rtol=1e-6)
    np.testing.assert_allclose(parts["ce_teacher"], -np.log(0.75), rtol=1e-6)
    np.testing.assert_allclose(parts["kl_teacher_student"], kl, rtol=1e-5)
    np.testing.assert_allclose(loss, np.log(2) - np.log(0.75) + 0.1 * kl, rtol=1e-6)
    # the teacher's gradient is w_T CE(teacher)'s alone: softmax(teacher) - onehot(target)
    g = jax.grad(lambda t: os2.self_distillation_loss(student, t, target)[0])(teacher)
    np.testing.assert_allclose(g[0, 0], [0.75 - 1, 0.25], rtol=1e-5)
    # tau: the KL of the tempered distributions, times tau^2; masked tokens do not count
    _, hot = os2.self_distillation_loss(student, teacher, target, tau=2.0)
    q = np.array([np.sqrt(3), 1]) / (np.sqrt(3) + 1)
    np.testing.assert_allclose(hot["kl_teacher_student"], 4 * np.sum(q * np.log(q / 0.5)), rtol=1e-5)
    two = jnp.concatenate([student, teacher], 1), jnp.concatenate([teacher, teacher], 1)
    masked, _ = os2.self_distillation_loss(*two, jnp.array([[0, 1]]), jnp.array([[1, 0]]))
    np.testing.assert_allclose(masked, loss, rtol=1e-6)


def test_r_drop_is_half_alpha_times_the_symmetric_kl():
    a, b = jnp.array([[[0.0, 0.0]]]), jnp.array([[[LN3, 0.0]]])
    forward = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)          # KL(b || a)
    backward = 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(2.0)    # KL(a || b)
    np.testing.assert_allclose(os2.r_drop_loss(a, b), 0.5 * 0.5 * (forward + backward), rtol=1e-5)
    np.testing.assert_allclose(os2.r_drop_loss(a, b), os2.r_drop_loss(b, a), rtol=1e-6)
    assert float(os2.r_drop_loss(a, a)) == 0.0


def test_fgm_is_epsilon_times_the_unit_gradient_per_example():
    grad = jnp.array([[[3.0, 4.0]], [[0.0, 0.0]]])
    np.testing.assert_allclose(os2.fgm_perturbation(grad), [[[0.36, 0.48]], [[0.0, 0.0]]], rtol=1e-6)


def test_focal_loss_down_weights_easy_tokens():
    logits, target = jnp.array([[[LN3, 0.0]]]), jnp.array([[0]])              # p_t = 0.75
    np.testing.assert_allclose(os2.focal_loss(logits, target), 2 * 0.25 ** 3 * -np.log(0.75), rtol=1e-5)
    np.testing.assert_allclose(os2.focal_loss(logits, target, alpha=1.0, gamma=0.0), -np.log(0.75), rtol=1e-6)


def test_tpma_rewards_advantages_gates_and_loss_by_hand():
    w = os2.tpma_position_weights(5)
    np.testing.assert_array_equal(w, [2, 2, 2, 1, 0])
    sampled = np.array([[1, 2, 3, 4, 5], [9, 9, 9, 9, 9]])
    truths = np.array([[[1, 2, 8, 4, 5], [1, 7, 3, 4, 5], [9, 9, 9, 9, 9]]] * 2)
    mask = np.array([[True, True, False], [True, True, False]])             # the all-9 SID is padding
    # sample 0: g1 matches positions 1,2,4,5 -> weighted cumsum 2,4,4,5,5; g2 matches 1,3,4,5 -> 2,2,4,5,5
    rewards = os2.tpma_prefix_rewards(sampled, truths, mask, w)
    np.testing.assert_array_equal(rewards, [[2, 4, 4, 5, 5], [0, 0, 0, 0, 0]])
    unweighted = os2.tpma_prefix_rewards(sampled, truths, mask, np.ones(5))
    np.testing.assert_array_equal(unweighted, [[1, 2, 2, 3, 4], [0, 0, 0, 0, 0]])
    gates = os2.tpma_gates(unweighted)
    np.testing.assert_allclose(gates, [[1, 1, 1, 2 / 3, 3 / 4], [1, 0, 0, 0, 0]], rtol=1e-6)
    # marginals (2,2,0,1,0) and 0s; per position mean (1,1,0,.5,0), std (1,1,0,.5,0)
    adv = os2.tpma_advantages(rewards, group=2, delta=1e-4)
    np.testing.assert_allclose(adv, [[1, 1, 0, 1, 0], [-1, -1, 0, -1, 0]], atol=1e-3)
    logp = jnp.log(jnp.full((2, 5), 0.5))
    loss, m = os2.tpma_grpo_loss(logp, logp, jnp.asarray(adv), jnp.asarray(gates))
    np.testing.assert_allclose(loss, -(1 + 1 + 2 / 3 - 1) / 10, atol=1e-3)
    assert float(m["ratio_mean"]) == 1.0
    # no clipping: a ratio of 3 scales the objective by 3
    far, _ = os2.tpma_grpo_loss(logp + np.log(3.0), logp, jnp.asarray(adv), jnp.asarray(gates))
    np.testing.assert_allclose(far, 3 * loss, rtol=1e-4)


@pytest.mark.parametrize("ordered,clicked,expect", [(True, True, 4.0), (False, True, 3.0), (False, False, 0.0)])
def test_item_reward_adds_behaviour_ctr_relevance_and_format(ordered, clicked, expect):
    got = os2.onesearch_item_reward(np.array([ordered]), np.array([clicked]), np.array([0.25]), np.array([2.0]),
                                    np.array([True]))
    np.testing.assert_allclose(got, [expect + 0.25 + 2.0 + 1.0])
