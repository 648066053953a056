"""Exact top-k search in JAX: jitted chunked matmul + ``lax.top_k``, memory bounded.

``jax_exact_search(queries [q, d], gallery [n, d], k) -> (indices [q, k'] int64, scores [q, k'] float32)``
with ``k' = min(k, n)``, best first, ties by ascending index: the same contract as the numpy
``retrieval.exact_search`` (which stays the fallback and the reference).

How: the gallery is padded to a multiple of ``gallery_chunk`` rows and put on the device once as
``[num_chunks, gallery_chunk, d]``; queries go in blocks of ``query_block`` rows. For one query
block a ``lax.scan`` over gallery chunks computes the ``[query_block, gallery_chunk]`` score tile,
takes its top-k (two-stage, ``_tile_topk``: the k best 32-column blocks by their maxima, then
``lax.top_k`` over those; among equal values the lower position comes first) and merges it
with the running top-k, the running entries placed first (they come from earlier chunks, hence
lower indices), so ties resolve to the lowest gallery index exactly as a stable argsort would.
Padding rows score ``-inf`` and are never chosen while ``k <= n``. Device memory: the gallery plus
one score tile per query block (``query_block * gallery_chunk`` floats, 8 MiB by default) plus the
running top-k; the scan is one compiled program per (shapes, k).

Scores are float32 matmuls computed by XLA; numpy's BLAS sums in another order, so on real-valued
data the two paths can swap two gallery items whose scores agree to the last bits (never a
different score beyond rounding). On exactly representable data (e.g. small integers) both give
identical ids and scores; the tests check both cases.

With several accelerators the query blocks are spread over them round-robin, the gallery replicated
on each (``devices=`` selects them; the default is all local devices, or only the first on CPU,
where fake devices share the host's cores and a copy each would only cost memory).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["gallery_fits", "jax_exact_search", "JaxExactSearch"]

DEFAULT_QUERY_BLOCK = 512
DEFAULT_GALLERY_CHUNK = 4096


def gallery_fits(n: int, d: int, *, device: Any = None, fraction: float = 0.5,
                 cpu_limit_bytes: int = 8 << 30) -> bool:
    """Whether an ``[n, d]`` float32 gallery takes at most ``fraction`` of the device's memory
    (``memory_stats()["bytes_limit"]``), or at most ``cpu_limit_bytes`` where the device reports
    no limit (CPU)."""
    device = device or jax.devices()[0]
    need = 4 * n * d
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = None
    limit = (stats or {}).get("bytes_limit")
    return need <= (fraction * limit if limit else cpu_limit_bytes)


TOPK_BLOCK = 32  # columns per block of the two-stage top-k (``_tile_topk``)


def _tile_topk(s: jax.Array, k: int, block: int = TOPK_BLOCK) -> tuple[jax.Array, jax.Array]:
    """Exact top-k of each row of a score tile, best first, ties to the lower column.
    ``s [b, m] -> (values [b, k], columns [b, k] int32)``.

    ``lax.top_k`` over a whole 4096-wide row costs as much as the matmul that made it, so rows are cut
    into blocks of ``block`` columns and only the ``k`` blocks with the largest maxima are searched.
    Exact: rank the blocks by (max desc, block asc); every block ranked ahead of the one holding the
    i-th best entry contributes an entry ranked ahead of it (a larger value, or an equal value at a
    lower column), so for i <= k at most k - 1 blocks come first and the k chosen blocks hold the
    whole top-k. The chosen blocks are put back in column order, so ties still go to the lower column.
    """
    b, m = s.shape
    if m % block or 4 * k * block > m:  # narrow tiles: the plain top-k is as cheap
        v, p = lax.top_k(s, min(k, m))
        return v, p.astype(jnp.int32)
    sb = s.reshape(b, m // block, block)
    _, top_blocks = lax.top_k(sb.max(axis=2), k)  # [b, k], lower block first among equal maxima
    top_blocks = jnp.sort(top_blocks, axis=1)
    cand = jnp.take_along_axis(sb, top_blocks[:, :, None], axis=1).reshape(b, k * block)
    cols = (top_blocks[:, :, None] * block + jnp.arange(block, dtype=top_blocks.dtype)).reshape(b, k * block)
    v, p = lax.top_k(cand, k)
    return v, jnp.take_along_axis(cols, p, axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("k", "n"))
def _block_topk(q: jax.Array, g_chunks: jax.Array, *, k: int, n: int) -> tuple[jax.Array, jax.Array]:
    """``q [b, d], g_chunks [c, m, d] -> (scores [b, k], indices [b, k] int32)``, best first."""
    b = q.shape[0]
    m = g_chunks.shape[1]
    col = jnp.arange(m, dtype=jnp.int32)

    def body(carry, xs):
        best_v, best_i = carry
        g, c = xs
        s = jnp.dot(q, g.T, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        idx = c * m + col
        s = jnp.where(idx[None, :] < n, s, -jnp.inf)
        v, p = _tile_topk(s, k)  # a chunk may be narrower than k
        cand_v = jnp.concatenate([best_v, v], axis=1)  # running (lower indices) first
        cand_i = jnp.concatenate([best_i, c * m + p], axis=1)
        v2, p2 = lax.top_k(cand_v, k)
        return (v2, jnp.take_along_axis(cand_i, p2, axis=1)), None

    init = (jnp.full((b, k), -jnp.inf, jnp.float32), jnp.full((b, k), jnp.iinfo(jnp.int32).max, jnp.int32))
    chunks = jnp.arange(g_chunks.shape[0], dtype=jnp.int32)
    (v, i), _ = lax.scan(body, init, (g_chunks, chunks))
    return v, i


@jax.jit
def _block_matmul_floor(q: jax.Array, g_chunks: jax.Array) -> jax.Array:
    """The same tiles as ``_block_topk`` with the top-k replaced by a row max: the matmul's own cost."""

    def body(best, g):
        s = jnp.dot(q, g.T, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        return jnp.maximum(best, s.max(axis=1)), None

    return lax.scan(body, jnp.full((q.shape[0],), -jnp.inf, jnp.float32), g_chunks)[0]


class JaxExactSearch:
    """A gallery held on the device(s), searched exactly. ``search(queries [q, d], k)``."""

    def __init__(self, gallery: np.ndarray, *, gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
                 query_block: int = DEFAULT_QUERY_BLOCK, devices: Sequence[Any] | None = None):
        g = np.asarray(gallery, dtype=np.float32)
        if g.ndim != 2:
            raise ValueError(f"gallery must be [n, d], got shape {g.shape}")
        self.n, self.d = g.shape
        self.gallery_chunk = max(1, min(int(gallery_chunk), max(1, self.n)))
        self.query_block = max(1, int(query_block))
        if devices is None:  # fake CPU devices share the host's cores: one copy of the gallery is enough
            devices = jax.local_devices()
            devices = devices[:1] if devices[0].platform == "cpu" else devices
        self.devices = list(devices)
        nc = -(-self.n // self.gallery_chunk)
        padded = np.zeros((nc * self.gallery_chunk, self.d), np.float32)
        padded[:self.n] = g
        padded = padded.reshape(nc, self.gallery_chunk, self.d)
        self._g = [jax.device_put(padded, dev) for dev in self.devices]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``[q, d] -> (indices [q, min(k, n)] int64, scores [q, min(k, n)] float32)``."""
        qs = np.asarray(queries, dtype=np.float32)
        if qs.ndim != 2 or qs.shape[1] != self.d:
            raise ValueError(f"queries {qs.shape} must be [q, {self.d}]")
        k = min(int(k), self.n)
        q = qs.shape[0]
        if q == 0 or k == 0:
            return np.zeros((q, k), np.int64), np.zeros((q, k), np.float32)
        b = min(self.query_block, q)
        nb = -(-q // b)
        qpad = np.zeros((nb * b, self.d), np.float32)
        qpad[:q] = qs
        pending = []
        for j in range(nb):  # dispatch is asynchronous: blocks on different devices overlap
            dev = j % len(self.devices)
            qb = jax.device_put(qpad[j * b:(j + 1) * b], self.devices[dev])
            pending.append(_block_topk(qb, self._g[dev], k=k, n=self.n))
        vals = np.concatenate([np.asarray(v) for v, _ in pending])[:q]
        idx = np.concatenate([np.asarray(i) for _, i in pending])[:q].astype(np.int64)
        return idx, vals


    def matmul_floor_s(self, queries: np.ndarray) -> float:
        """Seconds for the same score tiles with only a row max kept (no top-k): the floor an exact
        search can approach on this device. Compiles first (untimed)."""
        qs = np.asarray(queries, dtype=np.float32)
        b = min(self.query_block, qs.shape[0])
        nb = -(-qs.shape[0] // b)
        qpad = np.zeros((nb * b, self.d), np.float32)
        qpad[:qs.shape[0]] = qs
        blocks = [jax.device_put(qpad[j * b:(j + 1) * b], self.devices[j % len(self.devices)]) for j in range(nb)]
        jax.block_until_ready(_block_matmul_floor(blocks[0], self._g[0]))
        t0 = time.perf_counter()
        outs = [_block_matmul_floor(x, self._g[j % len(self.devices)]) for j, x in enumerate(blocks)]
        jax.block_until_ready(outs)
        return time.perf_counter() - t0


def jax_exact_search(queries: np.ndarray, gallery: np.ndarray, k: int, **kwargs: Any
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One-shot ``JaxExactSearch(gallery, **kwargs).search(queries, k)``."""
    return JaxExactSearch(gallery, **kwargs).search(queries, k)
