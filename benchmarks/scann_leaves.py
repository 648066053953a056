"""ScaNN's leaf count on the corpus of ``retrieval_scale.py``: rebuild with each count, tune, score held out.

    python benchmarks/scann_leaves.py [--leaves 300,500,1000,2000,4000] [--n 1000000] [--queries 2000]
                                      [--centres 2000] [--noise 0.6] [--k 10] [--target-recall 0.99]

For each leaf count (``scann_params_for(..., num_leaves=L)``, which clips L to [16, n // 8]): the size
rule's other parameters (max(10, ceil(5%)) of the leaves searched, reorder 100), built
on the whole gallery, tuned by ``tune_scann`` to the target on the first half of the queries, then
recall@k against exact search and QPS measured on the other half. Exact search (numpy) gives the
ground truth once. One run per count; absolute times on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from retrieval_scale import add_corpus_args, corpus  # noqa: E402
from trainers.evaluators import retrieval as R  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--leaves", default="300,500,1000,2000,4000")
    add_corpus_args(ap)
    args = ap.parse_args()

    gallery, queries = corpus(args)
    exact, _ = R.exact_search(queries, gallery, args.k)
    half = args.queries // 2
    print(f"{args.n:,} x {args.dim}, {args.centres} centres, noise {args.noise}; tune on {half} queries, "
          f"score the other {args.queries - half}; load average {os.getloadavg()[0]:.2f}", flush=True)
    for leaves in (int(x) for x in args.leaves.split(",")):
        p = R.scann_params_for(args.n, args.k, force_tree=True, num_leaves=leaves)  # the rule at that leaf count
        t = time.perf_counter()
        built = R.ScannSearcher(gallery, p)
        build_s = time.perf_counter() - t
        tuned, tuning = R.tune_scann(built, queries[:half], exact[:half], args.k, args.target_recall)
        t = time.perf_counter()
        idx, _ = tuned.search(queries[half:], args.k)
        qps = (args.queries - half) / (time.perf_counter() - t)
        recall = R._overlap_at_k(idx, exact[half:], args.k, args.n)  # the tuner's own recall@k
        print(f"leaves {leaves:5d}: build {build_s:6.1f} s, tuned {tuned.params_.num_leaves_to_search}/{leaves} "
              f"reorder {tuned.params_.reorder}, held-out recall@{args.k} {recall:.4f}, QPS {qps:,.0f}, "
              f"target met on the sample: {tuning.met}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
