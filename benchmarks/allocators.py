"""glibc malloc against the retaining allocators, side by side: `ecomax bench` on a config and the ViT step.

    .venv/bin/python benchmarks/allocators.py [--config configs/two_tower.py:demo] [--steps 20] [--rounds 2]
        [--vit-steps 3] [--allocators system,mimalloc,jemalloc,tcmalloc] [--json OUT]

Each measurement is its own process, started with ``ECOMAX_ALLOCATOR=NAME`` (launch/allocator.py), so
each runs exactly as a user's ``ecomax`` would under that allocator. Rounds are interleaved (every
allocator once per round, in turn) so that load from other processes hits all alike; ``uptime`` is
recorded before every run. Allocators whose library is not installed are left out (say which).

* ``ecomax bench --config C --steps N``: the median step time and examples/s from its JSON.
* ``benchmarks/vit_vs_torch.py --steps V --warmup 1 --allocator NAME`` (``--vit-steps 0`` skips it):
  JAX and torch s/step, both under that allocator.

Prints a table with each allocator's speed relative to glibc malloc (``system``) in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from launch import allocator as alloc  # noqa: E402


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def _env(name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (alloc.ENV_ACTIVE, alloc.ENV_EXEC, "LD_PRELOAD")}
    env[alloc.ENV_SWITCH] = name
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("XLA_FLAGS", None)
    return env


def _run(cmd: list[str], name: str, out: pathlib.Path) -> dict:
    load = uptime()
    done = subprocess.run(cmd, env=_env(name), cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} under {name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    report = json.loads(out.read_text())
    report["uptime_before"] = load
    return report


def bench_config(name: str, config: str, steps: int, tmp: pathlib.Path) -> dict:
    out = tmp / f"bench-{name}.json"
    r = _run([sys.executable, "-m", "launch.cli", "bench", "--config", config, "--steps", str(steps), "--json",
              str(out)], name, out)
    return {"step_median_s": r["step_time_s"]["median"], "examples_per_s": r["examples_per_s"],
            "allocator": r["allocator"], "uptime_before": r["uptime_before"]}


def bench_vit(name: str, steps: int, tmp: pathlib.Path) -> dict:
    out = tmp / f"vit-{name}.json"
    r = _run([sys.executable, str(REPO / "benchmarks" / "vit_vs_torch.py"), "--steps", str(steps), "--warmup", "1",
              "--allocator", name, "--json", str(out)], name, out)
    return {"jax_s": r["median_s"]["jax"], "torch_s": r["median_s"]["torch"], "ratio": r["ratio"],
            "allocator": r["allocator"], "uptime_before": r["uptime_before"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/two_tower.py:demo")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--vit-steps", type=int, default=3, help="0: skip the ViT step")
    p.add_argument("--allocators", default="system,mimalloc,jemalloc,tcmalloc")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    names = []
    for name in args.allocators.split(","):
        if name != alloc.SYSTEM and alloc.find(name) is None:
            print(f"{name}: not installed here, left out", flush=True)
        else:
            names.append(name)
    print(f"machine: {os.cpu_count()} CPUs; {uptime()}", flush=True)
    results: dict = {"config": args.config, "steps": args.steps, "allocators": names, "start": uptime(),
                     "bench": {n: [] for n in names}, "vit": {n: [] for n in names}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for r in range(args.rounds):
            for name in names:
                res = bench_config(name, args.config, args.steps, tmp)
                results["bench"][name].append(res)
                print(f"round {r} bench {name:9s} {res['step_median_s'] * 1e3:8.2f} ms/step "
                      f"{res['examples_per_s']:9.1f} ex/s  [{res['uptime_before']}]", flush=True)
        if args.vit_steps:
            for name in names:
                res = bench_vit(name, args.vit_steps, tmp)
                results["vit"][name].append(res)
                print(f"vit {name:9s} JAX {res['jax_s']:6.2f} s/step torch {res['torch_s']:6.2f} s/step "
                      f"ratio {res['ratio']:.3f}  [{res['uptime_before']}]", flush=True)
    results["end"] = uptime()

    base = statistics.median(x["step_median_s"] for x in results["bench"][names[0]])
    print(f"\n{args.config}, median over {args.rounds} rounds of each run's median step ({args.steps} steps); "
          f"speed relative to {names[0]}:")
    for name in names:
        med = statistics.median(x["step_median_s"] for x in results["bench"][name])
        print(f"  {name:9s} {med * 1e3:8.2f} ms/step  x{base / med:.3f}")
    if args.vit_steps:
        vbase = results["vit"][names[0]][0]["jax_s"]
        print(f"ViT-B/16 step (median of {args.vit_steps}); JAX speed relative to {names[0]}:")
        for name in names:
            v = results["vit"][name][0]
            print(f"  {name:9s} JAX {v['jax_s']:6.2f} s  torch {v['torch_s']:6.2f} s  JAX/torch {v['ratio']:.3f}  "
                  f"JAX x{vbase / v['jax_s']:.3f}")
    print(f"end: {results['end']}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
