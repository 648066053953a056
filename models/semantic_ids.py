"""Residual quantisation for semantic IDs: RQ-KMeans (k-means++ init, a streamed and sharded Lloyd step with
dead-code reset, optionally OneRec's balanced assignment), the greedy residual assignment shared by every RQ
tokenizer, and OneMall's FSQ level on the final residual.

An item's semantic ID is ``L`` codes: ``c_1 = argmin_k |x - C_1[k]|``, then ``c_l`` quantises the residual
``r_l = r_{l-1} - C_{l-1}[c_{l-1}]`` (``r_1 = x``) against codebook ``C_l`` (Lee et al. 2022, RQ-VAE, Eq. 2;
the RQ-KMeans of OneRec / OneSearch fits each ``C_l`` by k-means on the residuals of level ``l``).

Pure JAX; the sharded step takes the mesh and the names of its data axes as arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def nearest(x: jax.Array, codebook: jax.Array, chunk_rows: int = 0) -> tuple[jax.Array, jax.Array]:
    """``x [b, d], codebook [k, d] -> (code [b] int32, squared distance [b])``.

    ``|x - c|^2 = |x|^2 - 2 x.c + |c|^2``: a ``[b, k]`` matmul, as faiss computes it (never ``[b, k, d]``).
    ``chunk_rows > 0`` scores that many rows at a time (``lax.map``), so the ``[rows, k]`` scores stay in
    cache before the argmin: 2-3x faster on CPU; ``-1``: ``2^19 / k`` rows (2 MB of scores); 0 (one matmul)
    suits accelerators.
    """
    if chunk_rows < 0:
        chunk_rows = max(128, (1 << 19) // codebook.shape[0])
    b = x.shape[0]
    if not chunk_rows or b <= chunk_rows:
        return _nearest(x, codebook)
    xp = jnp.pad(x, ((0, -b % chunk_rows), (0, 0)))
    code, d2 = jax.lax.map(lambda rows: _nearest(rows, codebook), xp.reshape(-1, chunk_rows, x.shape[1]))
    return code.reshape(-1)[:b], d2.reshape(-1)[:b]


def _nearest(x: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array]:
    scores = jnp.sum(codebook * codebook, axis=-1)[None] - 2.0 * (x @ codebook.T)          # [b, k]
    code = jnp.argmin(scores, axis=1).astype(jnp.int32)
    d2 = jnp.take_along_axis(scores, code[:, None], axis=1)[:, 0] + jnp.sum(x * x, axis=-1)
    return code, jnp.maximum(d2, 0.0)


def residual_codes(x: jax.Array, codebooks: jax.Array | Sequence[jax.Array],
                   chunk_rows: int = 0) -> tuple[jax.Array, jax.Array]:
    """Greedy residual assignment: ``x [b, d]``, ``codebooks [L, k, d]`` -> ``(codes [b, L] int32, final
    residual [b, d])``."""
    codes, r = [], x
    for level in range(len(codebooks)):
        code, _ = nearest(r, codebooks[level], chunk_rows)
        codes.append(code)
        r = r - codebooks[level][code]
    return jnp.stack(codes, axis=1), r


def kmeans_plus_plus(points: jax.Array, weights: jax.Array, uniforms: jax.Array) -> jax.Array:
    """k-means++ seeding (Arthur & Vassilvitskii 2007, Sec. 2.2): the first centre uniformly among the rows of
    weight > 0, each next one with probability proportional to ``w D(x)^2``, its squared distance to the
    nearest centre chosen so far. ``points [n, d], weights [n] (0 masks padding), uniforms [k]`` in [0, 1)
    (one draw per centre, by inverse CDF) -> ``centres [k, d]``.

    Each step reads every row once (a matvec: memory-bound, ``n d`` floats per centre); the rows are read in
    the ``[d, n]`` layout (``c @ points^T``, 1.4x faster than ``points @ c`` on XLA CPU). Seed on a
    ``subsample`` of the rows to make it cheaper still."""
    k = uniforms.shape[0]

    def pick(mass: jax.Array, u: jax.Array) -> jax.Array:
        cdf = jnp.cumsum(mass)
        return jnp.minimum(jnp.searchsorted(cdf, u * cdf[-1], side="right"), points.shape[0] - 1)

    sq = jnp.sum(points * points, axis=-1)
    points_t = points.T  # [d, n]
    # |x - c|^2 as |x|^2 - 2 x.c + |c|^2: a matvec, ~10x faster than the direct form inside a CPU loop
    dist = lambda c: jnp.maximum(sq - 2.0 * (c @ points_t) + c @ c, 0.0)  # noqa: E731
    first = points[pick(weights, uniforms[0])]

    def body(j, carry):
        centres, d2 = carry
        c = points[pick(weights * d2, uniforms[j])]
        return centres.at[j].set(c), jnp.minimum(d2, dist(c))

    centres = jnp.zeros((k, points.shape[1]), points.dtype).at[0].set(first)
    centres, _ = jax.lax.fori_loop(1, k, body, (centres, dist(first)))
    return centres


def subsample(points: jax.Array, weights: jax.Array, key: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """A uniform sample without replacement of ``rows`` of the rows of weight > 0 (all of them, in order, when
    ``rows <= 0`` or ``n <= rows``): ``points [n, d], weights [n] -> ([m, d], [m])``, ``m = min(rows, n)``.

    k-means++ on a subsample, as scikit-learn's ``MiniBatchKMeans`` seeds on ``init_size`` rows and faiss
    trains on at most ``max_points_per_centroid * K``: the seeding loop is sequential over K centres and each
    step reads every row, so it costs ``O(K n d)``; fewer rows (that stay in cache) make it cheaper."""
    n = points.shape[0]
    if rows <= 0 or n <= rows:
        return points, weights
    keys = jnp.where(weights > 0, jax.random.uniform(key, (n,)), -1.0)  # padding only once the valid rows run out
    _, idx = jax.lax.top_k(keys, rows)
    idx = jnp.sort(idx)
    return points[idx], weights[idx]


def balanced_codes(scores: jax.Array, valid: jax.Array, rows: jax.Array, axes: tuple[str, ...] = ()) -> jax.Array:
    """OneRec's balanced k-means assignment (OneRec Technical Report, Zhou et al. 2025, Sec. 2.1.2, Alg. 1):
    codes are served in index order, and code ``k`` takes the ``w_k`` rows nearest to it among those no
    earlier code took, ``w_k = floor(n / K) + [k < n mod K]`` (so every code gets ``n / K`` rows, to one).

    ``scores [b, K]`` (any per-row shift of the squared distance, e.g. ``|c|^2 - 2 x.c``), ``valid [b]`` bool
    (padding rows take no capacity and get code 0), ``rows []`` int32: ``n``, the valid rows of the global
    batch -> ``codes [b]`` int32. Under ``shard_map`` (``axes``: the batch axes) the rows are the global
    batch's: code ``k``'s rows are the ``w_k`` smallest (score, global row) pairs of all shards (each shard
    offers its ``ceil(B / K)`` best untaken rows; an all-gather ranks them), so the codes do not depend on
    the sharding. A sequential loop over the K codes, each a top-k of ``b`` scores: ``O(K b)``.
    """
    b, k = scores.shape
    shards = jax.lax.psum(1, axes) if axes else 1
    offer = min(b, -(-b * shards // k))  # ceil(B / K) >= every w_k
    first_row = jax.lax.axis_index(axes) * b if axes else 0
    gather = (lambda a: jax.lax.all_gather(a, axes, tiled=True)) if axes else (lambda a: a)  # noqa: E731

    def take(j, carry):
        taken, codes = carry
        col = jnp.where(taken, jnp.inf, scores_t[j])
        neg, idx = jax.lax.top_k(-col, offer)  # this shard's best untaken rows, lower row first on ties
        val, row = -neg, first_row + idx
        all_val, all_row = gather(val), gather(row)
        ahead = (all_val[None] < val[:, None]) | ((all_val[None] == val[:, None]) & (all_row[None] < row[:, None]))
        w = rows // k + (j < rows % k).astype(rows.dtype)
        win = (jnp.sum(ahead, axis=1) < w) & jnp.isfinite(val)
        rows_won = jnp.where(win, idx, b)  # out of range: dropped
        return taken.at[rows_won].set(True, mode="drop"), codes.at[rows_won].set(j, mode="drop")

    scores_t = scores.T  # [K, b]: code j's scores contiguous
    taken, codes = jax.lax.fori_loop(0, k, take, (~valid, jnp.zeros((b,), jnp.int32)))
    return codes


def fsq_projection(dim: int, fsq_dims: int, seed: int) -> np.ndarray:
    """A fixed orthonormal projection ``[dim, fsq_dims]`` float32 (``P^T P = I``): the Q of a seeded Gaussian
    matrix (numpy's PCG64, so the same on every platform)."""
    if not 0 < fsq_dims <= dim:
        raise ValueError(f"model.fsq_levels has {fsq_dims} entries; it needs 1 to model.dim={dim}")
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, fsq_dims)))
    return (q * np.sign(np.diag(r))).astype(np.float32)  # sign-fixed: the Haar-distributed Q


