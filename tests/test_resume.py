"""SIGTERM saves and stops. (Kill -9 at a random step and a bitwise resume: test_engine_contract.py, with the
real RQ-KMeans tokenizer and the GRPO toy task; a corrupt newest step: test_checkpoint_integrity.py.)"""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO

ARGS = ["--config", f"{REPO}/configs/two_tower.py:tiny", "--set", "train.steps=30", "--set", "train.log_every=1",
        "--set", "train.checkpoint_every=8", "--set", "train.batch_size=32", "--set", "mesh.data=2"]


def _train(workdir, **popen):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return subprocess.Popen([sys.executable, "-m", "launch.cli", "train", "--workdir", str(workdir), *ARGS],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _wait_for_step(workdir, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        path = workdir / "metrics.jsonl"
        if path.exists() and any(json.loads(l).get("step", 0) >= step for l in path.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def test_sigterm_saves_and_exits(tmp_path):
    proc = _train(tmp_path)
    _wait_for_step(tmp_path, 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "SIGTERM received: saved step" in out
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] >= 5
