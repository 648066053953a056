"""``ecomax bench --pipeline-only``: a config's input pipeline alone, at the config's shapes, without the step.

    ecomax bench --config configs/tigerfg.py:base --pipeline-only [--set data.num_items=300]
                 [--workers 0,1,2] [--batches 3] [--mfu 0.5] [--hosts "8xH100 SXM,8xTPU v5e"] [--json OUT]

Three measurements, one table (and ``--json``):

* **per stage**, one core: ``Trainer.data()``'s source and per-example transform run in this process on
  ``--examples`` records: read (``source[i]``: ArrayRecord read + parse), then the stages the transform
  marks on its ``StageClock`` (ECom-RF-IMMR: decode, crop_resize, augment, tokenise, negative_text; the rest
  of the transform is "other"), and collate (stacking a batch of the size the scaling runs use, best of 3),
  in ms per example;
* **scaling**: examples/s of the real ``Trainer.data()`` (grain, this process's slice of every global batch)
  with ``data.worker_count`` = each of ``--workers`` (0: reader threads in this process), over ``--batches``
  batches of min(global batch, 256) examples after the prefetch buffer's worth (a global batch of 4096
  224-px examples is 1.2 GB of uint8: sixteen of them buffered would not fit this host; the rate per
  example does not depend on the batch beyond collation);
* **cores needed** (an estimate): an accelerator host of ``n`` chips at ``--mfu`` consumes
  ``n x peak x mfu / FLOPs per example`` examples/s (analytic FLOPs of the config's model,
  ``Task.forward_flops``, forward x 3 and frozen parts x 1; peaks from ``trainers.flops.PEAK_FLOPS``);
  keeping data-wait under 5% needs the pipeline to make 95% of that, so cores = 0.95 x consumption /
  (measured examples/s per core at the largest worker count).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import time
from typing import Any

import numpy as np

from launch.bench import BenchError

DEFAULT_HOSTS = "8xH100 SXM,8xTPU v5e"
KEEP = 16  # transformed examples kept for the collate measurement (repeated to a batch)


def _clocked(transform: Any):
    """The object whose ``clock`` the transform's stages mark (the base of a wrapping transform), or None."""
    for t in (transform, getattr(transform, "base", None)):
        if t is not None and hasattr(t, "clock"):
            return t
    return None


