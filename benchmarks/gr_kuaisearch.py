"""Generative retrieval on the synthetic KuaiSearch ``tiny`` world: DSI and LTRGR per SID tokenizer, beside
the popularity and BM25 rows of the same test sessions.

    python benchmarks/gr_kuaisearch.py [--tokenizers tiny,rqvae_tiny,quasid_tiny,adasid_tiny] [--dsi-steps 600]
                                       [--ltrgr-steps 300] [--ltrgr-losses pairs,all] [--seeds 0,1,2]
                                       [--json rows.json]

For each tokenizer (a ``configs/sid.py`` variant at the same codebook size, 3 x 16 + the dedup digit): item
texts -> SIDs (``ecomax gr sids``), DSI trained from scratch, LTRGR continued from the DSI run
(``init_from``); Recall@K / HitRate@K (K = 10, 20, 50) over the whole 800-item corpus, the SID table's
collision rate, and the seconds each run took. QuaSID and AdaSID train on the world's co-engaged pairs
(items co-clicked in a train session, ``ecomax sid pairs``); ``--ltrgr-steps 0`` runs DSI only. With several
``--seeds`` each seed refits the tokenizer and retrains, and a mean +- std table follows the runs (the machine and its load are printed). The DPR rows of the
same world come from ``benchmarks/kuaisearch_baselines.py``.
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

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METRICS = ("recall@10", "recall@20", "recall@50", "hit_rate@10", "hit_rate@50", "mrr")


def _run(spec: str, work: pathlib.Path, overrides: list[str]) -> tuple[dict[str, float], float]:
    import jax

    from launch.config import load_config
    from trainers.loop import Trainer

    t0 = time.perf_counter()
    config = load_config(f"{REPO / 'configs/gr.py'}:{spec}", overrides)
    result = Trainer.create(config, work, jax.devices()[:1]).run()
    return result.eval_metrics, time.perf_counter() - t0


def _tokenizer_rows(tok: str, seed: int, tmp: pathlib.Path, args, build_sids, write_session_pairs,
                    baselines: bool) -> list[dict]:
    """One tokenizer at one seed: SIDs, DSI (and LTRGR) -> table rows (+ the BM25 and popularity rows)."""
    sids = tmp / f"sids-{tok}"
    over = [f"seed={seed}"]
    if tok.startswith(("quasid", "adasid")):
        write_session_pairs(tmp / "pairs.npy", config_spec=f"{REPO / 'configs/gr.py'}:tiny")
        over.append(f"data.pairs={tmp / 'pairs.npy'}")
    sid_metrics = build_sids(f"{REPO / 'configs/gr.py'}:tiny", sids, tokenizer=f"configs/sid.py:{tok}",
                             tokenizer_overrides=over)
    common = [f"data.sid_table={sids}", "mesh.data=1", f"seed={seed}"]
    dsi, t_dsi = _run("tiny", tmp / f"dsi-{tok}", [*common, f"train.steps={args.dsi_steps}",
                                                   f"train.checkpoint_every={args.dsi_steps}"])
    runs = [("DSI", dsi, t_dsi, args.dsi_steps)]
    losses = args.ltrgr_losses.split(",") if args.ltrgr_steps else []
    for loss in losses:
        ltrgr, t_ltrgr = _run("ltrgr_tiny", tmp / f"ltrgr-{tok}-{loss}", [
            *common, f"init_from.model.path={tmp / f'dsi-{tok}'}", f"train.steps={args.ltrgr_steps}",
            f"train.checkpoint_every={args.ltrgr_steps}", f"ltrgr.loss={loss}"])
        runs.append(("LTRGR" if len(losses) == 1 else f"LTRGR ({loss})", ltrgr, t_ltrgr, args.ltrgr_steps))
    rows = [{"tokenizer": tok, "method": method, "seed": seed, "steps": steps, "seconds": round(secs, 1),
             "collision_rate": sid_metrics["collision_rate"], **{m: ev[m] for m in METRICS}}
            for method, ev, secs, steps in runs]
    if baselines:
        rows += [{"tokenizer": "-", "method": base, "seed": seed, "steps": 0, "seconds": 0.0,
                  "collision_rate": float("nan"), **{m: dsi[f"{base}/{m}"] for m in METRICS}}
                 for base in ("bm25", "popularity")]
    return rows


def main(argv: list[str] | None = None) -> int:
    from launch.gr import build_sids
    from launch.sid import write_session_pairs

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizers", default="tiny,rqvae_tiny", help="configs/sid.py variants, comma-separated")
    p.add_argument("--dsi-steps", type=int, default=600)
    p.add_argument("--ltrgr-steps", type=int, default=300)
    p.add_argument("--ltrgr-losses", default="pairs",
                   help="ltrgr.loss variants, each continued from the same DSI run: pairs (the released code), all")
    p.add_argument("--seeds", default="0", help="seeds of the tokenizer and the runs, comma-separated")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for seed in map(int, args.seeds.split(",")):
            for tok in args.tokenizers.split(","):
                rows += _tokenizer_rows(tok, seed, tmp / f"seed{seed}", args, build_sids, write_session_pairs,
                                        baselines=tok == args.tokenizers.split(",")[0])
    print("\n| tokenizer | method | seed | steps | " + " | ".join(METRICS) + " | collision rate | seconds |")
    print("|---" * (len(METRICS) + 6) + "|")
    for r in rows:
        print(f"| {r['tokenizer']} | {r['method']} | {r['seed']} | {r['steps']} | "
              + " | ".join(f"{r[m]:.3f}" for m in METRICS) + f" | {r['collision_rate']:.3f} | {r['seconds']:.0f} |")
    if len(args.seeds.split(",")) > 1:
        import numpy as np

        print("\n| tokenizer | method | " + " | ".join(METRICS) + " | collision rate |")
        print("|---" * (len(METRICS) + 3) + "|")
        for key in dict.fromkeys((r["tokenizer"], r["method"]) for r in rows):
            group = [r for r in rows if (r["tokenizer"], r["method"]) == key]
            cells = [f"{np.mean([r[m] for r in group]):.3f} ± {np.std([r[m] for r in group]):.3f}"
                     for m in (*METRICS, "collision_rate")]
            print(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