def fsq_quantise(z: jax.Array, levels: Sequence[int]) -> jax.Array:
    """Finite Scalar Quantization (Mentzer et al. 2023, "FSQ: VQ-VAE Made Simple", Sec. 3, Eq. 1 and the
    even-L shift of its reference code): ``z [b, m] -> digits [b, m]`` int32, digit ``j`` in
    ``[0, levels[j])``.

    Each dimension is bounded, ``f(z) = h tanh(z + s) - o`` with ``h = (L - 1)(1 - 1e-3) / 2``, ``o = 0`` for
    odd ``L`` and ``1/2`` for even ``L`` (``s = atanh(o / h)``, so ``f(0) = 0``), then rounded:
    ``round(f(z))`` is one of ``L`` integers, ``-floor(L/2) ... ceil(L/2) - 1``; the digit adds ``floor(L/2)``.
    (No gradient is taken here: FSQ's straight-through rounding is not needed.)"""
    lv = jnp.asarray(levels, jnp.float32)
    if z.shape[-1] != lv.shape[0]:
        raise ValueError(f"FSQ input has {z.shape[-1]} dimensions but fsq_levels has {lv.shape[0]} entries")
    half = (lv - 1.0) * (1.0 - 1e-3) / 2.0
    offset = jnp.where(jnp.asarray(levels) % 2 == 1, 0.0, 0.5)
    bounded = half * jnp.tanh(z + jnp.arctanh(offset / half)) - offset
    return (jnp.round(bounded) + jnp.floor(lv / 2.0)).astype(jnp.int32)


