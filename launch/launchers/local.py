"""`ecomax launch local`: an N-process JAX job on this machine, each process with M fake CPU devices.

    ecomax launch local --processes 2 --devices-per-process 4 -- train --config configs/X.py:tiny --workdir runs/x
    ecomax launch local --processes 2 --devices-per-process 2 --module tests.test_distributed -- psum

Each child runs ``python -m launch.cli ARGS`` (or ``python -m MODULE ARGS`` with ``--module``) with
``ECOMAX_COORDINATOR`` (127.0.0.1 and a free port), ``ECOMAX_NUM_PROCESSES``, ``ECOMAX_PROCESS_ID`` and
``ECOMAX_CPU_DEVICES`` set for ``initialize_distributed()``, ``JAX_PLATFORMS=cpu``, and any inherited
``--xla_force_host_platform_device_count`` removed from ``XLA_FLAGS``. Output lines are prefixed
``[rank K]``. When a process exits non-zero or is killed, the others get SIGTERM, then SIGKILL after
``--grace`` seconds (each child leads its own process group, so its own children go too), and the
launcher exits non-zero naming the rank. ``--timeout`` bounds the whole job (exit code 124).

Allocator: the children start under the allocator the launcher chose (``ECOMAX_ALLOCATOR``, default
``auto``; launch/allocator.py): ``LD_PRELOAD`` and the allocator's retain settings are in their
environment from the start (the library is on this machine), so ``python -m MODULE`` children get it
too and no child re-executes itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO

from launch import allocator
from launch.distributed import (
    ENV_COORDINATOR,
    ENV_CPU_DEVICES,
    ENV_INIT_TIMEOUT,
    ENV_MODE,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
)
from launch.launchers.command import CLI_MODULE, REPO_ROOT, add_command_argument, command_args, python_module_argv

EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count(=\S*)?")
# Distributed settings a child must not inherit from the launcher's own environment.
_INHERITED_DISTRIBUTED_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                               "JAX_LOCAL_DEVICE_IDS", ENV_MODE)


def child_env(base: Mapping[str, str], *, coordinator: str, processes: int, rank: int, devices: int,
              init_timeout_s: float | None = None) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in _INHERITED_DISTRIBUTED_VARS}
    xla_flags = _DEVICE_COUNT_FLAG.sub("", env.pop("XLA_FLAGS", "")).split()
    if xla_flags:
        env["XLA_FLAGS"] = " ".join(xla_flags)
    env.update({
        ENV_COORDINATOR: coordinator,
        ENV_NUM_PROCESSES: str(processes),
        ENV_PROCESS_ID: str(rank),
        ENV_CPU_DEVICES: str(devices),
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), base.get("PYTHONPATH", "")) if p),
    })
    if init_timeout_s is not None:
        env[ENV_INIT_TIMEOUT] = str(init_timeout_s)
    env, _, _ = allocator.apply(env)  # LD_PRELOAD + settings of the chosen allocator (or none: system)
    return env


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclasses.dataclass
class LocalResult:
    """How the job ended: ``exit_code`` is what the launcher returns."""

    exit_code: int
    message: str
    returncodes: list[int | None] = dataclasses.field(default_factory=list)  # per rank, after clean-up


def _pump(stream: IO[bytes], prefix: str, out: IO[str], lock: threading.Lock) -> None:
    """Copy a child's output line by line with its rank prefix; keep draining if ``out`` breaks (a child
    blocked on a full pipe would never exit)."""
    writable = True
    for raw in iter(stream.readline, b""):
        if not writable:
            continue
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        with lock:
            try:
                out.write(f"{prefix}{line}\n")
                out.flush()
            except (OSError, ValueError):
                writable = False
    stream.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session=True: the child's pid is its process-group id
    except (ProcessLookupError, PermissionError):
        pass


def _stop_all(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every child's process group, SIGKILL what is left after ``grace_s``, reap the children."""
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)  # also for exited leaders: their own children may remain
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        _signal_group(proc, signal.SIGKILL)
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class _Interrupted(Exception):
    pass


