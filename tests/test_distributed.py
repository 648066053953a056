"""initialize_distributed(): mode detection from the environment, and real 2-process jobs on CPU.

The end-to-end tests start ``python -m launch.launchers local ... --module tests.test_distributed``:
this file is also the program each rank runs (see ``_rank_main`` at the bottom).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.distributed import (
    DistributedInitError,
    LaunchPlan,
    detect_plan,
    finish_distributed,
    initialize_distributed,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- mode detection (no JAX calls)

def test_no_environment_is_a_single_process():
    assert detect_plan({}) == LaunchPlan("single")
    assert detect_plan({"ECOMAX_CPU_DEVICES": "4"}) == LaunchPlan("single", cpu_devices=4)


def test_local_launcher_environment():
    env = {"ECOMAX_COORDINATOR": "127.0.0.1:1234", "ECOMAX_NUM_PROCESSES": "2", "ECOMAX_PROCESS_ID": "1",
           "ECOMAX_CPU_DEVICES": "2"}
    assert detect_plan(env) == LaunchPlan("local", "127.0.0.1:1234", 2, 1, cpu_devices=2)
    assert detect_plan({**env, "ECOMAX_NUM_PROCESSES": "1"}).mode == "single"
    with pytest.raises(DistributedInitError, match="ECOMAX_PROCESS_ID is not set"):
        detect_plan({k: v for k, v in env.items() if k != "ECOMAX_PROCESS_ID"})
    with pytest.raises(DistributedInitError, match="ECOMAX_NUM_PROCESSES='two'"):
        detect_plan({**env, "ECOMAX_NUM_PROCESSES": "two"})


def test_jobset_environment_takes_the_completion_index():
    env = {"JAX_COORDINATOR_ADDRESS": "x-workers-0-0.x:8482", "JAX_NUM_PROCESSES": "4", "JOB_COMPLETION_INDEX": "3"}
    assert detect_plan(env) == LaunchPlan("env", "x-workers-0-0.x:8482", 4, 3)
    assert detect_plan({**env, "JAX_PROCESS_ID": "2"}).process_id == 2


def test_slurm_is_left_to_jax_but_keeps_all_gpus_of_a_node():
    env = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_STEP_NUM_NODES": "2",
           "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
           "SLURM_NTASKS_PER_NODE": "1", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert detect_plan(env) == LaunchPlan("slurm", local_device_ids=(0, 1, 2, 3))
    # several tasks per node: jax's own one-GPU-per-task default stays
    assert detect_plan({**env, "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4"}).local_device_ids is None
    # a one-task allocation (salloc, sbatch -n1) is a single process
    assert detect_plan({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "1"}).mode == "single"
    with pytest.raises(DistributedInitError, match="srun"):
        detect_plan({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2"})


def test_tpu_and_explicit_modes():
    assert detect_plan({"TPU_WORKER_HOSTNAMES": "h0,h1", "TPU_WORKER_ID": "0"}).mode == "tpu"
    assert detect_plan({"TPU_WORKER_HOSTNAMES": "h0", "TPU_WORKER_ID": "0"}).mode == "single"
    assert detect_plan({"ECOMAX_DISTRIBUTED": "auto"}).mode == "auto"
    assert detect_plan({"ECOMAX_DISTRIBUTED": "off", "TPU_WORKER_HOSTNAMES": "h0,h1"}).mode == "single"
    with pytest.raises(DistributedInitError, match="expected 'auto' or 'off'"):
        detect_plan({"ECOMAX_DISTRIBUTED": "yes"})


def test_single_process_does_not_start_the_distributed_runtime():
    import jax

    info = initialize_distributed(environ={})
    assert (info.process_index, info.process_count, info.mode) == (0, 1, "single")
    assert info.local_device_count == jax.local_device_count()
    assert not jax.distributed.is_initialized()
    with pytest.raises(DistributedInitError, match="after the JAX backend was initialised"):
        initialize_distributed(environ={"ECOMAX_DISTRIBUTED": "auto"})


# ---------------------------------------------------------------- 2 processes x 2 CPU devices

def _launch(*args: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.launchers", "local", *args], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})})


def test_two_processes_psum_across_ranks():
    done = _launch("--processes", "2", "--devices-per-process", "2", "--timeout", "60", "--init-timeout", "30",
                   "--module", "tests.test_distributed", "--", "psum", timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    # rank r holds devices values 2r+1, 2r+2: the psum over 4 devices is 1+2+3+4
    for rank in (0, 1):
        assert f"[rank {rank}] RESULT process={rank}/2 local_devices=2 global_devices=4 psum=10.0" in done.stdout, \
            done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes (its parent has not reaped it yet)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("mode, code", [("exit3", 3), ("raise", 1)])
def test_a_failing_rank_stops_the_job(tmp_path, mode, code):
    """Rank 1 fails after joining (exit code 3, or an uncaught exception) while rank 0 is busy."""
    started = time.monotonic()
    done = _launch("--processes", "2", "--devices-per-process", "2", "--timeout", "60", "--init-timeout", "30",
                   "--grace", "2", "--module", "tests.test_distributed", "--", mode,
                   timeout=90, env={"ECOMAX_TEST_PID_DIR": str(tmp_path)})
    assert done.returncode == code, done.stdout + done.stderr
    # well inside --timeout: the failure is not held up by jax's shutdown barrier (see finish_distributed)
    assert time.monotonic() - started < 30
    assert f"rank 1 exited with code {code}" in done.stderr
    if mode == "raise":
        assert "[rank 1] RuntimeError: rank 1 gives up" in done.stdout
    assert re.search(r"stopped the others: rank 0 \(was killed by signal SIG(TERM|KILL)\)", done.stderr), done.stderr
    assert "[rank 0] BLOCKED" in done.stdout  # rank 0 really was still running when rank 1 failed
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 3  # both ranks and rank 0's own child
    time.sleep(0.5)
    assert not [pid for pid in pids if _alive(pid)]


# ---------------------------------------------------------------- the program each rank runs

def _rank_main(mode: str) -> int:
    info = initialize_distributed()
    pid_dir = os.environ.get("ECOMAX_TEST_PID_DIR")
    if pid_dir:
        Path(pid_dir, f"rank{info.process_index}.pid").write_text(str(os.getpid()))

    if mode == "psum":
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import AxisType, NamedSharding
        from jax.sharding import PartitionSpec as P

        mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
        n = info.local_device_count
        local = np.arange(n, dtype=np.float32) + 1 + n * info.process_index
        values = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
        psum = jax.jit(jax.shard_map(lambda a: jax.lax.psum(jnp.sum(a), "data"),
                                     mesh=mesh, in_specs=P("data"), out_specs=P()))
        total = float(psum(values))
        print(f"RESULT process={info.process_index}/{info.process_count} local_devices={n} "
              f"global_devices={jax.device_count()} psum={total}")
        return 0

    if mode in ("exit3", "raise"):
        if info.process_index == 1:
            time.sleep(1.0)  # let rank 0 reach its blocking point first
            if mode == "raise":
                raise RuntimeError("rank 1 gives up")
            return 3
        child = subprocess.Popen(["sleep", "300"])  # must be stopped with its parent
        if pid_dir:
            Path(pid_dir, "rank0-child.pid").write_text(str(child.pid))
        print("BLOCKED", flush=True)
        time.sleep(300)
        return 0

    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(finish_distributed(_rank_main(sys.argv[1])))