def fsq_code(digits: jax.Array, levels: Sequence[int]) -> jax.Array:
    """The mixed-radix index of FSQ digits (FSQ's ``codes_to_indexes``): ``digits [b, m] -> [b]`` int32,
    ``sum_j digit_j prod_{i<j} L_i``, in ``[0, prod L)``."""
    basis = np.cumprod([1, *levels[:-1]]).astype(np.int32)
    return jnp.sum(digits * basis, axis=-1).astype(jnp.int32)


def fsq_last_level(residual: jax.Array, projection: jax.Array, scale: jax.Array, levels: Sequence[int]) -> jax.Array:
    """OneMall's last SID level: FSQ of the final residual. ``residual [b, d]``, ``projection [d, m]``
    (``fsq_projection``), ``scale []`` (the residual's per-coordinate RMS: ``z = r P / scale``) -> ``codes [b]``
    int32 in ``[0, prod levels)``."""
    return fsq_code(fsq_quantise(residual @ projection / scale, levels), levels)


def lloyd_sums(r: jax.Array, w: jax.Array, centroids: jax.Array, chunk_rows: int = 0, balanced: bool = False,
               axes: tuple[str, ...] = ()) -> dict[str, jax.Array]:
    """One shard's share of a Lloyd iteration: ``r [b, d]`` residuals, ``w [b]`` weights (0: padding),
    ``centroids [k, d]`` -> per-code ``sums [k, d]``, ``counts [k]``, the summed squared distance, and each
    row's code and squared distance. Rows go to their nearest centroid, or with ``balanced`` by
    ``balanced_codes`` over the global batch (``axes``: the shard_map batch axes; one ``[b, k]`` score
    matrix, ``chunk_rows`` unused)."""
    if balanced:
        scores = jnp.sum(centroids * centroids, axis=-1)[None] - 2.0 * (r @ centroids.T)          # [b, k]
        valid = w > 0
        rows = jax.lax.psum(jnp.sum(valid.astype(jnp.int32)), axes) if axes else jnp.sum(valid.astype(jnp.int32))
        code = balanced_codes(scores, valid, rows, axes)
        d2 = jnp.maximum(jnp.take_along_axis(scores, code[:, None], axis=1)[:, 0] + jnp.sum(r * r, axis=-1), 0.0)
    else:
        code, d2 = nearest(r, centroids, chunk_rows)
    k = centroids.shape[0]
    return {"sums": jax.ops.segment_sum(r * w[:, None], code, k), "counts": jax.ops.segment_sum(w, code, k),
            "inertia": jnp.sum(w * d2), "code": code, "d2": jnp.where(w > 0, d2, -1.0)}


