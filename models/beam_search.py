"""Beam search over semantic IDs, optionally constrained by a prefix trie: one jitted function, static shapes.

A SID is ``D`` codes; level ``l`` has ``K_l`` codes (``sizes``). The search keeps ``W`` beams per query and
unrolls the ``D`` levels in Python (``D`` is small and static) inside one ``jax.jit``; nothing goes back to
the host. Per level (Tay et al. 2022, DSI; Rajput et al. 2023, TIGER, Sec. 3.2 constrained decoding):

    log_probs [B*W, K_l] = step(context, cache, prev, l)         # the model, already in code space
    log_probs = where(constraint.allowed(l, prefix), log_probs, -inf)
    scores, parent, code = top_W over the W*K_l candidates ``scores[b, w] + log_probs[b*W + w, k]``
    cache, prefix = cache[parent], constraint.advance(l, prefix[parent], code)

At level 0 only beam 0 is live (the others start at ``-inf``), so the ``W`` beams are distinct SIDs. A beam
whose score is ``-inf`` is dead (fewer than ``W`` valid SIDs): it stays ``-inf``, its codes and leaf are -1.

**The step protocol.** ``step(context, cache, prev [B*W] int32, level: static int) -> (log_probs [B*W, K_level]
float32, cache)``; ``prev`` is the previous level's code, or -1 at level 0 (the decoder's start token).
``context`` and ``cache`` are pytrees whose leaves have a leading axis ``B`` when passed in; the search
repeats them to ``B*W`` rows (the beams of a query contiguous) and reorders ``cache`` (never ``context``)
by gathering its leading axis when the beams are re-ranked. ``code_step`` adapts a token-space decoder
(``step(context, cache, token [N], position) -> (logits [N, V], cache)``) to this protocol.

**The constraint protocol** (``None``: unconstrained): ``allowed(level, prefix [N]) -> [N, K_level] bool`` and
``advance(level, prefix [N], code [N]) -> [N]`` (the child prefix, -1 where not allowed); prefixes are ints,
the root is 0, -1 is a dead beam. Optionally ``children(level, prefix [N]) -> [N, K_level]`` int32 (the child
of every code, -1 where not allowed): one lookup per level instead of two, which the search then uses. ``data_pipelines.sid.trie.TrieConstraint`` wraps a ``Trie`` (a pytree: pass
it as a jit argument, not a closed-over constant). After the last level the prefix is the trie's leaf id.

**SIDs shared by several items.** Without a dedup digit one leaf stands for several table rows. The search
returns leaves; ``data_pipelines.sid.trie.leaves_to_items`` expands them on the host: every row of a leaf,
in table order, the leaves in beam (score) order, cut to ``k`` items.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


class Constraint(Protocol):
    def allowed(self, level: int, prefix: jax.Array) -> jax.Array: ...              # [N] -> [N, K_level] bool

    def advance(self, level: int, prefix: jax.Array, code: jax.Array) -> jax.Array: ...  # [N], [N] -> [N]


Step = Callable[[Any, Any, jax.Array, int], tuple[jax.Array, Any]]


class BeamResult(NamedTuple):
    codes: jax.Array   # [B, W, D] int32, -1 for dead beams
    scores: jax.Array  # [B, W] float32, sum of log-probs (length-normalised if asked), best first; -inf: dead
    leaves: jax.Array  # [B, W] int32 trie leaf id (constrained), -1 when dead or unconstrained


def repeat_beams(tree: Any, beams: int) -> Any:
    """Every leaf ``[B, ...] -> [B*W, ...]``, the ``W`` copies of a query contiguous."""
    return jax.tree.map(lambda x: jnp.repeat(x, beams, axis=0), tree)


def reorder(tree: Any, parent: jax.Array) -> Any:
    """Every leaf ``[B*W, ...]`` -> its rows ``parent [B, W]`` (beam indices within each query).

    Gathers within a query (``take_along_axis`` on ``[B, W, ...]``), so a batch-sharded cache stays local."""
    b, w = parent.shape

    def gather(x):
        xs = x.reshape(b, w, *x.shape[1:])
        idx = parent.reshape(b, w, *([1] * (x.ndim - 1)))
        return jnp.take_along_axis(xs, idx, axis=1).reshape(x.shape)

    return jax.tree.map(gather, tree)


def initial_scores(batch: int, beams: int) -> jax.Array:
    """``[B, W]``: 0 for beam 0, -inf for the rest, so level 0 expands one beam per query."""
    return jnp.full((batch, beams), NEG_INF, jnp.float32).at[:, 0].set(0.0)


def select(scores: jax.Array, log_probs: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One level's re-ranking: ``scores [B, W], log_probs [B*W, K] (masked: -inf) -> (scores [B, W], parent
    [B, W], code [B, W])``, the top ``W`` of the ``W*K`` extensions of each query, best first."""
    b, w = scores.shape
    k = log_probs.shape[-1]
    cand = scores[:, :, None] + log_probs.reshape(b, w, k).astype(jnp.float32)
    top, idx = jax.lax.top_k(cand.reshape(b, w * k), w)
    return top, (idx // k).astype(jnp.int32), (idx % k).astype(jnp.int32)


def gnmt_length_penalty(length: int, alpha: float) -> float:
    """Wu et al. 2016, Eq. 14: ``lp = ((5 + |Y|) / 6)^alpha``; scores are divided by it."""
    return ((5.0 + length) / 6.0) ** alpha


def beam_search(step: Step, context: Any, cache: Any, *, batch: int, beams: int, sizes: Sequence[int],
                constraint: Constraint | None = None, length_penalty: float | None = None) -> BeamResult:
    """The top ``beams`` SIDs per query: ``context``, ``cache`` leaves ``[B, ...]`` -> ``BeamResult`` (``[B, W, D]``
    codes, ``[B, W]`` scores and leaves). Call it inside ``jax.jit`` (``step``, ``batch``, ``beams``, ``sizes``
    static; ``constraint`` a pytree argument). ``length_penalty``: the GNMT alpha; every SID has length ``D``,
    so it rescales the scores without changing their order."""
    context, cache = repeat_beams(context, beams), repeat_beams(cache, beams)
    scores = initial_scores(batch, beams)
    codes = jnp.zeros((batch, beams, 0), jnp.int32)
    prefix = jnp.zeros(batch * beams, jnp.int32)           # every beam at the trie root
    prev = jnp.full(batch * beams, -1, jnp.int32)          # the decoder start token
    for level, k in enumerate(sizes):
        log_probs, cache = step(context, cache, prev, level)
        if log_probs.shape != (batch * beams, k):
            raise ValueError(f"beam_search: step gave log-probs {log_probs.shape} at level {level}, "
                             f"expected {(batch * beams, k)}")
        child = None if constraint is None else _children(constraint, level, prefix)
        if constraint is not None:
            log_probs = jnp.where(child >= 0 if child is not None else constraint.allowed(level, prefix),
                                  log_probs, NEG_INF)
        scores, parent, code = select(scores, log_probs)
        cache = reorder(cache, parent)
        codes = jnp.concatenate([jnp.take_along_axis(codes, parent[:, :, None], axis=1), code[:, :, None]], 2)
        prev = code.reshape(-1)
        if constraint is not None:
            prefix = _advance(constraint, level, prefix, child, parent, code, scores > NEG_INF)
    live = scores > NEG_INF
    leaves = prefix.reshape(batch, beams) if constraint is not None else jnp.full((batch, beams), -1, jnp.int32)
    if length_penalty is not None:
        scores = scores / gnmt_length_penalty(len(sizes), length_penalty)
    return BeamResult(jnp.where(live[:, :, None], codes, -1), scores, jnp.where(live, leaves, -1).astype(jnp.int32))


class SampleResult(NamedTuple):
    codes: jax.Array      # [B, G, D] int32
    log_probs: jax.Array  # [B, G, D] float32, each code's log-probability at the sampling temperature
    leaves: jax.Array     # [B, G] int32 trie leaf id (constrained), -1 unconstrained


def sample(step: Step, context: Any, cache: Any, *, batch: int, samples: int, sizes: Sequence[int],
           rng: jax.Array, constraint: Constraint | None = None, temperature: float = 1.0) -> SampleResult:
    """``samples`` SIDs per query drawn from the model, level by level, from ``softmax(logits / temperature)``
    restricted to the trie's children (a GRPO group, where ``beam_search`` gives the mode): every sample is
    a valid SID, samples may repeat. Same ``step``/``constraint`` protocols and static arguments as
    ``beam_search``; context and cache ``[B, ...]`` are repeated to ``B*G`` rows (a query's samples contiguous)."""
    if temperature <= 0:
        raise ValueError(f"sample: temperature must be > 0, got {temperature} (beam_search gives the mode)")
    context, cache = repeat_beams(context, samples), repeat_beams(cache, samples)
    n = batch * samples
    prefix = jnp.zeros(n, jnp.int32)
    prev = jnp.full(n, -1, jnp.int32)
    codes, log_probs = [], []
    for level, (k, key) in enumerate(zip(sizes, jax.random.split(rng, len(sizes)))):
        logits, cache = step(context, cache, prev, level)        # log-softmax at T = 1
        if logits.shape != (n, k):
            raise ValueError(f"sample: step gave log-probs {logits.shape} at level {level}, expected {(n, k)}")
        child = None if constraint is None else _children(constraint, level, prefix)
        if constraint is not None:
            ok = child >= 0 if child is not None else constraint.allowed(level, prefix)
            logits = jnp.where(ok, logits, NEG_INF)
        tempered = jax.nn.log_softmax(logits / temperature, axis=-1)
        code = jax.random.categorical(key, tempered, axis=-1).astype(jnp.int32)
        codes.append(code)
        log_probs.append(jnp.take_along_axis(tempered, code[:, None], axis=1)[:, 0])
        if constraint is not None:
            prefix = (jnp.take_along_axis(child, code[:, None], axis=1)[:, 0] if child is not None
                      else constraint.advance(level, prefix, code))
        prev = code
    leaves = prefix if constraint is not None else jnp.full(n, -1, jnp.int32)
    return SampleResult(jnp.stack(codes, 1).reshape(batch, samples, -1),
                        jnp.stack(log_probs, 1).reshape(batch, samples, -1), leaves.reshape(batch, samples))


def _children(constraint: Constraint, level: int, prefix: jax.Array) -> jax.Array | None:
    """The optional fused lookup: ``children(level, prefix [N]) -> [N, K_level]`` child prefixes (-1: not
    allowed), or None when the constraint only has ``allowed``/``advance``."""
    fn = getattr(constraint, "children", None)
    return None if fn is None else fn(level, prefix)


def _advance(constraint: Constraint, level: int, prefix: jax.Array, child: jax.Array | None, parent: jax.Array,
             code: jax.Array, live: jax.Array) -> jax.Array:
    """The re-ranked beams' prefixes ``[B*W]``: ``prefix [B*W]`` before the re-ranking, ``child [B*W, K] | None``
    from ``_children``, ``parent, code, live [B, W]``; -1 for dead beams."""
    b, w = parent.shape
    if child is not None:                                   # the chosen candidate's child: one gather
        flat = parent * child.shape[-1] + code
        nxt = jnp.take_along_axis(child.reshape(b, -1), flat, axis=1).reshape(-1)
    else:
        nxt = constraint.advance(level, reorder(prefix, parent), code.reshape(-1))
    return jnp.where(live.reshape(-1), nxt, -1)


def code_step(token_step: Callable[[Any, Any, jax.Array, int], tuple[jax.Array, Any]], *, offsets: Sequence[int],
              sizes: Sequence[int], start_token: int) -> Step:
    """A token-space decoder step -> the code-space ``Step``.

    ``token_step(context, cache, token [N], position) -> (logits [N, V], cache)`` (e.g. ``models/seq2seq.py``'s
    ``model.step``); code ``c`` of level ``l`` is token ``offsets[l] + c``. The step feeds ``start_token`` at
    level 0, else the previous level's code token, at position ``level``, and returns the log-softmax over
    level ``l``'s ``K_l`` code tokens only ``[N, K_l]``."""

    def step(context, cache, prev, level):
        token = jnp.full_like(prev, start_token) if level == 0 else prev + offsets[level - 1]
        logits, cache = token_step(context, cache, token, level)
        codes = jax.lax.slice_in_dim(logits, offsets[level], offsets[level] + sizes[level], axis=1)
        return jax.nn.log_softmax(codes.astype(jnp.float32), axis=-1), cache

    return step
