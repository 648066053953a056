"""KuaiSearch ranking baselines: DNN, Wide&Deep, DCN, DCNv2 and DIN against the constant predictor.

    python benchmarks/kuaisearch_rank_baselines.py [--config tiny] [--models dnn,din] [--set key=value ...]

Trains every model on the same data at the same seed (``configs/kuaisearch_rank.py``, default ``tiny``:
the synthetic world, on CPU) and prints a Markdown table of test Logloss and ROC-AUC beside the constant
predictor (the train positive rate; AUC 0.5). ``ranking_rows()`` returns the rows as dicts so that a
caller can merge them with the recall and relevance stages into one table.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import tempfile
import time
from collections.abc import Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODELS = ("dnn", "wide_deep", "dcn", "dcnv2", "din")
LABELS = {"dnn": "DNN", "wide_deep": "Wide&Deep", "dcn": "DCN", "dcnv2": "DCNv2", "din": "DIN"}


def ranking_rows(config: str = "tiny", models: Sequence[str] = MODELS, overrides: Sequence[str] = (),
                 seed: int = 0) -> list[dict]:
    """Train and evaluate each model; one dict per model (and one for the constant predictor first):
    ``stage, dataset, model, logloss, roc_auc, constant_logloss, constant_roc_auc, logloss_gain,
    auc_gain, num_test, train_seconds``."""
    import jax  # noqa: PLC0415

    from launch.config import load_config  # noqa: PLC0415
    from trainers.loop import Trainer  # noqa: PLC0415

    rows: list[dict] = []
    for name in models:
        cfg = load_config(f"{REPO / 'configs' / 'kuaisearch_rank.py'}:{config}",
                          [f"model.name={name}", f"seed={seed}", *overrides])
        with tempfile.TemporaryDirectory() as work:
            trainer = Trainer.create(cfg, work)
            trainer.task.train_source()  # build / load the data outside the timed part
            t0 = time.perf_counter()
            result = trainer.run()
            seconds = time.perf_counter() - t0
        ev = result.eval_metrics
        dataset = "KuaiSearch-synthetic" if not cfg.data.root else "KuaiSearch-Lite"
        if not rows:
            rows.append({"stage": "rank", "dataset": dataset, "model": "constant (train positive rate)",
                         "logloss": ev["constant/logloss"], "roc_auc": ev["constant/roc_auc"],
                         "constant_logloss": ev["constant/logloss"], "constant_roc_auc": 0.5,
                         "logloss_gain": 0.0, "auc_gain": 0.0, "num_test": int(ev["num_examples"]),
                         "train_seconds": 0.0})
        rows.append({"stage": "rank", "dataset": dataset, "model": LABELS.get(name, name),
                     "logloss": ev["logloss"], "roc_auc": ev["roc_auc"],
                     "constant_logloss": ev["constant/logloss"], "constant_roc_auc": ev["constant/roc_auc"],
                     "logloss_gain": ev["constant/logloss"] - ev["logloss"], "auc_gain": ev["roc_auc"] - 0.5,
                     "num_test": int(ev["num_examples"]), "train_seconds": seconds,
                     "device": jax.devices()[0].platform})
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| model | logloss | ROC-AUC | vs constant (Δlogloss, ΔAUC) |", "|---|---|---|---|"]
    for r in rows:
        vs = "—" if r["model"].startswith("constant") else f"{-r['logloss_gain']:+.4f}, {r['auc_gain']:+.4f}"
        lines.append(f"| {r['model']} | {r['logloss']:.4f} | {r['roc_auc']:.4f} | {vs} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", help="variant of configs/kuaisearch_rank.py")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = p.parse_args(argv)
    rows = ranking_rows(args.config, args.models.split(","), args.set, args.seed)
    print(f"KuaiSearch ranking, config {args.config}, seed {args.seed}, test rows {rows[0]['num_test']}; "
          f"{platform.machine()} {platform.processor() or ''} {rows[-1].get('device', '')}".strip())
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
