"""What the training loop costs on top of the jitted step, and what a checkpoint save blocks it for.

    python benchmarks/loop_overhead.py [--config configs/two_tower.py:tiny] [--steps 400] [--repeats 3]

Per repeat, side by side in one process:
  * bare: the compiled step called back to back on one device-resident batch (the floor);
  * loop: ``Trainer.run`` for the same number of steps (data pipeline, host->device transfer, progress
    bar, metrics, background checkpoints), timed over its steady-state log interval;
  * save: the time each ``Checkpointer.save`` call blocks the loop (on-device copy + hand-off).
Prints the medians, the loop/bare ratio and save-blocking / step time.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import jax

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch.config import load_config  # noqa: E402
from trainers import checkpoints  # noqa: E402
from trainers.loop import Trainer  # noqa: E402
from trainers.state import init_state  # noqa: E402


def bare_step_time(config, steps: int) -> float:
    trainer = Trainer.create(config, "/nonexistent")
    step = trainer.compiled_step()
    step_fn, tx, shardings = step.fn, step.tx, step.shardings
    state = init_state(trainer.task.build_model, config.seed, tx, shardings)
    batch = trainer.global_batch(next(iter(trainer.data())), trainer.batch_shardings())
    for _ in range(10):  # compile and warm up
        state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - start) / steps


def loop_step_time(config, steps: int, save_times: list[float]) -> float:
    """Median-free: the loop's own ``step_time`` over its second log interval (the first holds compile)."""
    original = checkpoints.Checkpointer.save

    def timed_save(self, *args, **kwargs):
        start = time.perf_counter()
        original(self, *args, **kwargs)
        save_times.append(time.perf_counter() - start)

    checkpoints.Checkpointer.save = timed_save
    try:
        with tempfile.TemporaryDirectory() as workdir:
            Trainer.create(config, workdir).run()
            records = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    finally:
        checkpoints.Checkpointer.save = original
    timed = [r["step_time"] for r in records if "step_time" in r]
    return timed[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/two_tower.py:tiny"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    half = args.steps // 2
    config = load_config(args.config, [f"train.steps={2 * half}", f"train.log_every={half}",
                                       f"train.checkpoint_every={half // 2}", "train.eval_every=0"])
    bare, loop, saves = [], [], []
    for _ in range(args.repeats):
        loop.append(loop_step_time(config, 2 * half, saves))
        bare.append(bare_step_time(config, half))
    bare_s, loop_s = statistics.median(bare), statistics.median(loop)
    save_s = statistics.median(saves)
    print(f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s), config {args.config}, batch {config.train.batch_size}")
    print("| measure | value |\n|---|---|")
    print(f"| bare jitted step (median of {args.repeats}) | {bare_s * 1e3:.2f} ms |")
    print(f"| step inside the loop | {loop_s * 1e3:.2f} ms |")
    print(f"| loop / bare | {loop_s / bare_s:.3f} (overhead {100 * (loop_s / bare_s - 1):+.1f}%) |")
    print(f"| checkpoint save blocks the loop (median of {len(saves)}) | {save_s * 1e3:.2f} ms "
          f"= {100 * save_s / bare_s:.1f}% of a step |")


if __name__ == "__main__":
    main()
