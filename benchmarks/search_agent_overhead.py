"""The train-step cost of SD-Search and IG-Search over Search-R1's GRPO, side by side in one run, and IG-Search
with and without prefix sharing (``ig.share_prefix``).

    python benchmarks/search_agent_overhead.py [--entities 200] [--sft-steps 300] [--layers 2 --width 64]
                                               [--steps 10] [--batch 4] [--repeats 2] [--out runs/bench_agent_cost]

One world and warm start as ``benchmarks/search_agent.py``; then each variant for ``--steps`` GRPO steps from
it, the variants interleaved ``--repeats`` times so that load drifts touch them alike. Per variant: the mean
step time past the two compiling steps, its ratio to GRPO's, and the first step's logged metrics (the same
seed samples the same rollouts, so IG-Search's first ``ig_mean`` with and without prefix sharing must agree:
printed side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.search_agent import agent_config, policy_size, run_or_exit, step_time  # noqa: E402

VARIANTS = {"Search-R1 (GRPO)": ("tiny",), "SD-Search": ("sd_tiny",),
            "IG-Search, shared prefix": ("ig_tiny", "ig.share_prefix=True"),
            "IG-Search, full contexts": ("ig_tiny", "ig.share_prefix=False")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entities", type=int, default=200)
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4, help="questions per step (x agent.group rollouts)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="runs/bench_agent_cost")
    args = p.parse_args()

    from data_pipelines.agents.synthetic import write_world
    from trainers.evaluators.passage_retriever import build_passage_index
    from trainers.loop import train

    out = pathlib.Path(args.out)
    write_world(out / "world", seed=0, entities=args.entities, questions=args.entities)
    build_passage_index(out / "world" / "corpus.jsonl", out / "index", "bm25", progress=False)
    size = policy_size(args.layers, args.width)
    print(f"# machine: {platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}", flush=True)
    if not (out / "sft" / "metrics.jsonl").exists():
        run_or_exit(train, agent_config("sft_tiny", out, f"train.steps={args.sft_steps}", "train.eval_every=0",
                            "eval.questions=8", *size), out / "sft", fresh=False)
    times = {name: [] for name in VARIANTS}
    first = {}
    for repeat in range(args.repeats):
        for name, (spec, *sets) in VARIANTS.items():
            workdir = out / f"{spec}_{'_'.join(sets) or 'default'}_r{repeat}"
            run_or_exit(train, agent_config(spec, out, f"train.steps={args.steps}", f"train.batch_size={args.batch}",
                                "eval.questions=8", f"init_from.policy.path={out / 'sft'}",
                                *sets, *size), workdir)
            times[name].append(step_time(workdir))
            first[name] = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
            print(f"{name} repeat {repeat}: {times[name][-1]:.3f} s/step, load {os.getloadavg()[0]:.2f}", flush=True)
    base = sum(times["Search-R1 (GRPO)"]) / args.repeats
    print("\n| variant | s / step (repeats) | × GRPO | first step: searches, ig_mean / jsd |\n|---|---|---|---|")
    for name, ts in times.items():
        mean = sum(ts) / len(ts)
        extra = first[name].get("ig_mean", first[name].get("jsd", ""))
        print(f"| {name} | {mean:.3f} ({', '.join(f'{t:.3f}' for t in ts)}) | {mean / base:.2f}× | "
              f"{first[name]['searches']:.3f}, {extra} |")
    print(f"# load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
