"""`ecomax launch ...`: the files and commands each launcher writes, and the local launcher's process handling.

The local-launcher tests here run this file as each rank's program (``--module tests.test_launchers``,
see ``_rank_main`` at the bottom); they use no JAX, so they take a second or two each. The JAX
end-to-end runs are in test_distributed.py.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launch.launchers import add_launch_parser, main
from launch.launchers.gke import build_jobset, dump_manifest
from launch.launchers.local import child_env, run_local
from launch.launchers.tpu_vm import build_ssh_argv

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--config", "configs/retrieval.py:tiny", "--set", "steps=10"]


def _cli(argv: list[str]) -> argparse.Namespace:
    """Parse the way the ecomax CLI will: `launch` registered on the top-level subparsers."""
    parser = argparse.ArgumentParser(prog="ecomax")
    add_launch_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_registration_keeps_the_command_after_the_separator():
    args = _cli(["launch", "local", "--processes", "2", "--", *TRAIN])
    assert args.command == "launch" and args.launcher == "local" and callable(args.func)
    assert args.ecomax_args in (TRAIN, ["--", *TRAIN])  # the separator is stripped by command_args


# ---------------------------------------------------------------- slurm

def _sbatch(tmp_path, capsys, *extra: str) -> tuple[str, str]:
    out_dir = tmp_path / "slurm"
    rc = main(["slurm", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "12:00:00",
               "--account", "proj", "--job-name", "rt", "--output-dir", str(out_dir), *extra, "--", *TRAIN])
    assert rc == 0
    [script] = out_dir.glob("rt-*.sbatch")
    return script.read_text(), capsys.readouterr().out


def test_slurm_script_structure(tmp_path, capsys):
    text, out = _sbatch(tmp_path, capsys, "--no-submit")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = dict(line[len("#SBATCH --"):].split("=", 1) for line in lines if line.startswith("#SBATCH"))
    assert directives == {"job-name": "rt", "nodes": "4", "ntasks-per-node": "1", "gpus-per-node": "8",
                          "partition": "gpu", "time": "12:00:00", "account": "proj",
                          "output": f"{tmp_path / 'slurm'}/%x-%j.out"}
    # every #SBATCH line comes before the first command (sbatch stops reading them there)
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    [srun] = [line for line in lines if line.startswith("srun ")]
    words = shlex.split(srun)
    assert words[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"]
    assert words[3:] == [sys.executable, "-m", "launch.cli", *TRAIN]
    assert "sbatch" in out and "rt-" in out


def test_slurm_submits_when_sbatch_is_on_path(tmp_path, capsys, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch-args\necho "Submitted batch job 42"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    _, out = _sbatch(tmp_path, capsys)
    assert "Submitted batch job 42" in out
    [script] = (tmp_path / "slurm").glob("rt-*.sbatch")
    assert (tmp_path / "sbatch-args").read_text().split() == [str(script)]


def test_slurm_rejects_a_bad_time(tmp_path, capsys):
    rc = main(["slurm", "--nodes", "1", "--gpus-per-node", "0", "--time", "90 minutes", "--output-dir",
               str(tmp_path), "--no-submit", "--", *TRAIN])
    assert rc == 2 and "expected HH:MM:SS" in capsys.readouterr().err


# ---------------------------------------------------------------- gke

def _container(manifest: dict) -> tuple[dict, dict, dict]:
    [rjob] = manifest["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    pod = job["template"]
    [container] = pod["spec"]["containers"]
    return job, pod, container


def test_gke_tpu_jobset(tmp_path, capsys):
    out = tmp_path / "x.yaml"
    rc = main(["gke", "--name", "rt-v5e", "--image", "img:1", "--nodes", "2", "--accelerator", "tpu-v5e",
               "--topology", "2x4", "--workdir", "gs://bkt/runs/rt", "--out", str(out), "--", *TRAIN])
    assert rc == 0 and "kubectl apply" in capsys.readouterr().out
    manifest = yaml.safe_load(out.read_text())
    assert manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and manifest["kind"] == "JobSet"
    [rjob] = manifest["spec"]["replicatedJobs"]
    assert rjob["replicas"] == 1
    job, pod, container = _container(manifest)
    assert (job["parallelism"], job["completions"], job["completionMode"]) == (2, 2, "Indexed")
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["JAX_COORDINATOR_ADDRESS"] == f"rt-v5e-{rjob['name']}-0-0.rt-v5e:8482"
    assert env["JAX_NUM_PROCESSES"] == "2"
    assert env["JAX_PROCESS_ID"] == {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert container["resources"]["limits"] == {"google.com/tpu": 4} == container["resources"]["requests"]
    assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                           "cloud.google.com/gke-tpu-topology": "2x4"}
    # the bucket is mounted through gcsfuse and the ecomax command gets the mounted path
    assert pod["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
    [volume] = pod["spec"]["volumes"]
    assert volume["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
    assert volume["csi"]["volumeAttributes"]["bucketName"] == "bkt"
    assert container["volumeMounts"] == [{"name": "workdir", "mountPath": "/gcs/bkt"}]
    assert container["command"] == ["ecomax", *TRAIN, "--workdir", "/gcs/bkt/runs/rt"]


def test_gke_gpu_jobset_on_a_volume(monkeypatch):
    manifest = build_jobset(TRAIN, name="rt-h100", image="img:1", nodes=4, accelerator="h100",
                            workdir="/mnt/runs/rt", pvc="shared-runs")
    # JSON is the fallback dump when PyYAML is missing: both must load to the same manifest
    assert yaml.safe_load(dump_manifest(manifest)) == manifest
    monkeypatch.setitem(sys.modules, "yaml", None)
    assert json.loads(dump_manifest(manifest)) == manifest
    job, pod, container = _container(manifest)
    assert (job["parallelism"], job["completions"]) == (4, 4)
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["spec"]["volumes"] == [{"name": "workdir", "persistentVolumeClaim": {"claimName": "shared-runs"}}]
    assert container["volumeMounts"] == [{"name": "workdir", "mountPath": "/mnt/runs/rt"}]
    assert "metadata" not in pod  # no gcsfuse annotation without a bucket
    assert container["command"][-2:] == ["--workdir", "/mnt/runs/rt"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(accelerator="tpu-v5p", topology=None), "needs --topology"),
    (dict(accelerator="tpu-v5p", topology="2x2x2", nodes=3), "has 8 chips"),
    (dict(accelerator="a100", topology="2x4"), "for TPU accelerators"),
    (dict(accelerator="a100", workdir="/mnt/x"), "needs --pvc"),
    (dict(accelerator="a100", name="Bad_Name"), "--name"),
])
def test_gke_rejects_inconsistent_requests(kwargs, message):
    kwargs = {"name": "rt", "image": "img", "nodes": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_jobset(TRAIN, **kwargs)


# ---------------------------------------------------------------- tpu-vm

def test_tpu_vm_command_round_trips_through_shlex(capsys, monkeypatch):
    monkeypatch.delenv("ECOMAX_ALLOCATOR", raising=False)
    tricky = [*TRAIN, "--set", "name=it's a \"test\" $HOME"]
    rc = main(["tpu-vm", "--name", "v5e-16", "--zone", "us-west4-a", "--project", "p", "--remote-dir", "ecomax",
               "--dry-run", "--", *tricky])
    assert rc == 0
    printed = capsys.readouterr().out.strip()
    argv = build_ssh_argv(tricky, name="v5e-16", zone="us-west4-a", project="p", remote_dir="ecomax")
    assert shlex.split(printed) == argv
    assert argv[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "v5e-16", "--zone", "us-west4-a"]
    assert "--worker=all" in argv
    remote = shlex.split(argv[argv.index("--command") + 1])
    assert remote == ["cd", "ecomax", "&&", "ECOMAX_DISTRIBUTED=auto", "ECOMAX_ALLOCATOR=auto", "ecomax", *tricky]


def test_tpu_vm_prints_when_gcloud_is_absent(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["tpu-vm", "--name", "v", "--zone", "z", "--", *TRAIN]) == 0
    captured = capsys.readouterr()
    assert "gcloud is not on PATH" in captured.err
    assert shlex.split(captured.out)[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]


# ---------------------------------------------------------------- local: environment and process handling

def test_child_environment():
    base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_foo=1", "JAX_PROCESS_ID": "5",
            "PATH": "/bin"}
    env = child_env(base, coordinator="127.0.0.1:9", processes=2, rank=1, devices=3, init_timeout_s=20)
    assert env["XLA_FLAGS"] == "--xla_cpu_foo=1" and "JAX_PROCESS_ID" not in env
    assert (env["ECOMAX_COORDINATOR"], env["ECOMAX_NUM_PROCESSES"], env["ECOMAX_PROCESS_ID"],
            env["ECOMAX_CPU_DEVICES"], env["ECOMAX_INIT_TIMEOUT"]) == ("127.0.0.1:9", "2", "1", "3", "20")
    assert env["JAX_PLATFORMS"] == "cpu" and env["PATH"] == "/bin"
    assert "XLA_FLAGS" not in child_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                                        coordinator="c:1", processes=1, rank=0, devices=1)


def _run_ranks(mode: str, tmp_path, monkeypatch, **kwargs):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setenv("ECOMAX_TEST_PID_DIR", str(tmp_path))
    result = run_local([sys.executable, "-m", "tests.test_launchers", mode], processes=3, devices_per_process=1,
                       out=out, err=err, **kwargs)
    return result, out.getvalue(), err.getvalue()


def _no_process_left(tmp_path) -> bool:
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert pids
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        if Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
            return False
    return True


def test_local_all_ranks_succeed_with_prefixed_output(tmp_path, monkeypatch):
    result, out, _ = _run_ranks("ok", tmp_path, monkeypatch, timeout_s=30)
    assert result.exit_code == 0 and result.returncodes == [0, 0, 0]
    for rank in range(3):
        assert f"[rank {rank}] hello from {rank}/3 devices=1" in out.splitlines()
        assert f"[rank {rank}] no newline at the end" in out.splitlines()


def test_local_a_rank_killed_by_a_signal_stops_the_others(tmp_path, monkeypatch):
    started = time.monotonic()
    result, out, err = _run_ranks("sigkill", tmp_path, monkeypatch, timeout_s=30, grace_s=1)
    assert time.monotonic() - started < 15
    assert result.exit_code == 128 + signal.SIGKILL
    assert "rank 1 was killed by signal SIGKILL" in err
    assert "rank 0 (was killed by signal SIGTERM)" in err and "rank 2 (was killed by signal SIGTERM)" in err
    assert "[rank 0] waiting" in out
    assert _no_process_left(tmp_path)


def test_local_timeout_bounds_the_job_even_when_sigterm_is_ignored(tmp_path, monkeypatch):
    started = time.monotonic()
    result, _, err = _run_ranks("ignore-sigterm", tmp_path, monkeypatch, timeout_s=3, grace_s=1)
    assert time.monotonic() - started < 10
    assert result.exit_code == 124 and "ran past --timeout 3s" in err
    assert result.returncodes == [-signal.SIGKILL] * 3
    assert _no_process_left(tmp_path)


def test_local_sigterm_to_the_launcher_stops_every_rank(tmp_path):
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launch.launchers", "local", "--processes", "2", "--grace", "1", "--module",
         "tests.test_launchers", "--", "ignore-sigterm"],
        cwd=REPO_ROOT, env={**os.environ, "ECOMAX_TEST_PID_DIR": str(tmp_path)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=15)
    assert launcher.returncode == 130 and "interrupted (SIGTERM)" in err, err
    assert _no_process_left(tmp_path)


# ---------------------------------------------------------------- the program each rank runs

def _rank_main(mode: str) -> int:
    rank, count = int(os.environ["ECOMAX_PROCESS_ID"]), int(os.environ["ECOMAX_NUM_PROCESSES"])
    if mode == "ignore-sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(os.environ["ECOMAX_TEST_PID_DIR"], f"rank{rank}.pid").write_text(str(os.getpid()))
    if mode == "ok":
        print(f"hello from {rank}/{count} devices={os.environ['ECOMAX_CPU_DEVICES']}")
        sys.stdout.write("no newline at the end")
        return 0
    if mode == "sigkill":
        if rank == 1:
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        print("waiting", flush=True)
        time.sleep(60)
        return 0
    if mode == "ignore-sigterm":
        print("ready", flush=True)
        time.sleep(60)
        return 0
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1]))