def _raise_interrupted(signum, frame):
    raise _Interrupted(signal.Signals(signum).name)


def run_local(argv: Sequence[str], *, processes: int, devices_per_process: int, timeout_s: float | None = None,
              init_timeout_s: float | None = None, grace_s: float = 10.0, out: IO[str] | None = None,
              err: IO[str] | None = None) -> LocalResult:
    """Run ``argv`` as ``processes`` ranks of one JAX job; stop them all when one fails or time runs out."""
    import portpicker

    if processes < 1 or devices_per_process < 1:
        raise ValueError(f"--processes and --devices-per-process must be >= 1, got {processes} and "
                         f"{devices_per_process}")
    out = out or sys.stdout
    err = err or sys.stderr
    coordinator = f"127.0.0.1:{portpicker.pick_unused_port()}"
    lock = threading.Lock()
    exits: queue.Queue[tuple[int, int]] = queue.Queue()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _raise_interrupted) if in_main else None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        for rank in range(processes):
            env = child_env(os.environ, coordinator=coordinator, processes=processes, rank=rank,
                            devices=devices_per_process, init_timeout_s=init_timeout_s)
            proc = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(proc)
            pumps.append(threading.Thread(target=_pump, args=(proc.stdout, f"[rank {rank}] ", out, lock), daemon=True))
            pumps[-1].start()
            # One waiter per child: the queue then holds exits in the order they happened.
            threading.Thread(target=lambda r=rank, p=proc: exits.put((r, p.wait())), daemon=True).start()

        result = None
        for _ in range(processes):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                rank, returncode = exits.get(timeout=remaining)
            except queue.Empty:
                result = LocalResult(EXIT_TIMEOUT, f"the job ran past --timeout {timeout_s:g}s")
                break
            if returncode != 0:
                code = returncode if returncode > 0 else 128 - returncode
                result = LocalResult(code, f"rank {rank} {describe_exit(returncode)}")
                break
        if result is None:
            result = LocalResult(0, f"all {processes} processes exited with code 0")
    except (KeyboardInterrupt, _Interrupted) as e:
        result = LocalResult(EXIT_INTERRUPTED, f"interrupted ({e or 'SIGINT'})")
    finally:
        if in_main:  # the clean-up is bounded (grace + 5 s): let no second signal cut it short
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        alive = [rank for rank, proc in enumerate(procs) if proc.poll() is None]
        _stop_all(procs, grace_s)
        for thread in pumps:
            thread.join(timeout=5)
        if in_main:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term if old_term is not None else signal.SIG_DFL)
    result.returncodes = [proc.returncode for proc in procs]
    if result.exit_code != 0:
        if alive:
            stopped = ", ".join(f"rank {r} ({describe_exit(procs[r].returncode)})" for r in alive)
            result.message += f"; stopped the others: {stopped}"
        with lock:
            print(f"ecomax launch local: {result.message}", file=err, flush=True)
    return result


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help="N processes on this machine with fake CPU devices",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, required=True, help="number of processes (ranks)")
    parser.add_argument("--devices-per-process", type=int, default=1, help="fake CPU devices per process")
    parser.add_argument("--timeout", type=float, default=None, help="seconds for the whole job (default: none)")
    parser.add_argument("--init-timeout", type=float, default=60.0,
                        help="seconds for all processes to join the coordinator (default: 60)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL when stopping the others (default: 10)")
    parser.add_argument("--module", default=CLI_MODULE,
                        help=f"run `python -m MODULE ARGS` instead of the ecomax CLI ({CLI_MODULE})")
    add_command_argument(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    rest = command_args(args, required=args.module == CLI_MODULE)
    try:
        return run_local(python_module_argv(args.module, rest), processes=args.processes,
                         devices_per_process=args.devices_per_process, timeout_s=args.timeout,
                         init_timeout_s=args.init_timeout, grace_s=args.grace).exit_code
    except ValueError as e:
        print(f"ecomax launch local: {e}", file=sys.stderr)
        return 2
