"""Retrieval at corpus scale: ScaNN (size rule vs tuned to a recall target) and exact search (JAX vs numpy).

    python benchmarks/retrieval_scale.py [--n 1000000] [--queries 2000] [--dim 256] [--centres 2000]
                                         [--noise 0.6] [--k 10] [--target-recall 0.99] [--repeats 1]
                                         [--json OUT]

Generates L2-normalised vectors around ``--centres`` Gaussian centres (noise norm ~``--noise``; the
corpus of issue 19), then runs ``bench_retrieval`` -- the code behind ``ecomax retrieval bench`` and
the training evaluators -- and prints the table with the machine and its load average (before and
after). Exact JAX and numpy searches run interleaved in this one process, so their ratio is a
side-by-side measurement; absolute times on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from launch.retrieval import format_table, machine  # noqa: E402
from trainers.evaluators.retrieval import bench_retrieval, l2_normalize  # noqa: E402


def clustered(rng: np.random.Generator, n: int, centres: np.ndarray, noise: float, block: int = 100_000) -> np.ndarray:
    d = centres.shape[1]
    out = np.empty((n, d), np.float32)
    for s in range(0, n, block):
        m = min(block, n - s)
        lab = rng.integers(0, centres.shape[0], m)
        out[s:s + m] = l2_normalize(centres[lab] + noise * rng.standard_normal((m, d), dtype=np.float32) / np.sqrt(d))
    return out


def add_corpus_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--centres", type=int, default=2000)
    ap.add_argument("--noise", type=float, default=0.6)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--target-recall", type=float, default=0.99)
    ap.add_argument("--seed", type=int, default=0)


def corpus(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """``(gallery [n, dim], queries [queries, dim])`` around the same ``--centres``, from ``--seed``."""
    rng = np.random.default_rng(args.seed)
    centres = l2_normalize(rng.standard_normal((args.centres, args.dim), dtype=np.float32))
    return clustered(rng, args.n, centres, args.noise), clustered(rng, args.queries, centres, args.noise)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_args(ap)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    gallery, queries = corpus(args)
    print(f"data: {args.n:,} x {args.dim}, {args.centres} centres, noise {args.noise} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    r = bench_retrieval(queries, gallery, args.k, target_recall=args.target_recall, normalize=False,
                        repeats=args.repeats)
    r["machine"] = machine()
    r["machine"]["load_average_before"] = list(load_before)
    r["data"] = {"centres": args.centres, "noise": args.noise, "seed": args.seed}
    print(format_table(r))
    m = r["machine"]
    print(f"machine: {m.get('cpu_model', m['processor'])}, {m['cpu_count']} cores, JAX {m['jax_devices']}; "
          f"load average before {load_before[0]:.2f}, after {m['load_average'][0]:.2f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(r, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
