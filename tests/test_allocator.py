"""The allocator ecomax processes run under (launch/allocator.py): the switch, the one re-exec, what
a running `ecomax train` maps, and what the launchers hand on."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from launch import allocator
from launch.allocator import ENV_ACTIVE, ENV_EXEC, ENV_SWITCH

MIMALLOC = allocator.find("mimalloc")
needs_mimalloc = pytest.mark.skipif(MIMALLOC is None, reason="the cmeel-mimalloc wheel is not installed")
AUTO = allocator.choose({})[0]  # what ECOMAX_ALLOCATOR=auto picks here (mimalloc on a fresh set-up)
needs_auto = pytest.mark.skipif(AUTO.path is None, reason="no allocator library installed")
MALLOC_LIBS = ("libmimalloc", "libjemalloc", "libtcmalloc")


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in (ENV_SWITCH, ENV_ACTIVE, ENV_EXEC, "LD_PRELOAD",
                     *(name for settings in allocator.SETTINGS.values() for name in settings))}
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


# ---------------------------------------------------------------- the switch, without processes

def test_switch_values():
    assert allocator.requested({}) == "auto"
    assert allocator.requested({ENV_SWITCH: " MiMalloc "}) == "mimalloc"
    for off in ("system", "glibc", "off", "none"):
        assert allocator.requested({ENV_SWITCH: off}) == "system"
        assert allocator.choose({ENV_SWITCH: off}) == (allocator.Allocator("system"), None)
    with pytest.raises(allocator.AllocatorError, match="expected one of"):
        allocator.requested({ENV_SWITCH: "hoard"})


def test_missing_library_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(allocator, "find", lambda name: None)
    chosen, warning = allocator.choose({ENV_SWITCH: "jemalloc"})
    assert chosen.name == "system" and "libjemalloc.so.2" in warning
    assert allocator.choose({}) == (allocator.Allocator("system"), None)  # auto: glibc, quietly


@needs_mimalloc
def test_apply_preloads_and_removes_its_own_library_only():
    env, chosen, warning = allocator.apply({"LD_PRELOAD": "/opt/libfoo.so", ENV_SWITCH: "mimalloc"})
    assert warning is None and chosen == allocator.Allocator("mimalloc", MIMALLOC)
    assert env["LD_PRELOAD"] == f"{MIMALLOC} /opt/libfoo.so"
    assert env["MIMALLOC_PURGE_DELAY"] == "-1" and env[ENV_ACTIVE] == f"mimalloc:{MIMALLOC}"
    # the user's own setting wins
    assert allocator.apply({ENV_SWITCH: "mimalloc", "MIMALLOC_PURGE_DELAY": "10"})[0]["MIMALLOC_PURGE_DELAY"] == "10"
    # switched off in a child of a preloaded process: ecomax's library goes, the user's stays
    off, chosen, _ = allocator.apply({**env, ENV_SWITCH: "system"})
    assert chosen.name == "system" and off["LD_PRELOAD"] == "/opt/libfoo.so" and off[ENV_ACTIVE] == "system"
    # an allocator the user preloaded by hand is kept
    mine = {"LD_PRELOAD": "/x/libjemalloc.so.2"}
    assert allocator.apply(mine)[0]["LD_PRELOAD"] == "/x/libjemalloc.so.2"


# ---------------------------------------------------------------- the entry point: one re-exec, same process

PROBE = ("import os, sys\n"
         "from launch import allocator\n"
         "allocator.ensure()\n"
         "maps = open('/proc/self/maps').read()\n"
         "print(os.getpid(), sys.argv[1:], any(lib in maps for lib in %r), os.environ.get('LD_PRELOAD', ''))\n"
         "sys.exit(int(sys.stdin.read() or 0))\n" % (MALLOC_LIBS,))


@needs_auto
def test_reexec_keeps_pid_argv_stdin_and_exit_code():
    proc = subprocess.Popen([sys.executable, "-c", PROBE, "a b", "--c"], env=_clean_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    out, err = proc.communicate("7", timeout=60)
    assert proc.returncode == 7, err
    pid, rest = out.split(" ", 1)
    assert int(pid) == proc.pid  # execve: the same process, so signals to it reach the work
    assert rest.startswith("['a b', '--c'] True ") and rest.count(AUTO.path) == 1, out  # preloaded once


def test_reexec_never_loops(monkeypatch):
    monkeypatch.setenv(ENV_EXEC, str(os.getpid()))
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed twice"))
    assert allocator.ensure(dict(os.environ)) is None


# ---------------------------------------------------------------- a running `ecomax train`

TRAIN = ["--config", f"{REPO}/configs/two_tower.py:tiny", "--set", "train.steps=100000", "--set", "train.log_every=1",
         "--set", "train.checkpoint_every=100000"]


def _running_train(tmp_path, **env):
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", "--workdir", str(workdir), *TRAIN],
                            cwd=REPO, env=_clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=1", **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if metrics.exists() and any("loss" in json.loads(line) for line in metrics.read_text().splitlines()):
            return proc
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError("no step logged")


def _maps(pid):
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out  # the signal reached the training loop, which saved and stopped
    return out


@needs_auto
def test_train_maps_the_allocator_by_default(tmp_path):
    proc = _running_train(tmp_path)
    maps = _maps(proc.pid)
    assert AUTO.path in maps
    out = _stop(proc)
    settings = " ".join(f"{k}={v}" for k, v in allocator.SETTINGS[AUTO.name].items())
    assert f"ecomax train: allocator: {AUTO.name} ({AUTO.path}, {settings}; {ENV_SWITCH}=auto)" in out


@needs_mimalloc
@pytest.mark.skipif(AUTO.name == "mimalloc", reason="the default test checks it")
def test_train_maps_mimalloc_when_asked(tmp_path):
    proc = _running_train(tmp_path, **{ENV_SWITCH: "mimalloc"})
    assert MIMALLOC in _maps(proc.pid)
    assert f"ecomax train: allocator: mimalloc ({MIMALLOC}, MIMALLOC_PURGE_DELAY=-1; {ENV_SWITCH}=mimalloc)" in _stop(proc)


def test_train_switched_off_maps_no_allocator(tmp_path):
    proc = _running_train(tmp_path, **{ENV_SWITCH: "system"})
    maps = _maps(proc.pid)
    assert not any(lib in maps for lib in MALLOC_LIBS), [l for l in maps.splitlines() if "malloc" in l]
    assert "ecomax train: allocator: system (glibc malloc" in _stop(proc)


# ---------------------------------------------------------------- what the launchers hand on

@needs_auto
def test_local_children_start_under_it(tmp_path):
    from launch.launchers.local import child_env

    env = child_env(_clean_env(), coordinator="c:1", processes=1, rank=0, devices=1)
    assert env["LD_PRELOAD"].split()[0] == AUTO.path
    assert all(env[k] == v for k, v in allocator.SETTINGS[AUTO.name].items())
    off = child_env(_clean_env(**{ENV_SWITCH: "system"}), coordinator="c:1", processes=1, rank=0, devices=1)
    assert "LD_PRELOAD" not in off


def test_cluster_launchers_forward_the_switch(tmp_path, monkeypatch):
    from launch.launchers.gke import build_jobset
    from launch.launchers.slurm import build_sbatch_script
    from launch.launchers.tpu_vm import remote_command

    script = build_sbatch_script(["python", "-m", "launch.cli", "train"], nodes=1, gpus_per_node=0, job_name="j",
                                 log_dir=tmp_path, cwd=tmp_path, allocator="system")
    lines = script.splitlines()
    export = next(i for i, line in enumerate(lines) if line.startswith(f"export {ENV_SWITCH}=system"))
    assert export < next(i for i, line in enumerate(lines) if line.startswith("srun "))
    jobset = build_jobset(["train"], name="x", image="i", nodes=1, accelerator="h100", allocator="jemalloc")
    container = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": ENV_SWITCH, "value": "jemalloc"} in container["env"]
    assert f"{ENV_SWITCH}=auto ecomax train" in remote_command(["train"])

    from launch.launchers import main

    monkeypatch.setenv(ENV_SWITCH, "hoard")
    assert main(["slurm", "--nodes", "1", "--gpus-per-node", "0", "--output-dir", str(tmp_path), "--no-submit",
                 "--", "train"]) == 2
