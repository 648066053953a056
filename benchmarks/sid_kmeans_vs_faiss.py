"""ecomax's RQ-KMeans against faiss-cpu's k-means, side by side in one run, on the same vectors with the
same k-means++ seeds and the same number of Lloyd iterations per level.

    python benchmarks/sid_kmeans_vs_faiss.py              # the README table (two settings)
    python benchmarks/sid_kmeans_vs_faiss.py --smoke      # seconds: checks the script runs

ecomax runs its real train step (``Trainer.compiled_step`` of ``sid_rq_kmeans``, one device, the whole item
set as one batch: one step = one Lloyd pass), compiled before timing. faiss runs ``faiss.Kmeans`` per
level on the residuals of its own previous levels, with ``max_points_per_centroid`` raised so it uses every
item (no subsampling). Seeds: k-means++ (``models.semantic_ids.kmeans_plus_plus``) with the draws ecomax's
step makes at that level, on each library's own residuals. What each timing holds: ecomax's includes, at
level l, recomputing the residuals of levels < l from the raw items in every pass (it streams items;
nothing per item is stored); faiss's is ``Kmeans.train`` given residuals and seeds.
ecomax's items/s per level is over its Lloyd passes after the first (the first step also seeds, and is
shown apart); faiss's = items x iterations / seconds of ``Kmeans.train``; the "all" row charges ecomax
its seeding too.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from data_pipelines.sid.embeddings import synthetic_embeddings  # noqa: E402
from launch.config import load_config  # noqa: E402
from models.semantic_ids import kmeans_plus_plus  # noqa: E402
from trainers.loop import Trainer, global_batch  # noqa: E402

SETTINGS = {  # name: (items, dim, levels, codes, iterations)
    "TIGER-like 3x256, d=256": (100_000, 256, 3, 256, 10),
    "OneSearch-like 3x1024, d=768": (32_768, 768, 3, 1024, 5),
}
SMOKE = {"smoke 2x64, d=32": (4_096, 32, 2, 64, 3)}


def ecomax_fit(x: np.ndarray, levels: int, codes: int, iterations: int, chunk_rows: int, workdir: str):
    np.save(f"{workdir}/items.npy", x)
    config = load_config(f"{pathlib.Path(__file__).resolve().parents[1]}/configs/sid.py:tiny", [
        f"model.levels={levels}", f"model.codes={codes}", f"model.dim={x.shape[1]}",
        f"model.iterations={iterations}", f"model.chunk_rows={chunk_rows}", f"train.batch_size={len(x)}",
        "model.init_rows=0",  # k-means++ on every row, as faiss is seeded
        f"data.embeddings={workdir}/items.npy", "data.num_items=0", "mesh.data=1"])
    trainer = Trainer.create(config, workdir, devices=jax.devices()[:1])
    step = trainer.compiled_step()
    state = trainer.init_state(step.tx, step.shardings)
    source = trainer.task.train_source()[0]
    batch = global_batch(source.gather(np.arange(len(x))), step.batch_shardings)
    compiled = step.fn.lower(state, batch).compile()
    first, rest, mse = [], [], []
    for _ in range(levels):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)  # k-means++ seeding + the first Lloyd pass
        jax.block_until_ready(state)
        t1 = time.perf_counter()
        for _ in range(iterations - 1):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        first.append(t1 - t0)
        rest.append(time.perf_counter() - t1)
        mse.append(float(metrics["batch_inertia"]))  # the last pass, before its update (as faiss's obj)
    return first, rest, mse


def faiss_fit(x: np.ndarray, levels: int, codes: int, iterations: int, seed: int):
    r, seconds, mse = x.copy(), [], []
    for level in range(levels):
        uniforms = jax.random.uniform(jax.random.fold_in(jax.random.key(seed), level * iterations), (codes,))
        init = np.asarray(jax.jit(kmeans_plus_plus)(r, np.ones(len(r), np.float32), uniforms))
        km = faiss.Kmeans(x.shape[1], codes, niter=iterations, seed=seed, max_points_per_centroid=len(r) + 1,
                          min_points_per_centroid=1, verbose=False)
        t0 = time.perf_counter()
        km.train(r, init_centroids=init)
        seconds.append(time.perf_counter() - t0)
        mse.append(float(km.obj[-1]) / len(r))
        _, assign = km.index.search(r, 1)
        r = r - km.centroids[assign[:, 0]]
    return seconds, mse


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--chunk-rows", type=int, default=-1, help="ecomax model.chunk_rows (-1: 2^19 / codes)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows, results = [], {}
    for name, (n, d, levels, codes, iterations) in (SMOKE if args.smoke else SETTINGS).items():
        x = synthetic_embeddings(n, d, clusters=64, seed=0)
        with tempfile.TemporaryDirectory() as workdir:
            e_first, e_rest, e_mse = ecomax_fit(x, levels, codes, iterations, args.chunk_rows, workdir)
        f_sec, f_mse = faiss_fit(x, levels, codes, iterations, seed=0)
        results[name] = {"ecomax_first_step_seconds": e_first, "ecomax_other_steps_seconds": e_rest,
                         "faiss_seconds": f_sec, "ecomax_mse": e_mse, "faiss_mse": f_mse, "items": n,
                         "iterations": iterations}
        for level in range(levels):
            e, f = n * (iterations - 1) / e_rest[level], n * iterations / f_sec[level]
            rows.append(f"| {name} | {level + 1} | {e:,.0f} | {f:,.0f} | **{e / f:.2f}x** | {e_first[level]:.2f} | "
                        f"{e_mse[level]:.4f} | {f_mse[level]:.4f} |")
        e_all = n * iterations * levels / (sum(e_first) + sum(e_rest))
        f_all = n * iterations * levels / sum(f_sec)
        rows.append(f"| {name} | all, ecomax incl. seeding | {e_all:,.0f} | {f_all:,.0f} | {e_all / f_all:.2f}x | "
                    f"{sum(e_first):.2f} | | |")
    load_after = os.getloadavg()
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__}, faiss {faiss.__version__} "
          f"({faiss.omp_get_max_threads()} threads); load average before {load_before[0]:.2f}, "
          f"after {load_after[0]:.2f} (1 min)")
    print("| setting | level | ecomax items/s (Lloyd passes) | faiss items/s | ecomax / faiss | ecomax seeding + "
          "1st pass, s | ecomax MSE | faiss MSE |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"load": [load_before, load_after], **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
