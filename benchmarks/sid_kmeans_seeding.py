"""k-means++ seeding of RQ-KMeans, before and after, side by side in one run: the seconds to seed K centres
on one batch of n x d rows, and the seeds' quality (mean squared distance of all n rows to their nearest seed).

    python benchmarks/sid_kmeans_seeding.py              # the README numbers (two settings)
    python benchmarks/sid_kmeans_seeding.py --smoke      # seconds: checks the script runs

before: ``kmeans_plus_plus`` as of commit fe5363d (``points @ c`` per centre, every row);
layout: today's ``kmeans_plus_plus`` on every row (``c @ points^T``);
after: today's seeding step: ``subsample`` to ``model.init_rows`` (16,384) rows, then ``kmeans_plus_plus``.
Each is jitted and compiled before timing; the same uniforms for all (the draws of ``rq_kmeans_step``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from data_pipelines.sid.embeddings import synthetic_embeddings  # noqa: E402
from models.semantic_ids import kmeans_plus_plus, nearest, subsample  # noqa: E402

SETTINGS = {"K=1024, n=32768, d=768": (1024, 32_768, 768), "K=256, n=65536, d=256": (256, 65_536, 256)}
SMOKE = {"smoke K=32, n=4096, d=32": (32, 4_096, 32)}
INIT_ROWS = 16_384


def kmeans_plus_plus_before(points, weights, uniforms):
    """``models.semantic_ids.kmeans_plus_plus`` at fe5363d: the same draws, rows read as ``points @ c``."""
    k = uniforms.shape[0]

    def pick(mass, u):
        cdf = jnp.cumsum(mass)
        return jnp.minimum(jnp.searchsorted(cdf, u * cdf[-1], side="right"), points.shape[0] - 1)

    sq = jnp.sum(points * points, axis=-1)
    dist = lambda c: jnp.maximum(sq - 2.0 * (points @ c) + c @ c, 0.0)  # noqa: E731
    first = points[pick(weights, uniforms[0])]

    def body(j, carry):
        centres, d2 = carry
        c = points[pick(weights * d2, uniforms[j])]
        return centres.at[j].set(c), jnp.minimum(d2, dist(c))

    centres = jnp.zeros((k, points.shape[1]), points.dtype).at[0].set(first)
    return jax.lax.fori_loop(1, k, body, (centres, dist(first)))[0]


def after(points, weights, uniforms, key):
    return kmeans_plus_plus(*subsample(points, weights, key, INIT_ROWS), uniforms)


def timed(fn, *args, repeats: int = 2) -> tuple[float, np.ndarray]:
    compiled = jax.jit(fn).lower(*args).compile()
    out = jax.block_until_ready(compiled(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t0)
    return best, np.asarray(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    print(json.dumps({"uptime_before": os.popen("uptime").read().strip(), "jax": jax.__version__,
                      "devices": str(jax.devices()[0])}))
    rows = []
    for name, (k, n, d) in (SMOKE if args.smoke else SETTINGS).items():
        x = jnp.asarray(synthetic_embeddings(n, d, 64, seed=0))
        w = jnp.ones((n,), jnp.float32)
        rng = jax.random.fold_in(jax.random.key(0), 0)
        uniforms, key = jax.random.uniform(rng, (k,)), jax.random.fold_in(rng, 1)
        mse = lambda c: float(jnp.mean(nearest(x, jnp.asarray(c), chunk_rows=-1)[1]))  # noqa: E731
        t_before, c_before = timed(kmeans_plus_plus_before, x, w, uniforms)
        t_layout, c_layout = timed(kmeans_plus_plus, x, w, uniforms)
        t_after, c_after = timed(after, x, w, uniforms, key)
        row = {"setting": name, "before_s": t_before, "layout_s": t_layout, "after_s": t_after,
               "layout_speedup": t_before / t_layout, "speedup": t_before / t_after,
               "same_seeds_layout": bool(np.allclose(c_before, c_layout, rtol=1e-5, atol=1e-6)),
               "mse_before": mse(c_before), "mse_after": mse(c_after)}
        rows.append(row)
        print(json.dumps(row))
    print(json.dumps({"uptime_after": os.popen("uptime").read().strip()}))


if __name__ == "__main__":
    main()
