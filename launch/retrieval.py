"""``ecomax retrieval bench``: build, tune and time ScaNN and exact search on saved embeddings.

    ecomax retrieval bench --gallery G.npy --queries Q.npy [--k 10] [--target-recall 0.99]
                           [--tune-sample 1000] [--max-leaves-to-search N] [--max-reorder N]
                           [--max-rebuilds 3]
                           [--no-numpy-exact] [--repeats 1] [--json OUT]

``G.npy`` ``[n, d]`` and ``Q.npy`` ``[q, d]`` are float arrays (``np.save``; no pickle is read);
both are L2-normalised (cosine) unless ``--no-normalize``. It runs
``trainers.evaluators.retrieval.bench_retrieval``, the code the training evaluators use: exact
search (JAX, and numpy for the ratio), then ScaNN by the size rule, widened until its recall@k
against exact search reaches ``--target-recall`` on a sample of queries, rebuilt with fewer leaves
while the search needs many of them (``--max-rebuilds``). It prints build time, QPS
and recall for each, and writes the same numbers as JSON with ``--json``.

Exit status: 0 when the target is met (or there is no target), 1 when ScaNN did not reach it (its
numbers are printed as NOT FINAL; the exact ones stand), 2 for bad inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
from typing import Any

EXIT_TARGET_NOT_MET = 1
EXIT_BAD_INPUT = 2


def _load(path: str, name: str) -> Any:
    import numpy as np

    try:
        a = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise ValueError(f"--{name} {path}: cannot read a .npy array ({e})") from None
    if a.ndim != 2:
        raise ValueError(f"--{name} {path}: expected [n, d], got shape {a.shape}")
    return np.asarray(a, dtype=np.float32)


def machine() -> dict[str, Any]:
    """Where a number was measured: CPU, core count, load average, JAX devices."""
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor(),
                            "cpu_count": os.cpu_count()}
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import jax

    info["jax_devices"] = [str(d) for d in jax.devices()]
    return info


def format_table(r: dict[str, Any]) -> str:
    k = r["k"]
    rows = [("method", "build s", f"recall@{k} vs exact", "QPS")]
    rows.append(("exact, JAX (jit matmul + block top-k)", "-", "1.0000 (reference)", f"{r['exact/jax_qps']:,.0f}"))
    if "exact/numpy_qps" in r:
        rows.append(("exact, numpy (matmul + argpartition)", "-",
                     f"ids equal {r['exact/ids_equal_fraction']:.4f}", f"{r['exact/numpy_qps']:,.0f}"))
    for name in ("rule", "tuned"):
        key = f"scann_{name}/params"
        if key not in r:
            continue
        p = r[key]
        final = name == "rule" or r.get("scann/target_met", True)
        label = (f"ScaNN {name}: {p['num_leaves_to_search']}/{p['num_leaves']} leaves, reorder {p['reorder']}"
                 if p["kind"] == "tree_ah" else "ScaNN brute force")
        if not final:
            label += "  [NOT FINAL: target not met]"
        rows.append((label, f"{r[f'scann_{name}/build_s']:.1f}", f"{r[f'scann_{name}/recall_vs_exact@{k}']:.4f}",
                     f"{r[f'scann_{name}/qps']:,.0f}"))
    w = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [" | ".join(c.ljust(w[i]) for i, c in enumerate(row)) for row in rows]
    lines.insert(1, "-+-".join("-" * x for x in w))
    head = f"{r['num_gallery']:,} x {r['dim']} gallery, {r['num_queries']:,} queries, k={k}"
    tail = []
    if "exact/jax_vs_numpy_qps" in r:
        tail.append(f"exact JAX / numpy QPS: {r['exact/jax_vs_numpy_qps']:.2f}x "
                    f"({r['exact/jax_gflops']:.1f} GFLOP/s; first block incl. compile {r['exact/jax_first_block_s']:.2f} s)")
    if "exact/jax_matmul_floor_s" in r:
        tail.append(f"exact JAX search / bare matmul of the same tiles: {r['exact/jax_search_vs_matmul_floor']:.2f}x "
                    f"(matmul alone {r['exact/jax_matmul_floor_gflops']:.1f} GFLOP/s)")
    if "exact/matmul_peak_gflops" in r:
        tail.append(f"exact JAX search at {r['exact/jax_fraction_of_peak']:.0%} of the 2048² f32 matmul peak "
                    f"measured in this run ({r['exact/matmul_peak_gflops']:.1f} GFLOP/s)")
    if "scann/status" in r:
        cost = (f"; rule build + rebuilds + tuning {r['scann/total_s']:.1f} s in all"
                if "scann/total_s" in r else "")
        tail.append(r["scann/status"] + f" (tuning searches {r['scann/tune_s']:.1f} s{cost})")
    return "\n".join([head, *lines, *tail])


def _bench(args: argparse.Namespace) -> int:
    from trainers.evaluators.retrieval import bench_retrieval

    try:
        gallery, queries = _load(args.gallery, "gallery"), _load(args.queries, "queries")
        if gallery.shape[1] != queries.shape[1]:
            raise ValueError(f"gallery has dim {gallery.shape[1]} but queries have dim {queries.shape[1]}")
    except ValueError as e:
        print(f"ecomax retrieval bench: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    budget = {key: v for key, v in (("max_leaves_to_search", args.max_leaves_to_search),
                                    ("max_reorder", args.max_reorder), ("max_rebuilds", args.max_rebuilds))
              if v is not None}
    target = None if args.target_recall <= 0 else args.target_recall
    r = bench_retrieval(queries, gallery, args.k, target_recall=target, ann=args.ann, tune_sample=args.tune_sample,
                        tune_budget=budget, normalize=not args.no_normalize, numpy_exact=not args.no_numpy_exact,
                        repeats=args.repeats)
    r["machine"] = machine()
    print(format_table(r))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(r, indent=2, sort_keys=True))
        print(f"wrote {args.json}")
    if r.get("scann/target_met") is False:
        print("ecomax retrieval bench: ScaNN did not reach the target recall; use the exact numbers",
              file=sys.stderr)
        return EXIT_TARGET_NOT_MET
    return 0


def add_retrieval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``retrieval`` (with ``bench``) on the CLI's subparsers (sets ``func(args) -> int``)."""
    p = subparsers.add_parser("retrieval", help="retrieval index tools: bench ScaNN (tuned) against exact search")
    sub = p.add_subparsers(dest="retrieval_cmd", required=True)
    b = sub.add_parser("bench", help="build, tune and time ScaNN and exact search on .npy embeddings",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--gallery", required=True, help="[n, d] float .npy")
    b.add_argument("--queries", required=True, help="[q, d] float .npy")
    b.add_argument("--k", type=int, default=10)
    b.add_argument("--target-recall", type=float, default=0.99,
                   help="recall@k vs exact that ScaNN is tuned to (default 0.99; 0 = the rule, untuned)")
    b.add_argument("--tune-sample", type=int, default=1000, help="queries the recall is measured on while tuning")
    b.add_argument("--max-leaves-to-search", type=int, default=None, help="tuning budget (default: all leaves)")
    b.add_argument("--max-reorder", type=int, default=None, help="tuning budget (default: max(1000, 100k))")
    b.add_argument("--max-rebuilds", type=int, default=None,
                   help="leaf-count search: at most this many rebuilds with half the leaves (default 3; 0: none)")
    b.add_argument("--ann", choices=("auto", "scann"), default="auto",
                   help="auto: the size rule (brute force below 20k); scann: the tree from 1000 items")
    b.add_argument("--no-normalize", action="store_true", help="raw dot products (default: cosine)")
    b.add_argument("--no-numpy-exact", action="store_true", help="skip the numpy exact search (and the ratio)")
    b.add_argument("--repeats", type=int, default=1, help="exact searches, JAX and numpy interleaved; medians")
    b.add_argument("--json", default=None, metavar="OUT", help="also write the numbers as JSON here")
    b.set_defaults(func=_bench)
    return p
