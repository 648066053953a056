"""KuaiSearch recall and relevance on the synthetic ``tiny`` world: each model beside its trivial baseline.

    python benchmarks/kuaisearch_baselines.py [--quick] [--json rows.json]

Recall (test sessions, whole 800-item corpus): DPR SDE and ADE against popularity (items ranked by
train click count) and BM25 on the same token ids; Recall@K and HitRate@K, K = 10, 20, 50.
Relevance (test records, label = score == 3): the cross- and the bi-encoder against the majority
class; ROC-AUC, PR-AUC, accuracy, macro-F1.

``recall_and_relevance_rows()`` returns long-format rows ``{"stage", "method", "metric", "value",
"config", "steps"}`` (baselines have ``steps`` 0 and the config they were computed under), so a table
of other stages (ranking) can be concatenated and printed with ``print_table``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from launch.config import load_config  # noqa: E402
from trainers.loop import Trainer  # noqa: E402

RECALL_METRICS = ("recall@10", "recall@20", "recall@50", "hit_rate@10", "hit_rate@20", "hit_rate@50")
RELEVANCE_METRICS = ("roc_auc", "pr_auc", "accuracy", "macro_f1")

# (stage, config, method, overrides, steps, baselines in the eval metrics)
RUNS = (
    ("recall", "configs/kuaisearch_recall.py:tiny", "dpr_sde", ("model.name=dpr_sde",), 300, ("popularity", "bm25")),
    ("recall", "configs/kuaisearch_recall.py:tiny", "dpr_ade", ("model.name=dpr_ade",), 300, ()),
    ("relevance", "configs/kuaisearch_relevance.py:tiny", "cross", ("model.name=cross",), 800, ("majority",)),
    ("relevance", "configs/kuaisearch_relevance.py:tiny", "bi", ("model.name=bi", "model.pooling=mean"), 300, ()),
)


def _train(spec: str, overrides: tuple[str, ...], steps: int, devices: int) -> dict[str, float]:
    config = load_config(str(REPO / spec.split(":")[0]) + ":" + spec.split(":")[1],
                         (*overrides, f"train.steps={steps}", f"train.log_every={max(1, steps // 5)}",
                          f"train.checkpoint_every={10 * steps}"))
    with tempfile.TemporaryDirectory() as work:
        return Trainer.create(config, work, jax.devices()[:devices]).run().eval_metrics


def recall_and_relevance_rows(quick: bool = False, devices: int = 1) -> list[dict]:
    """Trains each model of ``RUNS`` on the tiny world (``quick``: a third of the steps) and returns
    long-format rows for it and for the baselines its evaluation reports."""
    rows: list[dict] = []
    for stage, spec, method, overrides, steps, baselines in RUNS:
        steps = max(20, steps // 3) if quick else steps
        t0 = time.perf_counter()
        m = _train(spec, overrides, steps, devices)
        wall = time.perf_counter() - t0
        names = RECALL_METRICS if stage == "recall" else RELEVANCE_METRICS
        rows += [{"stage": stage, "method": method, "metric": k, "value": float(m[k]), "config": spec,
                  "steps": steps, "wall_s": round(wall, 1)} for k in names]
        for base in baselines:
            rows += [{"stage": stage, "method": base, "metric": k, "value": float(m[f"{base}/{k}"]), "config": spec,
                      "steps": 0, "wall_s": 0.0} for k in names if f"{base}/{k}" in m]
    return rows


def print_table(rows: list[dict], file=sys.stdout) -> None:
    """One block per stage: methods as rows, metrics as columns."""
    for stage in dict.fromkeys(r["stage"] for r in rows):
        sub = [r for r in rows if r["stage"] == stage]
        metrics = list(dict.fromkeys(r["metric"] for r in sub))
        methods = sorted(dict.fromkeys(r["method"] for r in sub), key=lambda m: not any(  # trained models first
            r["steps"] for r in sub if r["method"] == m))
        value = {(r["method"], r["metric"]): r["value"] for r in sub}
        steps = {r["method"]: r["steps"] for r in sub}
        head = f"| {stage} | steps | " + " | ".join(metrics) + " |"
        print(head, file=file)
        print("|" + "---|" * (len(metrics) + 2), file=file)
        for meth in methods:
            cells = [f"{value[(meth, k)]:.4f}" if (meth, k) in value else "" for k in metrics]
            print(f"| {meth} | {steps[meth] or '-'} | " + " | ".join(cells) + " |", file=file)
        print(file=file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a third of the training steps")
    parser.add_argument("--devices", type=int, default=1, help="devices of the mesh (CPU: 1 is fastest)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows here")
    args = parser.parse_args()
    rows = recall_and_relevance_rows(args.quick, args.devices)
    print(f"# KuaiSearch recall and relevance, synthetic tiny world ({jax.devices()[0].platform}, "
          f"{os.cpu_count()} CPU cores)\n")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