def merge_far(far_d2: jax.Array, far_points: jax.Array, d2: jax.Array, points: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keep the ``k`` points farthest from their centroid: ``far_d2 [k], far_points [k, d]`` merged with a
    batch's ``d2 [b], points [b, d]`` -> the new top ``k``, farthest first (-1: no point yet; kept finite for the non-finite guard)."""
    k = far_d2.shape[0]
    all_d2 = jnp.concatenate([far_d2, d2])
    top, idx = jax.lax.top_k(all_d2, k)
    return top, jnp.concatenate([far_points, points])[idx]


def revive_dead(centroids: jax.Array, counts: jax.Array, far_d2: jax.Array, far_points: jax.Array) -> jax.Array:
    """Dead-code reset: the i-th code (in index order) that no point chose is re-seeded at the i-th farthest
    point of the pass (from its nearest centroid), as scikit-learn relocates empty clusters; a code with
    no such point left keeps its centroid. ``centroids [k, d], counts [k], far_d2 [k], far_points [k, d]``."""
    dead = counts <= 0
    rank = jnp.cumsum(dead) - 1
    usable = dead & (far_d2[jnp.clip(rank, 0)] > 0)
    return jnp.where(usable[:, None], far_points[jnp.clip(rank, 0)], centroids)


def rq_kmeans_step(state: dict, x: jax.Array, w: jax.Array, rng: jax.Array, *, mesh: jax.sharding.Mesh,
                   axes: tuple[str, ...], iterations: int, batches_per_pass: int, init: str = "kmeans++",
                   reset_dead: bool = True, chunk_rows: int = 0, balanced: bool = False,
                   init_rows: int = 0) -> tuple[dict, dict]:
    """One step of a level-by-level RQ-KMeans fit over a stream of batches.

    ``state`` (task state, replicated in the step): ``codebooks [L, k, d]``; the current pass's
    accumulators ``sums [k, d]``, ``counts [k]``, ``inertia []``, ``far_d2 [k]``, ``far_points [k, d]``;
    ``usage [L, k]`` (each level's counts in its latest pass); ``item_codes [P, L - 1]``, every item's codes
    at the levels already fitted (P: the rows of a pass); the schedule ``level``, ``iteration``,
    ``pass_step`` (int32 scalars). ``x [B, d], w [B]`` is one global batch split over ``axes``, batch
    ``pass_step`` of the pass (the items in a fixed order).

    A pass is ``batches_per_pass`` batches (the whole item set once); at its end the level's centroids
    become the pass means (exact Lloyd over all items, in bounded memory), dead codes are re-seeded, and
    after ``iterations`` passes the schedule moves to the next level. Level l's residuals need the codes of
    levels < l: the first pass of level l finds the codes of level l - 1 (now frozen) and stores them, so
    a pass costs one nearest-code search per item at every level, not l + 1. The first batch of a level seeds its
    codebook from that global batch's residuals: ``init="kmeans++"``, or ``"first"`` (its first ``k``
    rows); k-means++ runs on at most ``init_rows`` of them (``subsample``; 0: all). With ``balanced`` the
    Lloyd passes assign each batch by OneRec's balanced k-means (``balanced_codes``: every code takes
    ``B / K`` rows of the batch) instead of to the nearest centroid, so every code's pass mean is over
    ``N / K`` items; the frozen levels' codes (the next level's residuals) stay nearest, as at assignment.
    ``mse [L]`` (state) is each level's mean squared residual in its latest pass. Once every level is
    fitted, a step changes nothing. ``chunk_rows``: see ``nearest``. Returns ``(state, metrics)``.
    """
    levels, k, _ = state["codebooks"].shape
    if init not in ("kmeans++", "first"):
        raise ValueError(f"RQ-KMeans init must be 'kmeans++' or 'first', not {init!r}")
    first = (state["iteration"] == 0) & (state["pass_step"] == 0)
    uniforms = jax.random.uniform(rng, (k,))
    sample_key = jax.random.fold_in(rng, 1)

    def fit(level: int):
        def shard(codebooks, x, w, far_d2, far_points, first, uniforms, cached, pass_step, new_level):
            b = x.shape[0]
            start = pass_step * b * jax.lax.psum(1, axes) + jax.lax.axis_index(axes) * b  # this shard's rows
            cached = jax.lax.dynamic_slice_in_dim(cached, start, b)
            r, code = x, None
            for j in range(level):  # residual of the levels already fitted
                if j < level - 1:  # codes of frozen levels: found once, read back
                    code = cached[:, j]
                else:  # the level just frozen: found in this level's first pass, read back in the others
                    code = jax.lax.cond(new_level, lambda r=r, j=j: nearest(r, codebooks[j], chunk_rows)[0],
                                        lambda j=j: cached[:, j])
                r = r - codebooks[j][code]

            def seed():
                rows = jax.lax.all_gather(r, axes, tiled=True)
                if init == "first":
                    return rows[:k]
                rows, weights = subsample(rows, jax.lax.all_gather(w, axes, tiled=True), sample_key, init_rows)
                return kmeans_plus_plus(rows, weights, uniforms)

            centroids = jax.lax.cond(first, seed, lambda: codebooks[level])
            s = lloyd_sums(r, w, centroids, chunk_rows, balanced, axes)
            m = min(k, r.shape[0])
            top, idx = jax.lax.top_k(s["d2"], m)
            far_d2, far_points = merge_far(far_d2, far_points, jax.lax.all_gather(top, axes, tiled=True),
                                           jax.lax.all_gather(r[idx], axes, tiled=True))
            sums = jax.lax.psum((s["sums"], s["counts"], s["inertia"]), axes)
            frozen = jax.lax.all_gather(code if level else jnp.zeros((b,), jnp.int32), axes, tiled=True)
            return centroids, *sums, far_d2, far_points, frozen

        rep = jax.P()
        sharded = jax.shard_map(shard, mesh=mesh, in_specs=(rep, jax.P(axes), jax.P(axes)) + (rep,) * 7,
                                out_specs=(rep,) * 7, check_vma=False)

        def run(*args):
            *out, frozen = sharded(*args)
            cached, pass_step, new_level = args[7:]
            if level:  # remember the frozen level's codes of this batch's items
                rows = jax.lax.dynamic_update_slice(cached, frozen[:, None], (pass_step * x.shape[0], level - 1))
                cached = jnp.where(new_level, rows, cached)
            return *out, cached

        return run

    def done(*_):
        s = state
        return s["codebooks"][0], jnp.zeros_like(s["sums"]), jnp.zeros_like(s["counts"]), jnp.zeros(()), \
            s["far_d2"], s["far_points"], s["item_codes"]

    branches = [functools.partial(lambda lv, *a: fit(lv)(*a), lv) for lv in range(levels)] + [done]
    level = jnp.minimum(state["level"], levels)
    centroids, sums, counts, inertia, far_d2, far_points, item_codes = jax.lax.switch(
        level, branches, state["codebooks"], x, w, state["far_d2"], state["far_points"], first, uniforms,
        state["item_codes"], state["pass_step"], state["iteration"] == 0)
    fitting = state["level"] < levels
    sums, counts, inertia = state["sums"] + sums, state["counts"] + counts, state["inertia"] + inertia
    end_of_pass = fitting & (state["pass_step"] == batches_per_pass - 1)

    new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centroids)
    if reset_dead:
        new = revive_dead(new, counts, far_d2, far_points)
    lv = jnp.minimum(state["level"], levels - 1)
    codebooks = state["codebooks"].at[lv].set(jnp.where(end_of_pass, new, jnp.where(fitting, centroids,
                                                                                       state["codebooks"][lv])))
    usage = state["usage"].at[lv].set(jnp.where(end_of_pass, counts.astype(jnp.int32), state["usage"][lv]))
    mse = state["mse"].at[lv].set(jnp.where(end_of_pass, inertia / jnp.maximum(jnp.sum(counts), 1.0), state["mse"][lv]))
    iteration = state["iteration"] + end_of_pass.astype(jnp.int32)
    next_level = iteration == iterations
    keep = lambda a: jnp.where(end_of_pass, jnp.zeros_like(a), a)  # noqa: E731 - reset at a pass's end
    new_state = {
        "codebooks": codebooks, "usage": usage, "mse": mse, "item_codes": item_codes,
        "sums": keep(sums), "counts": keep(counts), "inertia": keep(inertia),
        "far_d2": jnp.where(end_of_pass, jnp.full_like(far_d2, -1.0), far_d2),
        "far_points": keep(far_points),
        "level": state["level"] + next_level.astype(jnp.int32),
        "iteration": jnp.where(next_level, 0, iteration),
        "pass_step": jnp.where(fitting, (state["pass_step"] + 1) % batches_per_pass, state["pass_step"]),
    }
    n = jnp.maximum(jnp.sum(w), 1.0)
    metrics = {"batch_inertia": jnp.where(fitting, inertia - state["inertia"], 0.0) / n,
               "level": state["level"].astype(jnp.float32),
               "dead_codes": jnp.sum(usage[lv] == 0).astype(jnp.float32)}  # in the level's latest pass
    return new_state, metrics


