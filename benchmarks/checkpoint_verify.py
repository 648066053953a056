"""What verifying a checkpoint's integrity record costs, against the restore it guards.

    python benchmarks/checkpoint_verify.py [--config configs/tigerfg.py:small] [--repeats 5]

Trains the config for two steps (``train.stop_after=2``: one checkpoint, no final evaluation), then, side
by side in one process and interleaved over ``--repeats``:
  * restore: ``Checkpointer.restore(step, verify=False)``, the whole train state onto the config's mesh;
  * restore + verify: the same with the sha256 check of every file against the record first;
  * record: ``write_record`` (what the saver thread adds after each save, off the training thread).
The files are in the page cache after the first repeat for all three (a cold read costs both the same
extra). Prints the medians, the checkpoint's size and verification / restore.
"""

from __future__ import annotations

import argparse
import os
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
from trainers.checkpoints import Checkpointer, checkpoint_files, write_record  # noqa: E402
from trainers.loop import Trainer, train  # noqa: E402
from trainers.state import abstract_state  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/tigerfg.py:small"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = load_config(args.config, ["train.stop_after=2", "train.checkpoint_every=2", "train.log_every=1",
                                       "train.eval_every=0"])
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp)
        train(config, workdir)
        trainer = Trainer.create(config, workdir)
        tx, _ = trainer.optimizer()
        target = abstract_state(trainer.spec, tx, trainer.shardings(tx))
        ckpt = Checkpointer(workdir / "checkpoints", use_async=False)
        step = ckpt.steps()[-1]
        step_dir = ckpt.step_dir(step)
        files = checkpoint_files(step_dir)
        size = sum((step_dir / f).stat().st_size for f in files)
        plain, verified, verify_only, record = [], [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(ckpt.restore(step, target, verify=False)[0])
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            jax.block_until_ready(ckpt.restore(step, target)[0])
            verified.append(time.perf_counter() - t0)
            verify_only.append(ckpt.last_restore["seconds"])
            t0 = time.perf_counter()
            write_record(step_dir, step)
            record.append(time.perf_counter() - t0)
        ckpt.close()
    med = statistics.median
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load:.1f}, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s); config {args.config}; checkpoint step {step}: "
          f"{len(files)} files, {size / 2**20:.1f} MiB")
    print("| measure (median of %d) | seconds |\n|---|---|" % args.repeats)
    print(f"| restore, unverified | {med(plain):.3f} |")
    print(f"| restore + verify | {med(verified):.3f} |")
    print(f"| of which verify (sha256 of every file) | {med(verify_only):.3f} "
          f"({size / 2**20 / max(med(verify_only), 1e-9):.0f} MiB/s) |")
    print(f"| verify / unverified restore | {med(verify_only) / med(plain):.3f} |")
    print(f"| write the record after a save (saver thread) | {med(record):.3f} |")


if __name__ == "__main__":
    main()
