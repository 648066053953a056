"""TIGER-FG's dual distillation (L_SRD + L_SDD) from a trained teacher, against a random teacher and none.

    python benchmarks/tigerfg_teacher.py --size demo --seeds 0,1,2 [--workdir runs/teacher_bench]

Per seed, real ``ecomax train`` runs (checkpoints, evaluation at the end) at ``configs/tigerfg.py:SIZE``:

1. ``teacher``: stage 1 of the two-stage recipe, ``configs/tigerfg.py:SIZE_teacher`` (see its docstring);
2. ``trained``: TIGER-FG whose frozen teacher is stage 1's image encoder (``init_from.teacher``);
3. ``random``: TIGER-FG with the default random-feature teacher;
4. ``none``: TIGER-FG without L_SRD and L_SDD.

Prints one Markdown table per seed and the mean ± standard deviation (ddof 1) over seeds of Normal and
Mosaic Recall@1/5/10, with the train seconds of each run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ARMS = {
    "trained": "TIGER-FG, trained teacher (two-stage)",
    "random": "TIGER-FG, random-feature teacher",
    "none": "TIGER-FG w/o L_SRD + L_SDD",
    "teacher": "stage 1: the teacher itself (CLIP-style, box crops)",
}
COLS = [f"{layout}/exact/recall@{k}" for layout in ("normal", "mosaic") for k in (1, 5, 10)]
HEAD = ["Normal R@1", "R@5", "R@10", "Mosaic R@1", "R@5", "R@10"]


def final_eval(workdir: pathlib.Path) -> dict[str, float] | None:
    """The run's last evaluation (``eval/`` stripped), or None when it has not finished."""
    from launch.demo import read_metrics

    if not (workdir / "metrics.jsonl").exists():
        return None
    _, last = read_metrics(workdir)
    return {k.removeprefix("eval/"): v for k, v in last.items()} or None


def overrides(arm: str, seed: int, teacher_dir: pathlib.Path) -> list[str]:
    common = [f"seed={seed}"]
    if arm == "trained":
        return common + [f"init_from.teacher.path={teacher_dir}"]
    if arm == "none":
        return common + ["loss.srd=0.", "loss.sdd=0."]
    return common


def run_seed(size: str, seed: int, root: pathlib.Path, arms: list[str]) -> dict[str, dict]:
    from launch.config import load_config
    from trainers.loop import train

    out = {}
    teacher_dir = root / f"s{seed}" / "teacher"
    for arm in ["teacher", *[a for a in arms if a != "teacher"]]:
        config_arg = f"{size}_teacher" if arm == "teacher" else size
        config = load_config(f"{REPO / 'configs/tigerfg.py'}:{config_arg}", overrides(arm, seed, teacher_dir))
        workdir = teacher_dir if arm == "teacher" else root / f"s{seed}" / arm
        print(f"== seed {seed}: {ARMS[arm]} -> {workdir}", flush=True)
        t0 = time.perf_counter()
        if final_eval(workdir) is None:  # a finished run in --workdir is read, not retrained
            train(config, workdir)
        out[arm] = {**final_eval(workdir), "seconds": time.perf_counter() - t0}
    return out


def table(rows: dict[str, dict], title: str) -> str:
    lines = [title, "", "| run | " + " | ".join(HEAD) + " | s |", "|---|" + "---|" * (len(HEAD) + 1)]
    for arm, m in rows.items():
        lines.append(f"| {ARMS[arm]} | " + " | ".join(f"{100 * m[c]:.1f}" for c in COLS) + f" | {m['seconds']:.0f} |")
    return "\n".join(lines)


def spread(per_seed: list[dict[str, dict]], arms: list[str]) -> str:
    lines = ["| run | " + " | ".join(HEAD) + " |", "|---|" + "---|" * len(HEAD)]
    for arm in arms:
        cells = []
        for c in COLS:
            vals = [100 * s[arm][c] for s in per_seed]
            sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            cells.append(f"{statistics.mean(vals):.1f} ± {sd:.1f}")
        lines.append(f"| {ARMS[arm]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="demo", choices=("tiny", "demo", "small"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--arms", default="trained,random,none,teacher")
    p.add_argument("--workdir", default=None, help="finished runs found here are read, not retrained")
    args = p.parse_args(argv)
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="tigerfg_teacher_"))
    arms = args.arms.split(",")
    t0 = time.time()
    per_seed = []
    for seed in (int(s) for s in args.seeds.split(",")):
        per_seed.append(run_seed(args.size, seed, root, arms))
        print(table({a: per_seed[-1][a] for a in arms}, f"\nseed {seed}, configs/tigerfg.py:{args.size}"), flush=True)
    from benchmarks.tigerfg_ablation import machine

    print(f"\nmean ± sd over seeds {args.seeds}, configs/tigerfg.py:{args.size}, exact search, test split, "
          f"Recall@K in %; machine: {machine()}; total {time.time() - t0:.0f}s\n")
    print(spread(per_seed, arms))


if __name__ == "__main__":
    main()