def init_rq_kmeans_state(levels: int, codes: int, dim: int, items: int) -> dict[str, jax.Array]:
    """A fresh RQ-KMeans state (see ``rq_kmeans_step``) for ``items`` rows a pass (padding included): zero
    codebooks, empty accumulators, level 0."""
    zero = lambda *shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
    scalar = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
    return {"codebooks": zero(levels, codes, dim), "usage": jnp.zeros((levels, codes), jnp.int32), "mse": zero(levels),
            "item_codes": jnp.zeros((items, max(levels - 1, 1)), jnp.int32),
            "sums": zero(codes, dim), "counts": zero(codes), "inertia": zero(),
            "far_d2": jnp.full((codes,), -1.0, jnp.float32), "far_points": zero(codes, dim),
            "level": scalar(), "iteration": scalar(), "pass_step": scalar()}


# ----------------------------------------------------------------------------- OPQ (OneSearch-V2's last two codes)


class OPQ(NamedTuple):
    rotation: jax.Array    # [d, d] orthogonal: codes are of x @ rotation
    centroids: jax.Array   # [M, K, d / M] per sub-space


def opq_encode(x: jax.Array, opq: OPQ) -> jax.Array:
    """``x [n, d]`` -> the nearest sub-space centroid of ``x R`` in each of the ``M`` sub-spaces: ``[n, M]`` int32."""
    m, _, sub = opq.centroids.shape
    y = (x @ opq.rotation).reshape(x.shape[0], m, sub)
    return jnp.stack([nearest(y[:, j], opq.centroids[j])[0] for j in range(m)], axis=1)


