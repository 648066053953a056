"""Search agents: IG-Search's answer score, information gain and per-token advantage modulation, SD-Search's
Jensen-Shannon term at query positions and hindsight block, the rollout format and its loss mask, each
against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.agents import rollout as R
from trainers.losses import group_advantages, grpo_loss
from trainers.losses import search_agent as S

ROLLOUT = ("<think> who founded Zorvik? </think> <search> Zorvik founder </search>"
           "<documents> Zorvik was founded by Ana Lis. </documents> <refine> Ana Lis </refine>"
           "<search> Ana Lis birthplace </search><documents> Ana Lis was born in Tamo. </documents>"
           "<answer> Tamo </answer>")


def test_answer_score_weights_the_first_tokens_three_times():
    logp = jnp.array([[-1.0, -2.0, -3.0, -4.0, -5.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 1, 1, 0]], jnp.float32)
    # weights 3,3,3,1,1 renormalised to mean 1 over 5 tokens: x 5/11
    expected = (3 * (-1 - 2 - 3) + (-4 - 5)) / 11
    assert float(S.answer_score(logp, mask)[0]) == pytest.approx(expected)
    two = jnp.array([[1, 1, 0, 0, 0, 0]], jnp.float32)               # shorter than 3: a plain mean
    assert float(S.answer_score(logp, two)[0]) == pytest.approx(-1.5)
    assert float(S.best_gold(jnp.array([[-3.0, -1.0, 0.0]]), jnp.array([[True, True, False]]))[0]) == -1.0


def test_information_gain_by_hand():
    real = jnp.array([-1.0, -4.0])
    counterfactual = jnp.array([[-3.0, -2.0, -4.0], [-2.0, -2.0, -5.0]])
    np.testing.assert_allclose(S.information_gain(real, counterfactual), [-1 + 3, -4 + 3], rtol=1e-6)


def test_ig_advantages_give_a_signal_when_every_rollout_of_a_group_fails():
    adv = jnp.asarray(group_advantages(np.zeros(3, np.float32), group=3))     # all failed: A = 0
    assert not np.any(np.asarray(adv))
    query_step = jnp.array([[-1, 0, 0, -1, 1], [-1, 0, -1, -1, -1], [-1, -1, -1, -1, -1]])
    ig = jnp.array([[2.0, -1.0], [0.05, 0.0], [0.0, 0.0]])
    out = np.asarray(S.ig_token_advantages(adv, query_step, ig, alpha=0.5, dead_zone=0.1, negative_scale=0.5))
    np.testing.assert_allclose(out[0], [0, 1.0, 1.0, 0, -0.25])     # +alpha IG; negative: x 0.5
    np.testing.assert_allclose(out[1], 0.0)                          # inside the dead zone
    np.testing.assert_allclose(out[2], 0.0)                          # no search
    # the modulated advantages move the query tokens' log-probs: a non-zero GRPO gradient
    logp = jnp.full((3, 5), -1.0)
    grad = jax.grad(lambda lp: grpo_loss(lp, jax.lax.stop_gradient(lp), lp, jnp.asarray(out), kl=0.0)[0])(logp)
    assert float(jnp.abs(grad[0, 1])) > 0 and float(jnp.abs(grad[0, 0])) == 0.0
    # per-token advantages equal to the sequence's reproduce the per-sequence loss
    seq = jnp.array([1.0, -0.5, 0.25])
    a, _ = grpo_loss(logp * 0.9, logp, logp, seq)
    b, _ = grpo_loss(logp * 0.9, logp, logp, jnp.broadcast_to(seq[:, None], (3, 5)))
    assert float(a) == pytest.approx(float(b))


def test_jensen_shannon_by_hand_and_only_at_query_positions():
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    m = (p + q) / 2
    kl = lambda a, b: float(np.sum(a * np.log(a / b)))  # noqa: E731
    expected = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    student = jnp.log(jnp.array([[p, p, p]]))
    teacher = jnp.log(jnp.array([[q, q, p]]))
    positions = jnp.array([[1, 0, 1]])
    assert float(S.jensen_shannon(student, teacher, positions)) == pytest.approx((expected + 0.0) / 2, rel=1e-5)
    # a different teacher at a non-query position changes nothing
    other = teacher.at[0, 1].set(jnp.log(jnp.array([0.01, 0.99])))
    assert float(S.jensen_shannon(student, other, positions)) == pytest.approx(
        float(S.jensen_shannon(student, teacher, positions)))
    # the gradient reaches the student only, at query positions only
    g_s, g_t = jax.grad(S.jensen_shannon, argnums=(0, 1))(student, teacher, positions)
    assert float(jnp.abs(g_t).sum()) == 0.0 and float(jnp.abs(g_s[0, 1]).sum()) == 0.0
    assert float(jnp.abs(g_s[0, 0]).sum()) > 0


def test_rollout_segments_queries_answer_and_format():
    kinds = [s.kind for s in R.segments(ROLLOUT)]
    assert kinds == ["think", "search", "documents", "refine", "search", "documents", "answer"]
    assert R.search_queries(ROLLOUT) == ["Zorvik founder", "Ana Lis birthplace"]
    assert R.final_answer(ROLLOUT) == "Tamo" and R.final_answer("<think> x </think>") is None
    assert R.format_reward(ROLLOUT, max_turns=2) == 1.0
    assert R.format_reward(ROLLOUT, max_turns=1) == 0.0                                  # too many searches
    assert R.format_reward(ROLLOUT.replace("<answer> Tamo </answer>", ""), max_turns=2) == 0.0  # no answer
    assert R.format_reward("<search> q </search><answer> a </answer>", max_turns=2) == 0.0   # no documents
    assert R.format_reward("<answer> a </answer><answer> b </answer>", max_turns=2) == 0.0
    assert R.format_reward("<think> open <answer> a </answer>", max_turns=2) == 0.0          # unclosed tag
    assert R.format_reward("<answer> a </answer>", max_turns=2) == 1.0


def test_retrieved_text_is_outside_the_trainable_spans():
    spans = R.trainable_chars(ROLLOUT)
    kept = "".join(ROLLOUT[a:b] for a, b in spans)
    assert "founded by Ana Lis" not in kept and "born in Tamo" not in kept and "<documents>" not in kept
    assert "Zorvik founder" in kept and "<answer> Tamo </answer>" in kept
    assert len(kept) == len(ROLLOUT) - sum(s.end - s.start for s in R.segments(ROLLOUT) if s.kind == "documents")


def test_hindsight_block_keeps_only_labelled_queries():
    other = "<think> hmm </think><search> Zorvik city </search><documents> d </documents><answer> Oslo </answer>"
    block = R.hindsight_block([ROLLOUT, other, "<answer> x </answer>"], [True, False, False])
    assert block.splitlines() == [
        "<hindsight>",
        "Attempt 1 [CORRECT]: <search> Zorvik founder </search> <search> Ana Lis birthplace </search>",
        "Attempt 2 [INCORRECT]: <search> Zorvik city </search>",
        "Attempt 3 [INCORRECT]: (no search)",
        "</hindsight>"]
    for leaked in ("Tamo", "Oslo", "hmm", "born in", "Ana Lis </refine>"):   # answers, thoughts, documents
        assert leaked not in block
