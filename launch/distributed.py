"""Multi-process start-up: one call, first thing in every run, before any JAX device use.

``initialize_distributed()`` reads the environment, decides which kind of job this process belongs
to, and calls ``jax.distributed.initialize`` accordingly, always with bounded timeouts. Modes, first
match wins:

- ``single``: ``ECOMAX_DISTRIBUTED=off``, or none of the below. jax.distributed is not started.
- ``auto``: ``ECOMAX_DISTRIBUTED=auto`` (set by ``ecomax launch tpu-vm``). jax's own detection.
- ``local``: ``ECOMAX_COORDINATOR`` + ``ECOMAX_NUM_PROCESSES`` + ``ECOMAX_PROCESS_ID`` (set by
  ``ecomax launch local``). Explicit arguments, gloo CPU collectives.
- ``env``: ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` or
  ``JOB_COMPLETION_INDEX`` (set by the ``ecomax launch gke`` JobSet). Explicit arguments.
- ``slurm``: ``SLURM_JOB_ID`` with ``SLURM_NTASKS`` > 1, inside ``srun``. jax's SLURM detection, plus
  all of the node's GPUs when one task runs per node.
- ``tpu``: ``TPU_WORKER_HOSTNAMES``/``TPU_PROCESS_ADDRESSES`` naming more than one host, or
  ``MEGASCALE_NUM_SLICES`` > 1. jax's TPU detection.

``ECOMAX_CPU_DEVICES=n`` (any mode) sets ``jax_num_cpu_devices`` before the backend starts. Timeouts
default to ``ECOMAX_INIT_TIMEOUT`` / ``ECOMAX_HEARTBEAT_TIMEOUT`` / ``ECOMAX_SHUTDOWN_TIMEOUT``, then
to 300 / 100 / 300 seconds. A start that fails quickly (bad address, bad arguments) raises
``DistributedInitError`` naming the mode, the coordinator and this process's id; when a peer never
joins, jax itself aborts the process (SIGABRT, ``DEADLINE_EXCEEDED``) once the init timeout has
passed, after the one line this module prints before joining.

End every run with ``sys.exit(finish_distributed(exit_code))``: after a failure it skips jax's exit
barrier, which would otherwise hold the failing process for the whole shutdown timeout.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Mapping

# Set by `ecomax launch local` for each child process.
ENV_COORDINATOR = "ECOMAX_COORDINATOR"
ENV_NUM_PROCESSES = "ECOMAX_NUM_PROCESSES"
ENV_PROCESS_ID = "ECOMAX_PROCESS_ID"
ENV_CPU_DEVICES = "ECOMAX_CPU_DEVICES"
# Optional everywhere.
ENV_MODE = "ECOMAX_DISTRIBUTED"  # "auto" | "off"
ENV_INIT_TIMEOUT = "ECOMAX_INIT_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "ECOMAX_HEARTBEAT_TIMEOUT"
ENV_SHUTDOWN_TIMEOUT = "ECOMAX_SHUTDOWN_TIMEOUT"

DEFAULT_INIT_TIMEOUT_S = 300.0
DEFAULT_HEARTBEAT_TIMEOUT_S = 100.0
DEFAULT_SHUTDOWN_TIMEOUT_S = 300.0


class DistributedInitError(RuntimeError):
    """The environment asks for a multi-process run that could not be started."""


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    process_index: int
    process_count: int
    local_device_count: int
    mode: str  # one of the modes in the module docstring


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """What the environment asks for, decided before any JAX call. ``None`` fields are left to jax."""

    mode: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    cpu_devices: int | None = None

    @property
    def multi_process(self) -> bool:
        return self.mode != "single"


def _int_var(environ: Mapping[str, str], name: str, *, minimum: int = 0) -> int:
    raw = environ.get(name)
    if raw is None:
        raise DistributedInitError(f"environment variable {name} is not set")
    try:
        value = int(raw)
    except ValueError:
        raise DistributedInitError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise DistributedInitError(f"environment variable {name}={value} must be >= {minimum}")
    return value


def _slurm_local_device_ids(environ: Mapping[str, str]) -> tuple[int, ...] | None:
    """All of this node's GPUs when SLURM runs one task per node.

    jax's SLURM detection otherwise restricts each task to GPU ``SLURM_LOCALID`` (one GPU per task),
    which would leave G-1 GPUs of a node idle under ``--ntasks-per-node=1``.
    """
    if environ.get("JAX_LOCAL_DEVICE_IDS"):
        return None  # jax reads it itself
    per_node = environ.get("SLURM_NTASKS_PER_NODE")
    nodes = environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_NNODES")
    one_per_node = per_node == "1" or (per_node is None and nodes is not None and nodes == environ.get("SLURM_NTASKS"))
    if not one_per_node:
        return None
    visible = environ.get("CUDA_VISIBLE_DEVICES", "")
    count = len([d for d in visible.split(",") if d.strip()]) if visible else 0
    if not count and environ.get("SLURM_GPUS_ON_NODE", "").isdigit():
        count = int(environ["SLURM_GPUS_ON_NODE"])
    return tuple(range(count)) if count else None


def _tpu_host_count(environ: Mapping[str, str]) -> int:
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    return len([h for h in hosts.split(",") if h.strip()])


def detect_plan(environ: Mapping[str, str] | None = None) -> LaunchPlan:
    """Decide the start-up mode from environment variables alone (see the module docstring)."""
    environ = os.environ if environ is None else environ
    cpu_devices = _int_var(environ, ENV_CPU_DEVICES, minimum=1) if environ.get(ENV_CPU_DEVICES) else None
    single = LaunchPlan("single", cpu_devices=cpu_devices)

    requested = environ.get(ENV_MODE, "").strip().lower()
    if requested not in ("", "auto", "off"):
        raise DistributedInitError(f"{ENV_MODE}={requested!r}: expected 'auto' or 'off'")
    if requested == "off":
        return single
    if requested == "auto":
        return LaunchPlan("auto", cpu_devices=cpu_devices)

    if environ.get(ENV_COORDINATOR):
        num = _int_var(environ, ENV_NUM_PROCESSES, minimum=1)
        pid = _int_var(environ, ENV_PROCESS_ID)
        if num == 1:
            return single
        return LaunchPlan("local", environ[ENV_COORDINATOR], num, pid, cpu_devices=cpu_devices)

    if environ.get("JAX_COORDINATOR_ADDRESS") and environ.get("JAX_NUM_PROCESSES"):
        num = _int_var(environ, "JAX_NUM_PROCESSES", minimum=1)
        pid_var = "JAX_PROCESS_ID" if environ.get("JAX_PROCESS_ID") else "JOB_COMPLETION_INDEX"
        pid = _int_var(environ, pid_var)
        if num == 1:
            return single
        return LaunchPlan("env", environ["JAX_COORDINATOR_ADDRESS"], num, pid, cpu_devices=cpu_devices)

    if environ.get("SLURM_JOB_ID") and int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
        if "SLURM_STEP_NODELIST" not in environ or "SLURM_PROCID" not in environ:
            raise DistributedInitError(
                f"SLURM job {environ['SLURM_JOB_ID']} has SLURM_NTASKS={environ['SLURM_NTASKS']} but this process "
                "was not started by srun (no SLURM_STEP_NODELIST/SLURM_PROCID): run it as `srun ecomax ...`, "
                f"or set {ENV_MODE}=off for a single-process run")
        return LaunchPlan("slurm", local_device_ids=_slurm_local_device_ids(environ), cpu_devices=cpu_devices)

    if _tpu_host_count(environ) > 1 or int(environ.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1:
        return LaunchPlan("tpu", cpu_devices=cpu_devices)

    return single


def _timeout(value: float | None, env_name: str, default: float, environ: Mapping[str, str]) -> int:
    if value is None:
        raw = environ.get(env_name)
        try:
            value = float(raw) if raw else default
        except ValueError:
            raise DistributedInitError(f"environment variable {env_name}={raw!r} is not a number") from None
    if value <= 0:
        raise DistributedInitError(f"{env_name}: a timeout must be positive, got {value}")
    return max(1, math.ceil(value))  # jax takes whole seconds


def initialize_distributed(
    *,
    init_timeout_s: float | None = None,
    heartbeat_timeout_s: float | None = None,
    shutdown_timeout_s: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> DistributedInfo:
    """Start this process's part of a multi-process JAX job when the environment asks for one.

    Must run before any JAX device use. Idempotent: a second call returns the same information.
    ``init_timeout_s`` bounds the wait for all processes to join; ``heartbeat_timeout_s`` is how long
    a silent peer may go before the job is torn down; ``shutdown_timeout_s`` bounds the exit barrier.
    """
    import jax
    from jax._src import xla_bridge  # backends_are_initialized has no public alias in jax 0.10.2

    environ = os.environ if environ is None else environ
    plan = detect_plan(environ)
    init_s = _timeout(init_timeout_s, ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT_S, environ)
    heartbeat_s = _timeout(heartbeat_timeout_s, ENV_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT_S, environ)
    shutdown_s = _timeout(shutdown_timeout_s, ENV_SHUTDOWN_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT_S, environ)

    started = jax.distributed.is_initialized()
    if not started and plan.cpu_devices is not None and jax.config.jax_num_cpu_devices != plan.cpu_devices:
        if xla_bridge.backends_are_initialized():
            raise DistributedInitError(
                f"{ENV_CPU_DEVICES}={plan.cpu_devices} came too late: the JAX backend is already initialised "
                "(call initialize_distributed() before any JAX device use)")
        jax.config.update("jax_num_cpu_devices", plan.cpu_devices)

    if plan.multi_process and not started:
        if xla_bridge.backends_are_initialized():
            raise DistributedInitError(
                f"a multi-process run ({plan.mode}) was requested after the JAX backend was initialised: "
                "call initialize_distributed() before any JAX device use")
        if plan.mode == "local":
            # CPU processes talk through gloo (already the 0.10.2 default; pinned so it cannot drift), and
            # the CPU client's topology exchange gets the same bound as the join.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            minutes = max(1, math.ceil(init_s / 60))
            jax.config.update("jax_cpu_get_local_topology_timeout_minutes", minutes)
            jax.config.update("jax_cpu_get_global_topology_timeout_minutes", minutes)
        explicit = {
            "coordinator_address": plan.coordinator_address,
            "num_processes": plan.num_processes,
            "process_id": plan.process_id,
            "local_device_ids": list(plan.local_device_ids) if plan.local_device_ids else None,
        }
        where = plan.coordinator_address or "auto-detected"
        who = f"process {plan.process_id}/{plan.num_processes}" if plan.process_id is not None else "this process"
        # One line first: when a peer never joins, jax aborts the process (SIGABRT) after the timeout with a
        # terse DEADLINE_EXCEEDED, and this line says which job it was waiting for.
        print(f"ecomax: joining a multi-process JAX job ({plan.mode} mode, coordinator {where}, {who}, "
              f"init timeout {init_s}s)", file=sys.stderr, flush=True)
        try:
            jax.distributed.initialize(
                **{k: v for k, v in explicit.items() if v is not None},
                initialization_timeout=init_s,
                heartbeat_timeout_seconds=heartbeat_s,
                shutdown_timeout_seconds=shutdown_s,
            )
        except Exception as e:  # jax raises ValueError/RuntimeError/XlaRuntimeError depending on the stage
            raise DistributedInitError(
                f"jax.distributed.initialize failed ({plan.mode} mode, coordinator {where}, {who}, "
                f"timeout {init_s}s): {type(e).__name__}: {e}") from e

        _install_fail_fast_excepthook()

    return DistributedInfo(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=jax.local_device_count(),
        mode=plan.mode,
    )


def finish_distributed(exit_code: int) -> int:
    """End a run with ``exit_code``: call as ``sys.exit(finish_distributed(main()))``.

    At exit jax waits in a shutdown barrier for every process (up to the shutdown timeout). After a
    failure the other processes never get there, so a failing process would sit in the barrier for
    minutes before its launcher hears of it. With a non-zero code in a multi-process job this flushes
    stdout/stderr and ends the process at once (``os._exit``, skipping the barrier and other atexit
    hooks); otherwise it returns ``exit_code`` unchanged. Uncaught exceptions take the same path
    through the excepthook that ``initialize_distributed`` installs.
    """
    import jax

    if exit_code != 0 and jax.distributed.is_initialized():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(exit_code)
    return exit_code


def _install_fail_fast_excepthook() -> None:
    previous = sys.excepthook
    if getattr(previous, "_ecomax_fail_fast", False):
        return

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        finish_distributed(1)

    hook._ecomax_fail_fast = True
    sys.excepthook = hook
