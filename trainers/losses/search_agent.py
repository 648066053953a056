"""Losses and rewards of search agents trained with GRPO and a retriever in the loop.

* IG-Search (Liang et al. 2026, arXiv 2604.15148): a step-level information-gain reward, how much a
  search step's retrieved documents raise the policy's own log-probability of the gold answer over
  counterfactual documents, fed to that step's query tokens by per-token advantage modulation.
* SD-Search: on-policy hindsight self-distillation, the token-level Jensen-Shannon divergence from the
  student (inference context) to the teacher (the same policy, with a hindsight block) at search-query
  tokens, added to GRPO's objective.

Shapes: ``b`` sequences, ``T`` tokens, ``S`` search steps per sequence, ``V`` vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def answer_score(token_logp: jax.Array, mask: jax.Array, first: int = 3, first_weight: float = 3.0) -> jax.Array:
    """IG-Search's answer score: the weighted mean log-prob of the gold answer's tokens (scored after
    ``"\\n<answer> "``), the first ``first`` tokens weighted ``first_weight``, the weights renormalised to mean
    1 over the answer's tokens. ``token_logp, mask [b, T]`` (mask: the answer's tokens, left-aligned) -> ``[b]``."""
    position = jnp.cumsum(mask, axis=1) - 1
    w = jnp.where(position < first, first_weight, 1.0) * mask
    w = w * jnp.sum(mask, axis=1, keepdims=True) / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-9)
    return jnp.sum(w * token_logp, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1)


def best_gold(scores: jax.Array, valid: jax.Array) -> jax.Array:
    """The best score over a question's gold-answer variants: ``scores, valid [n, G]`` -> ``[n]``."""
    return jnp.max(jnp.where(valid, scores, -jnp.inf), axis=1)


def information_gain(real: jax.Array, counterfactual: jax.Array) -> jax.Array:
    """IG-Search's step reward ``IG_t = log pi_old(a* | C_t^real) - (1/N) sum_j log pi_old(a* | C_t^rand,j)``:
    ``real [s]`` the answer score with step t's own (documents, refine) pair, ``counterfactual [s, N]`` with
    the pair swapped for ``N`` pairs drawn from other rollouts of the batch -> ``[s]``."""
    return real - jnp.mean(counterfactual, axis=1)


def step_gains(scores: jax.Array, index: jax.Array, *, steps: int, variants: int, golds: int) -> jax.Array:
    """IG-Search's ``IG_t`` of every search step from the answer scores of its sequences: ``scores [b, M]``
    with ``index [b, M, 3]`` = (step, variant, gold) of each (-1: unused; variant 0 is the real context, the
    others counterfactuals) -> the best gold per variant (``best_gold``), ``information_gain`` -> ``[b, steps]``
    (0 for a step with no sequences)."""
    b = scores.shape[0]
    size = b * steps * variants * golds
    flat = ((jnp.arange(b)[:, None] * steps + index[..., 0]) * variants + index[..., 1]) * golds + index[..., 2]
    flat = jnp.where(index[..., 0] >= 0, flat, size)                                   # unused -> dropped
    table = jnp.full((size,), -jnp.inf).at[flat.reshape(-1)].set(scores.reshape(-1), mode="drop")
    table = table.reshape(b * steps * variants, golds)
    best = best_gold(table, jnp.isfinite(table)).reshape(b, steps, variants)
    scored = jnp.isfinite(best[..., 0])                                                 # [b, steps]
    best = jnp.where(scored[..., None], best, 0.0).reshape(b * steps, variants)
    return jnp.where(scored, information_gain(best[:, 0], best[:, 1:]).reshape(b, steps), 0.0)


def ig_token_advantages(advantages: jax.Array, query_step: jax.Array, ig: jax.Array, *, alpha: float,
                        dead_zone: float = 0.0, negative_scale: float = 1.0) -> jax.Array:
    """IG-Search's per-token advantage modulation: every token keeps its sequence's GRPO advantage ``A_i``;
    a query token of search step t gets ``A_i + alpha * phi(IG_t)``, ``phi`` zero inside the dead zone
    ``|IG| < dead_zone`` and scaled by ``negative_scale`` below it (asymmetric: a useless query is pushed down
    less than a useful one is pulled up). Even when every rollout of a group fails (``A = 0``) the queries
    get a signal. ``advantages [b]``, ``query_step [b, T]`` (the step of each query token, -1 elsewhere; a
    step ``>= S`` is a query that was never answered and gets no IG),
    ``ig [b, S]`` -> ``[b, T]``."""
    g = jnp.where(jnp.abs(ig) < dead_zone, 0.0, ig)
    g = jnp.where(g < 0, negative_scale * g, g)
    scored = (query_step >= 0) & (query_step < ig.shape[1])   # a query past the last scored step gets none
    per_token = jnp.take_along_axis(g, jnp.clip(query_step, 0, ig.shape[1] - 1), axis=1)
    return advantages[:, None] + jnp.where(scored, alpha * per_token, 0.0)


def jensen_shannon(student_logits: jax.Array, teacher_logits: jax.Array, positions: jax.Array) -> jax.Array:
    """SD-Search's distillation term: the token-level Jensen-Shannon divergence
    ``JSD(p_s, p_t) = 1/2 KL(p_s || m) + 1/2 KL(p_t || m)``, ``m = (p_s + p_t) / 2``, between the student's and
    the (stop-gradient) teacher's next-token distributions, averaged over ``positions`` only (the
    search-query tokens). ``student_logits, teacher_logits [b, T, V]``, ``positions [b, T]`` -> scalar."""
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    log_t = jax.lax.stop_gradient(jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1))
    log_m = jnp.logaddexp(log_s, log_t) - jnp.log(2.0)
    kl = lambda log_p: jnp.sum(jnp.exp(log_p) * (log_p - log_m), axis=-1)  # noqa: E731
    jsd = 0.5 * kl(log_s) + 0.5 * kl(log_t)                                   # [b, T]
    mask = positions.astype(jnp.float32)
    return jnp.sum(jsd * mask) / jnp.maximum(jnp.sum(mask), 1.0)
