"""Search agents on the synthetic multi-hop world: the warm-started policy, then Search-R1's GRPO,
SD-Search and IG-Search from it, at equal steps and seeds.

    python benchmarks/search_agent.py [--entities 200] [--questions 200] [--sft-steps 300] [--sft-stop-after N]
                                      [--sft-target-em E --sft-check-every 60 --select-questions 300]
                                      [--layers 2 --width 64] [--rl-steps 50] [--rl-batch 4] [--rl-lr 3e-4]
                                      [--seeds 0,1,2] [--methods tiny,sd_tiny,ig_tiny] [--out runs/bench_agent]
                                      [--json rows.json]

One world (``ecomax agents synth``, seed 0) and its BM25 index; one supervised warm start
(``configs/search_agent.py:sft_tiny``); then each method for ``--rl-steps`` GRPO steps per seed from that
warm start. With ``--sft-target-em`` the warm start stops at the first checkpoint from ``--sft-stop-after`` on
(every ``--sft-check-every`` steps) whose greedy EM on ``--select-questions`` held-out test questions (those
after the reported ones) reaches it: the warm start's step sits on a phase change whose timing moves with the
CPU's last bits, its quality does not. Every row is the greedy policy on the test questions: EM, F1, searches
per question and the fraction of well-formed rollouts, with the mean train step time (the SD-Search overhead
is their ratio, measured in the same run; so is IG-Search's). Mean and spread over seeds; machine and load
printed. Every run but the warm start starts afresh (a finished one would resume with nothing to do).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NAMES = {"tiny": "Search-R1 (GRPO)", "sd_tiny": "SD-Search (GRPO + hindsight JSD)",
         "ig_tiny": "IG-Search (GRPO + information-gain advantages)"}
SHOWN = ("em", "em_hop1", "em_hop2", "em_hop3", "searches", "format")


def agent_config(spec: str, world: pathlib.Path, *overrides: str):
    from launch.config import load_config

    return load_config(f"{REPO / 'configs/search_agent.py'}:{spec}",
                       (f"data.world={world / 'world'}", f"data.index={world / 'index'}", *overrides))


def step_time(workdir: pathlib.Path) -> float:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time"] for r in rows if "step_time" in r][2:]   # past the compiling steps
    return sum(times) / max(len(times), 1)


def policy_size(layers: int, width: int) -> tuple[str, ...]:
    """Overrides for a ``layers`` x ``width`` policy (heads of 32 from width 128 up, MLP 4x; none for tiny's)."""
    if (layers, width) == (2, 64):
        return ()
    head = max(16, width // 4)
    return (f"model.layers={layers}", f"model.embed={width}", f"model.mlp={4 * width}", f"model.head_dim={head}",
            f"model.heads={width // head}")


def run_or_exit(train, config, workdir: pathlib.Path, *, fresh: bool = True):
    """``train`` from scratch in ``workdir`` (``fresh``; else resuming it), stopping the whole benchmark when a
    run is interrupted (SIGTERM / SIGINT save and stop it). A finished run would resume with nothing to do and
    no evaluation: the warm start alone is resumed."""
    if fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    result = train(config, workdir)
    if result.status == "interrupted":
        sys.exit(f"interrupted in {workdir} at step {result.step}")
    return result


def record(rows: list[dict], path: str) -> None:
    """Prints the newest row and rewrites ``path`` (if given) with all of them, so a cut run keeps its rows."""
    print(json.dumps(rows[-1]), flush=True)
    if path:
        pathlib.Path(path).write_text(json.dumps(rows, indent=1))


def warm_start_metrics(out: pathlib.Path, size: tuple[str, ...], workdir: pathlib.Path, *evals: str) -> dict:
    """The warm start's eval metrics as the RL task computes them: one step at learning rate 0 from it."""
    from trainers.loop import train

    return run_or_exit(train, agent_config("tiny", out, "train.steps=1", "optimizer.learning_rate=0.0",
                                           f"init_from.policy.path={out / 'sft'}", *evals, *size), workdir).eval_metrics


def warm_start(args, out: pathlib.Path, size: tuple[str, ...], evals: str) -> int:
    """Trains ``out/sft`` (resuming it) to ``--sft-stop-after`` or, with ``--sft-target-em``, on to the first
    checked step whose held-out EM reaches the target; -> the step it stopped at."""
    from data_pipelines.agents.qa import read_qa
    from trainers.loop import train

    stop = args.sft_stop_after or (args.sft_check_every if args.sft_target_em else args.sft_steps)
    if args.sft_target_em:
        held_out = len(read_qa(out / "world" / "test.jsonl")) - args.eval_questions
        if not args.eval_questions or held_out < args.select_questions:
            sys.exit(f"--sft-target-em needs --eval-questions > 0 and {args.select_questions} test questions after "
                     f"them; the split holds {held_out + args.eval_questions}")
    while True:
        run_or_exit(train, agent_config("sft_tiny", out, f"train.steps={args.sft_steps}", "train.eval_every=0", evals,
                                        *size, f"train.stop_after={stop}"), out / "sft", fresh=False)
        if not args.sft_target_em:
            return stop
        em = warm_start_metrics(out, size, out / f"select_{stop}", f"eval.questions={args.select_questions}",
                                f"eval.offset={args.eval_questions}")["em"]
        print(f"# warm start at step {stop}: held-out EM {em:.3f}", flush=True)
        if em >= args.sft_target_em or stop >= args.sft_steps:
            return stop
        stop = min(stop + args.sft_check_every, args.sft_steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entities", type=int, default=200)
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--sft-stop-after", type=int, default=0,
                   help="stop the warm start here (its cosine schedule still spans --sft-steps)")
    p.add_argument("--sft-target-em", type=float, default=0.0,
                   help="stop the warm start at the first checkpoint whose held-out EM reaches this (0: off)")
    p.add_argument("--sft-check-every", type=int, default=60, help="steps between the held-out checks")
    p.add_argument("--select-questions", type=int, default=300,
                   help="held-out test questions for the checks (after the --eval-questions reported ones)")
    p.add_argument("--layers", type=int, default=2, help="policy layers (configs/search_agent.py:tiny has 2)")
    p.add_argument("--width", type=int, default=64, help="policy width; heads of 32 from 128 up, MLP 4x")
    p.add_argument("--rl-steps", type=int, default=50)
    p.add_argument("--rl-lr", type=float, default=3e-4)
    p.add_argument("--rl-batch", type=int, default=4, help="questions per GRPO step (x agent.group rollouts)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="tiny,sd_tiny,ig_tiny")
    p.add_argument("--eval-questions", type=int, default=100, help="test questions evaluated (0: all)")
    p.add_argument("--out", default="runs/bench_agent")
    p.add_argument("--json", default="")
    args = p.parse_args()

    from data_pipelines.agents.synthetic import write_world
    from trainers.evaluators.passage_retriever import build_passage_index
    from trainers.loop import train

    out = pathlib.Path(args.out)
    summary = write_world(out / "world", seed=0, entities=args.entities, questions=args.questions)
    build_passage_index(out / "world" / "corpus.jsonl", out / "index", "bm25", progress=False)
    print(f"# machine: {platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; world "
          f"{summary['entities']} entities, questions {summary['questions']}", flush=True)
    evals = f"eval.questions={args.eval_questions}"
    size = policy_size(args.layers, args.width)
    t0 = time.time()
    warm = f"init_from.policy.path={out / 'sft'}"
    stop = warm_start(args, out, size, evals)
    start = warm_start_metrics(out, size, out / "warm_start_eval", evals)
    rows = [{"method": "warm start (SFT on oracle rollouts)", "seed": 0, "sft_step": stop, **start,
             "step_s": step_time(out / "sft"), "wall_s": time.time() - t0}]
    record(rows, args.json)
    for seed in map(int, args.seeds.split(",")):     # seed-major: an interrupted benchmark leaves whole seeds
        for method in args.methods.split(","):
            t0 = time.time()
            workdir = out / f"{method}_seed{seed}"
            r = run_or_exit(train, agent_config(method, out, f"seed={seed}", f"train.steps={args.rl_steps}", evals,
                                                f"train.batch_size={args.rl_batch}", "train.log_every=5",
                                                f"optimizer.learning_rate={args.rl_lr}", warm, *size), workdir)
            rows.append({"method": NAMES[method], "seed": seed, **r.eval_metrics, "step_s": step_time(workdir),
                         "wall_s": time.time() - t0})
            record(rows, args.json)
    print(f"\n| method | seeds | {' | '.join(SHOWN)} | train step (s) |\n|---|---|{'---|' * len(SHOWN)}---|")
    import numpy as np

    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        values = {k: [r.get(k, np.nan) for r in mine] for k in SHOWN}
        cells = [f"{np.mean(v):.3f} ± {np.std(v):.3f}" for v in values.values()]
        print(f"| {name} | {len(mine)} | {' | '.join(cells)} | {np.mean([r['step_s'] for r in mine]):.2f} |")
    print(f"# load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
