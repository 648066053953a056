"""``ecomax bench``: how fast a config trains here, and whether it fits on a mesh before a launch.

    ecomax bench --config configs/two_tower.py:tiny [--set k=v ...] [--steps 20] [--warmup 3] [--json OUT]
    ecomax bench --config configs/two_tower.py:base --aot --mesh data=2,fsdp=4,tensor=1 [--memory-limit-gib 95]
    ecomax bench --config configs/tigerfg.py:base --pipeline-only [--workers 0,1,2]   (launch/pipeline_bench.py)

A run compiles the train step once (``Trainer.lower().compile()``, timed), initialises the state,
then runs ``--warmup`` untimed and ``--steps`` timed steps, blocking on each step's results. It
reports (table on stdout, the same numbers as JSON with ``--json``):

* ``compile_s``; step time median / p10 / p90 (one step = fetch the batch + host->device + the step);
  examples/s, global and per device;
* model FLOPs per step from the analytic count of ``trainers/flops.py`` (matmuls only, forward x 3)
  beside XLA's own ``cost_analysis()["flops"]``, achieved FLOP/s and MFU: against the dense bf16 peak
  of the device kind (``trainers.flops.PEAK_FLOPS``) times the number of devices, or on CPU against
  a *measured CPU matmul peak* of the host (fake CPU devices share the host's cores, so the host's
  peak is the denominator, not per device); no MFU for an unknown accelerator;
* device memory per device from ``compiled.memory_analysis()`` (arguments + outputs - aliased
  (donated) + temporaries), and the device's limit where the backend reports one;
* the input pipeline alone (examples/s of ``Trainer.data()`` with no step running) and the fraction
  of the timed loop spent waiting for data (``next(it)`` + host->device) against the total.

``--aot`` compiles for ``--mesh`` without running anything (abstract state and batch: no memory is
allocated) and prints memory per device, to catch an out-of-memory before a launch. When the mesh
needs more devices than the default backend has, it compiles for that many *fake CPU devices*:
``jax_num_cpu_devices`` is set before JAX initialises (this command does it; in a process where
JAX already started, set ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before starting
it). The CPU compiler's temporaries differ from a TPU's or GPU's, so that figure is an estimate;
arguments (parameters, optimizer state, batch shards) are exact. With ``--memory-limit-gib`` (or a
limit the device reports) the command exits 1 when the program does not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

EXIT_CONFIG_ERROR = 2
EXIT_DOES_NOT_FIT = 1
MESH_AXES = ("data", "fsdp", "expert", "tensor")  # trainers.mesh.MESH_AXES (not imported: JAX starts later)


class BenchError(ValueError):
    """A bench request that cannot run (bad mesh, too few devices); the message says why."""


# --- mesh and devices -------------------------------------------------------------------------------


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=4,tensor=1"`` -> ``{"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}`` (missing axes are 1;
    -1 allowed once)."""
    sizes = {a: 1 for a in MESH_AXES}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in sizes:
            raise BenchError(f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS in {MESH_AXES}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise BenchError(f"--mesh {text!r}: size of {name!r} is not an integer: {value!r}") from None
    values = list(sizes.values())
    if values.count(-1) > 1 or any(v == 0 or v < -1 for v in values):
        raise BenchError(f"--mesh {text!r}: sizes must be positive, at most one may be -1")
    return sizes


def _xla_flag_device_count() -> int:
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(m.group(1)) if m else 1


def devices_for(num_devices: int) -> tuple[list, bool]:
    """``num_devices`` devices to compile for: the default backend's, else fake CPU devices.

    Returns ``(devices, fake_cpu)``. Before JAX's backends start this raises the CPU device count
    (``jax_num_cpu_devices``) to ``num_devices``; afterwards the count is what the process started with.
    """
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        wanted = max(num_devices, _xla_flag_device_count(), int(os.environ.get("ECOMAX_CPU_DEVICES", "1") or 1))
        if wanted > 1:
            jax.config.update("jax_num_cpu_devices", wanted)
    devices = jax.devices()
    if len(devices) >= num_devices:
        return devices[:num_devices], devices[0].platform == "cpu" and num_devices > 1
    cpu = jax.devices("cpu")
    if len(cpu) >= num_devices:
        return cpu[:num_devices], True
    raise BenchError(f"the mesh needs {num_devices} devices; this process has {len(devices)} "
                     f"{devices[0].platform} and {len(cpu)} CPU devices, and JAX has already started. Run in a "
                     f"fresh process, or set XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} "
                     "before JAX starts")


def _mesh_device_count(sizes: dict[str, int]) -> int | None:
    if -1 in sizes.values():
        return None
    n = 1
    for v in sizes.values():
        n *= v
    return n


# --- measurements -----------------------------------------------------------------------------------


def memory_report(compiled: Any) -> dict[str, int] | None:
    """Per-device bytes of a compiled program (``compiled.memory_analysis()``), None when unavailable."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if m is None:
        return None
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "generated_code_bytes": int(m.generated_code_size_in_bytes),
    }
    out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
                          + out["generated_code_bytes"])
    return out


def device_memory_limit(device: Any) -> int | None:
    """The device's memory limit in bytes, where the backend reports one (GPU, TPU; not CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def xla_flops(compiled: Any) -> float | None:
    """XLA's FLOP count of a compiled program (of one device's partition), or None."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def percentiles(times: Sequence[float]) -> dict[str, float]:
    """Median, p10, p90, mean and min of a list of seconds."""
    xs = sorted(times)

    def pct(q: float) -> float:
        if len(xs) == 1:
            return xs[0]
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"median": statistics.median(xs), "p10": pct(0.1), "p90": pct(0.9), "mean": statistics.fmean(xs),
            "min": xs[0]}


def pipeline_throughput(trainer: Any, batches: int, warmup: int = 2) -> dict[str, float]:
    """Examples/s of the task's grain pipeline alone (``Trainer.data()``), after ``warmup`` batches."""
    it = iter(trainer.data())
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - t0
    # Each process reads its own slice of every global batch; the job's rate is this process's times P.
    return {"examples_per_s": batches * trainer.config.train.batch_size / max(seconds, 1e-9),
            "batches": batches, "seconds": seconds}


def peak_for(device: Any, num_devices: int) -> tuple[float | None, str]:
    """Total peak FLOP/s of the devices the step runs on, and where the number comes from."""
    from trainers import flops

    if device.platform == "cpu":
        return flops.measure_cpu_matmul_peak(), "measured CPU matmul peak (2048x2048 f32, whole host)"
    found = flops.peak_flops(device.device_kind)
    if found is None:
        return None, f"unknown device kind {device.device_kind!r}: no peak in trainers/flops.PEAK_FLOPS"
    peak, label = found
    return peak * num_devices, f"{label} x {num_devices} devices"


# --- the two modes ----------------------------------------------------------------------------------


def compile_report(config: Any, devices: list | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Create the trainer, lower and compile the step; returns ``(trainer, compiled, report)``."""
    from trainers.checkpoints import config_fingerprint
    from trainers.loop import Trainer

    trainer = Trainer.create(config, pathlib.Path(tempfile.gettempdir()) / "ecomax-bench-unused", devices)
    t0 = time.perf_counter()
    lowered = trainer.lower()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    device = trainer.mesh.devices.flat[0]
    report: dict[str, Any] = {
        "task": config.task,
        "config_hash": config_fingerprint(config),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "num_devices": int(trainer.mesh.devices.size),
        "mesh": {k: int(v) for k, v in trainer.mesh.shape.items()},
        "global_batch": int(config.train.batch_size),
        "num_params": int(trainer.spec.num_params),
        "compile_s": compile_s,
        "memory_per_device": memory_report(compiled),
        "device_memory_limit_bytes": device_memory_limit(device),
        "xla_flops_per_step_per_device": xla_flops(compiled),
    }
    from trainers import flops

    forward = trainer.task.forward_flops(config.train.batch_size)
    report["model_flops_per_step"] = flops.train_flops(forward) if forward is not None else None
    report["model_forward_flops"] = dict(forward) if forward is not None else None
    return trainer, compiled, report


def run_bench(config: Any, *, steps: int = 20, warmup: int = 3, pipeline_batches: int | None = None,
              devices: list | None = None) -> dict[str, Any]:
    """Compile, then time ``steps`` train steps after ``warmup``; the measurements as a dict (see module doc)."""
    import jax

    if steps < 1 or warmup < 0:
        raise BenchError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    trainer, compiled, report = compile_report(config, devices)
    if trainer.hosted():
        raise BenchError(f"task {config.task!r} scores its rollouts on the host (Task.score): its step is two "
                         "programs and a host call; `ecomax bench --aot` compiles its rollout, timed runs are "
                         "measured by the task's own benchmark")
    tx, _ = trainer.optimizer()
    state = trainer.init_state(tx, trainer.shardings(tx))
    batch_sh = trainer.batch_shardings()

    report["input_pipeline"] = pipeline_throughput(trainer, pipeline_batches or max(steps, 10))

    it = iter(trainer.data())
    totals, waits = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = trainer.global_batch(next(it), batch_sh)
        jax.block_until_ready(batch)
        t1 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        t2 = time.perf_counter()
        if i >= warmup:
            totals.append(t2 - t0)
            waits.append(t1 - t0)
    step = percentiles(totals)
    batch = config.train.batch_size
    report.update({
        "steps": steps, "warmup": warmup,
        "step_time_s": step,
        "data_wait_s": percentiles(waits),
        "data_wait_fraction": sum(waits) / max(sum(totals), 1e-12),
        "examples_per_s": batch / step["median"],
        "examples_per_s_per_device": batch / step["median"] / report["num_devices"],
        "final_loss": float(jax.device_get(metrics["loss"])),
    })
    peak, source = peak_for(trainer.mesh.devices.flat[0], report["num_devices"])
    report["peak_flops_per_s"], report["peak_source"] = peak, source
    if report["model_flops_per_step"] is not None:
        achieved = report["model_flops_per_step"] / step["median"]
        report["model_flops_per_s"] = achieved
        report["mfu"] = achieved / peak if peak else None
    else:
        report["model_flops_per_s"] = report["mfu"] = None
    return report


def aot_report(config: Any, mesh_sizes: dict[str, int], memory_limit_bytes: int | None = None) -> dict[str, Any]:
    """Compile the step for ``mesh_sizes`` without running it; memory per device and whether it fits."""
    needed = _mesh_device_count(mesh_sizes)
    if needed is None:
        import jax

        devices, fake = jax.devices(), False
    else:
        devices, fake = devices_for(needed)
    with config.unlocked():
        for axis, size in mesh_sizes.items():
            config.mesh[axis] = size
    _, _, report = compile_report(config, devices)
    report["aot"] = True
    report["fake_cpu_devices"] = fake
    limit = memory_limit_bytes or (None if fake else report["device_memory_limit_bytes"])
    report["memory_limit_bytes"] = limit
    mem = report["memory_per_device"]
    report["fits"] = None if (limit is None or mem is None) else mem["total_bytes"] <= limit
    return report


# --- output -----------------------------------------------------------------------------------------


def _gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.3f} GiB" if n >= 2**26 else f"{n / 2**20:.2f} MiB"


def _num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "n/a"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def format_table(r: dict[str, Any]) -> str:
    """The report as an aligned two-column table."""
    rows: list[tuple[str, str]] = [
        ("device kind", f"{r['device_kind']} ({r['platform']}, {r['num_devices']} devices"
                        f"{', fake CPU devices' if r.get('fake_cpu_devices') else ''})"),
        ("mesh", ", ".join(f"{k}={v}" for k, v in r["mesh"].items())),
        ("task / params", f"{r['task']} / {r['num_params']:,}"),
        ("global batch", str(r["global_batch"])),
        ("compile", f"{r['compile_s']:.2f} s"),
    ]
    if "step_time_s" in r:
        s = r["step_time_s"]
        rows += [
            ("step time (median)", f"{s['median'] * 1e3:.2f} ms  (p10 {s['p10'] * 1e3:.2f}, p90 {s['p90'] * 1e3:.2f}; "
                                   f"{r['steps']} steps after {r['warmup']} warm-up)"),
            ("examples/s", f"{r['examples_per_s']:.1f} global, {r['examples_per_s_per_device']:.1f} per device"),
        ]
    rows.append(("model FLOPs / step", f"{_num(r['model_flops_per_step'], 'FLOP')} (analytic: matmuls, fwd x 3)"))
    rows.append(("XLA FLOPs / step", f"{_num(r['xla_flops_per_step_per_device'], 'FLOP')} per device "
                                     "(cost_analysis)"))
    if "step_time_s" in r:
        rows.append(("model FLOP/s", _num(r["model_flops_per_s"], "FLOP/s")))
        rows.append(("peak", f"{_num(r['peak_flops_per_s'], 'FLOP/s')} ({r['peak_source']})"))
        rows.append(("MFU", "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.2f} %"))
    mem = r["memory_per_device"]
    if mem is not None:
        rows.append(("memory / device", f"{_gib(mem['total_bytes'])} = args {_gib(mem['argument_bytes'])} + out "
                                        f"{_gib(mem['output_bytes'])} - donated {_gib(mem['alias_bytes'])} + temp "
                                        f"{_gib(mem['temp_bytes'])}"))
    limit = r.get("memory_limit_bytes", r.get("device_memory_limit_bytes"))
    if limit:
        fits = r.get("fits")
        rows.append(("memory limit", f"{_gib(limit)}" + ("" if fits is None else "  -> fits" if fits
                                                          else "  -> DOES NOT FIT")))
    if "input_pipeline" in r:
        rows.append(("input pipeline alone", f"{r['input_pipeline']['examples_per_s']:.1f} examples/s"))
        rows.append(("waiting for data", f"{100 * r['data_wait_fraction']:.1f} % of step time "
                                         f"(median {r['data_wait_s']['median'] * 1e3:.2f} ms/step)"))
    width = max(len(k) for k, _ in rows)
    title = "ecomax bench" + (" --aot (compiled, not run)" if r.get("aot") else "")
    return "\n".join([title, "-" * len(title)] + [f"{k:<{width}}  {v}" for k, v in rows])


# --- CLI --------------------------------------------------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    from launch.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.set)
        mesh = parse_mesh(args.mesh) if args.mesh else None
        if args.aot and mesh is None:
            raise BenchError("--aot needs --mesh, e.g. --mesh data=2,fsdp=4,tensor=1")
        if args.pipeline_only:
            from launch import pipeline_bench

            workers = [int(w) for w in args.workers.split(",")] if args.workers else None
            report = pipeline_bench.pipeline_report(config, workers=workers, batches=args.batches,
                                                    mfu=args.mfu, hosts=args.hosts)
            report["config"], report["overrides"] = args.config, list(args.set)
            print(pipeline_bench.format_table(report))
            _write_json(args.json, report)
            return 0
        if args.aot:
            limit = int(args.memory_limit_gib * 2**30) if args.memory_limit_gib else None
            report = aot_report(config, mesh, limit)
        else:
            from launch.distributed import initialize_distributed

            initialize_distributed()
            if mesh is not None:
                with config.unlocked():
                    for axis, size in mesh.items():
                        config.mesh[axis] = size
            report = run_bench(config, steps=args.steps, warmup=args.warmup)
    except (ConfigError, BenchError) as e:
        print(f"ecomax bench: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    report["config"] = args.config
    report["overrides"] = list(args.set)
    from launch.allocator import current as current_allocator

    report["allocator"] = current_allocator()  # what this process runs under (launch/allocator.py)
    print(format_table(report))
    _write_json(args.json, report)
    return EXIT_DOES_NOT_FIT if report.get("fits") is False else 0


def _write_json(out: str | None, report: dict[str, Any]) -> None:
    if out:
        path = pathlib.Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, sort_keys=True))
        print(f"wrote {path}")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on the CLI's subparsers (sets ``func(args) -> int``)."""
    p = subparsers.add_parser("bench", help="time the train step of a config, or compile it for a mesh (--aot)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the measurements as JSON here")
    p.add_argument("--aot", action="store_true", help="compile for --mesh without running; print memory per device")
    p.add_argument("--mesh", default=None, metavar="data=D,fsdp=F,tensor=T", help="mesh sizes (overrides the config)")
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="--aot: device memory to check against (default: what the device reports)")
    g = p.add_argument_group("--pipeline-only (launch/pipeline_bench.py)")
    g.add_argument("--pipeline-only", action="store_true",
                   help="the input pipeline alone: per-stage times, worker scaling, host cores needed (estimate)")
    g.add_argument("--workers", default="", metavar="0,1,2", help="worker counts to measure (default 0..cores)")
    g.add_argument("--batches", type=int, default=20, help="timed batches per worker count (default 20)")
    g.add_argument("--mfu", type=float, default=0.5, help="accelerator MFU of the estimate (default 0.5)")
    g.add_argument("--hosts", default="8xH100 SXM,8xTPU v5e", help="accelerator hosts of the estimate")
    p.set_defaults(func=_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
