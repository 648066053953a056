"""2 processes x 2 devices train and checkpoint; 1 process x 4 devices resumes; losses match a 1 x 4 run."""

import json
import subprocess
import sys

import numpy as np

from conftest import REPO

COMMON = ["--config", f"{REPO}/configs/two_tower.py:tiny", "--set", "train.steps=8", "--set", "train.log_every=1",
          "--set", "train.checkpoint_every=4", "--set", "train.batch_size=32"]


def _launch(processes: int, devices: int, workdir, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch.cli", "launch", "local", "--processes", str(processes),
           "--devices-per-process", str(devices), "--timeout", "240", "--init-timeout", "60", "--",
           "train", "--workdir", str(workdir), *COMMON, *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def _losses(workdir) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_two_processes_checkpoint_and_one_process_resumes(tmp_path):
    first = _launch(2, 2, tmp_path / "run", "--set", "train.stop_after=4")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "[rank 1]" in first.stdout + first.stderr
    assert (tmp_path / "run" / "checkpoints" / "4").is_dir()
    resumed = _launch(1, 4, tmp_path / "run")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming at step 4" in resumed.stdout + resumed.stderr

    reference = _launch(1, 4, tmp_path / "reference")
    assert reference.returncode == 0, reference.stdout + reference.stderr
    expected, got = _losses(tmp_path / "reference"), _losses(tmp_path / "run")
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    # gloo across processes vs in-process reductions: equal up to float summation order
    np.testing.assert_allclose([got[s] for s in range(1, 9)], [expected[s] for s in range(1, 9)], rtol=1e-5)
