"""Multi-host checkpoints: 2 processes x 2 devices train and checkpoint, a 1 x 4 job resumes them past a
corrupt step, a 2 x 2 job resumes the result."""

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


def _flip_state_bytes(step_dir):
    path = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 200] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 200])
    path.write_bytes(bytes(data))


def test_two_processes_checkpoint_and_a_one_process_job_resumes_past_a_corrupt_step(tmp_path):
    """2 processes x 2 devices train 8 steps (checkpoints 4 and 8, one integrity-record part per process);
    step 8 is corrupted; a 1 x 4 job sets it aside, resumes at step 4 and reproduces steps 5-8 (up to gloo's
    summation order); a 2 x 2 job then resumes the rewritten step 8: both processes verify and agree."""
    from trainers.checkpoints import RECORD_PREFIX, verify_step

    run = tmp_path / "run"
    first = _launch(2, 2, run)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "[rank 1]" in first.stdout + first.stderr
    for step in (4, 8):
        names = sorted(p.name for p in (run / "checkpoints" / str(step)).glob(f"{RECORD_PREFIX}.*"))
        assert names == [f"{RECORD_PREFIX}.0-of-2.json", f"{RECORD_PREFIX}.1-of-2.json"]
        verify_step(run / "checkpoints" / str(step), step)
    expected = _losses(run)
    assert sorted(expected) == list(range(1, 9))

    _flip_state_bytes(run / "checkpoints" / "8")
    resumed = _launch(1, 4, run)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out
    assert "checkpoint step 8" in out and "fails verification" in out and "resuming at step 4" in out
    assert (run / "checkpoints_corrupt" / "8").is_dir()
    got = _losses(run)
    np.testing.assert_allclose([got[s] for s in range(1, 9)], [expected[s] for s in range(1, 9)], rtol=1e-5)

    again = _launch(2, 2, run, "--set", "train.steps=10")
    out = again.stdout + again.stderr
    assert again.returncode == 0, out
    assert "resuming at step 8" in out and sorted(_losses(run)) == list(range(1, 11))
