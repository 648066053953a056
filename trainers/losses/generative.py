"""Generative retrieval: DSI's identifier loss and LTRGR's margin rank loss over the model's own beam.

The model reads a query and generates an item's semantic ID one code per level (``models/gr.py``); every
level's distribution is a softmax over that level's codes only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def dsi_loss(level_log_probs: list[jax.Array], codes: jax.Array, weights: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DSI (Tay et al. 2022, Sec. 3.2): teacher-forced cross-entropy of the identifier's tokens given the
    query (or, for indexing examples, the item's text), ``-sum_l log p(c_l | c_<l, q)`` averaged over examples.

    ``level_log_probs``: per level ``[B, K_l]`` log-probabilities (``models.gr.code_log_probs``); ``codes
    [B, D]`` int; ``weights [B]`` (0 for padding, default 1) -> (scalar loss, {code_accuracy, sid_accuracy}):
    the fraction of levels, and of whole SIDs, whose greedy code under teacher forcing is the target.
    """
    w = jnp.ones(codes.shape[:1], jnp.float32) if weights is None else weights.astype(jnp.float32)
    nll = -sum(jnp.take_along_axis(lp, codes[:, level, None], axis=1)[:, 0] for level, lp in enumerate(level_log_probs))
    right = jnp.stack([jnp.argmax(lp, axis=1) == codes[:, level] for level, lp in enumerate(level_log_probs)], 1)
    n = jnp.maximum(jnp.sum(w), 1.0)
    return jnp.sum(nll * w) / n, {"code_accuracy": jnp.sum(right.mean(1) * w) / n,
                                  "sid_accuracy": jnp.sum(right.all(1) * w) / n}


def ltrgr_rank_loss(positive: jax.Array, candidates: jax.Array, negative: jax.Array, margin: float
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """LTRGR's margin rank loss (Li et al. 2024, "Learning to Rank in Generative Retrieval", Sec. 3.3):
    ``max(0, s(q, p_neg) - s(q, p_pos) + m)``, with ``s`` the model's log-likelihood of an item's identifier
    and the negatives taken from the model's own beam (the items it would rank above the clicked one); the
    loss here averages the hinge over every negative of the beam.

    ``positive [B]`` log-likelihood of a relevant item's SID; ``candidates [B, W]`` of the beam's SIDs;
    ``negative [B, W]`` bool (a candidate that is no relevant item, and a real beam entry) -> (loss,
    {rank_violations: the fraction of negatives within the margin}).
    """
    hinge = jax.nn.relu(candidates - positive[:, None] + margin)
    n = jnp.maximum(jnp.sum(negative), 1)
    return jnp.sum(jnp.where(negative, hinge, 0.0)) / n, {
        "rank_violations": jnp.sum(negative & (hinge > 0)) / n}


def ltrgr_pair_loss(positive: jax.Array, positive_valid: jax.Array, negative: jax.Array, negative_valid: jax.Array,
                    rng: jax.Array, margin: float, random_margin: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """LTRGR's rank loss as its released code computes it (Li et al. 2024, Sec. 3.3; MINDER's
    ``learn_to_rank``): ``0.5 max(0, s(q, p_neg^top) - s(q, p_pos^top) + m) + 0.5 max(0, s(q, p_neg^rand) -
    s(q, p_pos^rand) + m')``: the top-ranked relevant item against the top-ranked beam negative, plus one
    uniformly drawn relevant item against one drawn negative (the released code widens ``m'`` over ``m``).

    ``positive [B, R]`` log-likelihoods of the query's relevant SIDs (``positive_valid`` masks padding);
    ``negative [B, W]`` of the beam's non-relevant SIDs (``negative_valid``); queries lacking either side
    are left out of the mean -> (loss, {rank_violations: the fraction of queries whose top negative is
    within the margin of their top positive}).
    """
    k_pos, k_neg = jax.random.split(rng)
    have = positive_valid.any(1) & negative_valid.any(1)

    def top(s, valid):
        return jnp.max(jnp.where(valid, s, -jnp.inf), axis=1)

    def drawn(key, s, valid):  # uniform over the valid entries (Gumbel-max over equal logits)
        pick = jnp.argmax(jnp.where(valid, jax.random.gumbel(key, s.shape), -jnp.inf), axis=1)
        return jnp.take_along_axis(s, pick[:, None], axis=1)[:, 0]

    hard = jax.nn.relu(top(negative, negative_valid) - top(positive, positive_valid) + margin)
    rand = jax.nn.relu(drawn(k_neg, negative, negative_valid) - drawn(k_pos, positive, positive_valid) + random_margin)
    n = jnp.maximum(jnp.sum(have), 1)
    mean = lambda x: jnp.sum(jnp.where(have, x, 0.0)) / n  # noqa: E731
    return 0.5 * mean(hard) + 0.5 * mean(rand), {"rank_violations": jnp.sum(have & (hard > 0)) / n}


def ranker_reward(click_prob: np.ndarray, hit: np.ndarray, hit_weight: float = 0.0) -> np.ndarray:
    """OneMall's retrieval-ranking reward (OneMall, Sec. 3.3, ``J = E_pi[R_rank]``): the frozen ranking model's
    click probability of each generated item for the user and query, plus ``hit_weight`` for an item the user
    actually interacted with (0 in the paper: the ranker alone is the reward).

    ``click_prob [n]`` in [0, 1]; ``hit [n]`` bool -> ``[n]`` float32 rewards (host side, numpy).
    """
    return (np.asarray(click_prob, np.float32) + hit_weight * np.asarray(hit, np.float32)).astype(np.float32)