def opq_decode(codes: jax.Array, opq: OPQ) -> jax.Array:
    """``codes [n, M]`` -> the reconstructions ``[n, d]`` in the original space (``y_hat R^T``)."""
    parts = [opq.centroids[j][codes[:, j]] for j in range(codes.shape[1])]
    return jnp.concatenate(parts, axis=1) @ opq.rotation.T


@functools.partial(jax.jit, static_argnames=("subspaces", "codes", "iterations", "lloyd_steps"))
def opq_fit(x: jax.Array, key: jax.Array, *, subspaces: int = 2, codes: int = 256, iterations: int = 20,
            lloyd_steps: int = 2) -> OPQ:
    """Optimized product quantization, non-parametric (Ge et al. 2014, "Optimized Product Quantization", Alg. 1):
    alternate ``lloyd_steps`` Lloyd iterations of k-means in each of the ``subspaces`` slices of ``x R`` with the
    orthogonal Procrustes update ``R = U V^T`` (``U S V^T`` the SVD of ``x^T y_hat``), ``iterations`` times from
    ``R = I`` and centroids drawn from the rows. OneSearch-V2 codes the residual after three k-means levels with
    2 sub-spaces x 256 codes. ``x [n, d]`` (``d`` divisible by ``subspaces``, ``n >= codes``) -> ``OPQ``."""
    n, d = x.shape
    if d % subspaces or n < codes:
        raise ValueError(f"opq_fit: d={d} must split into {subspaces} sub-spaces and n={n} >= codes={codes}")
    sub = d // subspaces
    rows = jax.random.choice(key, n, (codes,), replace=False)
    centroids = x[rows].reshape(codes, subspaces, sub).transpose(1, 0, 2)

    def lloyd(c, y):                                   # one Lloyd step in one sub-space; empty codes keep theirs
        code, _ = nearest(y, c)
        sums, counts = jax.ops.segment_sum(y, code, codes), jax.ops.segment_sum(jnp.ones(n), code, codes)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)

    def iteration(carry, _):
        rotation, centroids = carry
        y = (x @ rotation).reshape(n, subspaces, sub)
        for _ in range(lloyd_steps):
            centroids = jnp.stack([lloyd(centroids[j], y[:, j]) for j in range(subspaces)])
        y_hat = jnp.concatenate([centroids[j][nearest(y[:, j], centroids[j])[0]] for j in range(subspaces)], axis=1)
        u, _, vt = jnp.linalg.svd(x.T @ y_hat)
        return (u @ vt, centroids), None

    (rotation, centroids), _ = jax.lax.scan(iteration, (jnp.eye(d, dtype=x.dtype), centroids), None, iterations)
    y = (x @ rotation).reshape(n, subspaces, sub)        # the centroids of the final rotation
    for _ in range(lloyd_steps):
        centroids = jnp.stack([lloyd(centroids[j], y[:, j]) for j in range(subspaces)])
    return OPQ(rotation, centroids)