def stage_times(source: Any, transform: Any, examples: int, batch_size: int, seed: int = 0) -> dict[str, float]:
    """Milliseconds per example of each stage on one core (see the module docstring)."""
    from data_pipelines.loader import StageClock

    n = min(examples, len(source))
    read = time.perf_counter()
    records = [source[i] for i in range(n)]
    ms = {"read": (time.perf_counter() - read) / n * 1e3}
    outputs = records
    if transform is not None:
        owner = _clocked(transform)
        clock = StageClock()
        previous = owner.clock if owner is not None else None
        if owner is not None:
            owner.clock = clock
        apply = getattr(transform, "random_map", None) or transform
        for r in records[:2]:  # warm caches the stages keep (tokeniser, decoders) outside the count
            apply(r, np.random.default_rng(seed))
        clock.seconds.clear()
        t0 = time.perf_counter()
        outputs = []
        for i, r in enumerate(records):  # keep a few: holding every output would time page faults, not work
            out = apply(r, np.random.default_rng((seed, i)))
            if len(outputs) < KEEP:
                outputs.append(out)
        total = (time.perf_counter() - t0) / n * 1e3
        if owner is not None:
            owner.clock = previous
        marked = {k: v / n * 1e3 for k, v in clock.seconds.items()}
        ms.update(marked)
        ms["other"] = max(total - sum(marked.values()), 0.0)
    reps = -(-batch_size // len(outputs))
    batch = (outputs * reps)[:batch_size]
    seconds = []
    for _ in range(3):  # best of 3: a running pipeline stacks into memory its allocator already holds
        t0 = time.perf_counter()
        {k: np.stack([np.asarray(e[k]) for e in batch]) for k in batch[0]}
        seconds.append(time.perf_counter() - t0)
    ms["collate"] = min(seconds) / batch_size * 1e3
    ms["total"] = sum(ms.values())
    return ms


def scaling(config: Any, workers: list[int], batches: int, batch_size: int) -> list[dict[str, float]]:
    """Examples/s of ``Trainer.data()`` at ``batch_size`` for each ``data.worker_count`` in ``workers``, over
    ``batches`` batches after ``data.prefetch + 2`` (the prefetch buffer filled during start-up would
    otherwise be counted as speed)."""
    from launch.bench import pipeline_throughput
    from trainers.loop import Trainer

    rows = []
    for w in workers:
        c = config.copy_and_resolve_references()
        with c.unlocked():
            c.data.worker_count = w
            c.train.batch_size = batch_size
        trainer = Trainer.create(c, pathlib.Path(tempfile.gettempdir()) / "ecomax-bench-unused")
        got = pipeline_throughput(trainer, batches, warmup=int(c.data.get("prefetch", 16)) + 2)
        procs = max(w, 1)
        rows.append({"worker_count": w, "examples_per_s": got["examples_per_s"],
                     "examples_per_s_per_core": got["examples_per_s"] / procs, "seconds": got["seconds"]})
        print(f"  workers {w}: {got['examples_per_s']:.1f} examples/s", flush=True)
    return rows


def parse_hosts(text: str) -> list[tuple[int, str]]:
    """``"8xH100 SXM,8xTPU v5e"`` -> ``[(8, "H100 SXM"), (8, "TPU v5e")]``."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        count, _, kind = part.partition("x")
        if not count.isdigit() or not kind:
            raise BenchError(f"--hosts {part!r}: expected CHIPSxKIND, e.g. 8xH100 SXM")
        out.append((int(count), kind.strip()))
    return out


def cores_needed(flops_per_example: float | None, per_core: float, hosts: list[tuple[int, str]],
                 mfu: float) -> list[dict[str, Any]]:
    """Per accelerator host: examples/s it consumes at ``mfu`` and the host cores that keep data-wait < 5%."""
    from trainers import flops

    rows = []
    for chips, kind in hosts:
        found = flops.peak_flops(kind)
        if found is None or not flops_per_example:
            rows.append({"host": f"{chips}x{kind}", "estimate": None,
                         "why": "no peak for this kind" if found is None else "no FLOPs for this task"})
            continue
        peak, label = found
        consumed = chips * peak * mfu / flops_per_example
        rows.append({"host": f"{chips}x{label}", "peak_per_chip": peak, "mfu": mfu,
                     "examples_per_s_consumed": consumed,
                     "host_cores_needed": 0.95 * consumed / per_core if per_core > 0 else None,
                     "estimate": True})
    return rows


def pipeline_report(config: Any, *, workers: list[int] | None = None, batches: int = 20, scaling_batch: int = 256,
                    examples: int = 200, mfu: float = 0.5, hosts: str = DEFAULT_HOSTS) -> dict[str, Any]:
    """The three measurements of the module docstring, as a dict."""
    from trainers import flops
    from trainers.loop import Trainer

    cores = len(os.sched_getaffinity(0))
    accelerators = parse_hosts(hosts)
    trainer = Trainer.create(config, pathlib.Path(tempfile.gettempdir()) / "ecomax-bench-unused")
    found = trainer.task.train_source()
    if found is None:
        raise BenchError(f"task {config.task!r} has no training source: nothing to benchmark")
    source, transform = found
    batch = int(config.train.batch_size)
    print(f"per-stage times on one core ({min(examples, len(source))} examples) ...", flush=True)
    small = min(batch, scaling_batch)
    stages = stage_times(source, transform, examples, small, seed=int(config.seed))
    workers = sorted(set(workers if workers is not None else range(cores + 1)))
    print(f"scaling over worker processes {workers} ({batches} batches of {small} each) ...", flush=True)
    scale = scaling(config, workers, batches, small)
    forward = trainer.task.forward_flops(batch)
    per_example = flops.train_flops(forward) / batch if forward is not None else None
    best = max(scale, key=lambda r: r["worker_count"])
    return {
        "task": config.task, "global_batch": batch, "scaling_batch": small, "host_cores": cores, "records": len(source),
        "data": {k: config.data[k] for k in ("image_size", "photometric", "synth_image_format", "num_items")
                 if k in config.data},
        "stage_ms_per_example": stages,
        "single_core_examples_per_s": 1e3 / stages["total"],
        "scaling": scale,
        "train_flops_per_example": per_example,
        "cores_needed": cores_needed(per_example, best["examples_per_s_per_core"], accelerators, mfu),
        "per_core_rate_used": {"worker_count": best["worker_count"],
                               "examples_per_s_per_core": best["examples_per_s_per_core"]},
    }


def format_table(r: dict[str, Any]) -> str:
    lines = ["ecomax bench --pipeline-only", "-" * 28,
             f"task {r['task']}, global batch {r['global_batch']}, {r['records']} records, "
             f"{r['host_cores']} host cores, data {r['data']}", "", "stage (one core)      ms / example"]
    lines += [f"  {k:<18} {v:10.3f}" for k, v in r["stage_ms_per_example"].items()]
    lines.append(f"  -> {r['single_core_examples_per_s']:.0f} examples/s per core")
    lines += ["", f"worker processes   examples/s   per core   (batches of {r['scaling_batch']})"]
    lines += [f"  {s['worker_count']:<16} {s['examples_per_s']:10.1f} {s['examples_per_s_per_core']:10.1f}"
              for s in r["scaling"]]
    if r["train_flops_per_example"]:
        lines += ["", f"train FLOPs / example (analytic) {r['train_flops_per_example'] / 1e9:.1f} GFLOP"]
    lines.append("host cores to keep data-wait < 5% (ESTIMATE, from the per-core rate above):")
    for c in r["cores_needed"]:
        if c.get("estimate"):
            lines.append(f"  {c['host']:<22} consumes {c['examples_per_s_consumed']:9.0f} ex/s at "
                         f"{100 * c['mfu']:.0f}% MFU -> {c['host_cores_needed']:6.0f} cores")
        else:
            lines.append(f"  {c['host']:<22} n/a ({c['why']})")
    return "\n".join(lines)
