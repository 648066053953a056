"""Checkpoints as data to verify: a corrupt newest step is reported, set aside and the previous one resumed
bitwise; no crash loop; a non-finite loss right after a restore names that step; export refuses a corrupt step."""

import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_test_config, logged_losses
from trainers.checkpoints import CheckpointError, Checkpointer, IntegrityError, RECORD_PREFIX, verify_step
from trainers.loop import NonFiniteLossError, Trainer, train
from trainers.state import abstract_state

# the module and session fixtures are built once: this file runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_checkpoint_integrity")

OVERRIDES = ("train.steps=6", "train.checkpoint_every=2", "train.log_every=1", "train.batch_size=16")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One uninterrupted 6-step run with checkpoints 2, 4, 6 (each test works on a copy)."""
    workdir = tmp_path_factory.mktemp("base") / "run"
    train(load_test_config("configs/two_tower.py:tiny", *OVERRIDES), workdir)
    return workdir


def _copy(base, tmp_path):
    shutil.copytree(base, tmp_path / "run")
    return tmp_path / "run"


def _largest(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_data(step_dir):
    path = _largest(step_dir / "state")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 200] = bytes(b ^ 0xFF for b in data[middle:middle + 200])
    path.write_bytes(bytes(data))
    return path


def _flip_metadata(step_dir):
    """One bit of the data iterator's position in meta/metadata: still valid JSON, silently wrong."""
    path = step_dir / "meta" / "metadata"
    text = path.read_text()
    at = text.index('"next_index": ') + len('"next_index": ')
    path.write_text(text[:at] + chr(ord(text[at]) ^ 1) + text[at + 1:])
    assert json.loads(path.read_text())["data_iter"] != json.loads(text)["data_iter"]
    return path


def _remove_file(step_dir):
    path = _largest(step_dir / "state")
    path.unlink()
    return path


def _remove_record(step_dir):
    (path,) = step_dir.glob(f"{RECORD_PREFIX}.*.json")
    path.unlink()
    return step_dir  # an interrupted save: committed by Orbax, no record yet


CORRUPTIONS = {"data": _flip_data, "metadata": _flip_metadata, "removed": _remove_file, "no_record": _remove_record}


def test_every_checkpoint_has_a_record_that_verifies(base):
    for step in (2, 4, 6):
        step_dir = base / "checkpoints" / str(step)
        assert (step_dir / f"{RECORD_PREFIX}.0-of-1.json").is_file()
        assert verify_step(step_dir, step) > 0


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_resumes_the_previous_one_bitwise(base, tmp_path, caplog, kind):
    workdir = _copy(base, tmp_path)
    damaged = CORRUPTIONS[kind](workdir / "checkpoints" / "6")
    config = load_test_config("configs/two_tower.py:tiny", *OVERRIDES)
    with caplog.at_level(logging.WARNING):
        result = train(config, workdir)
    assert result.status == "completed" and result.step == 6
    assert "checkpoint step 6" in caplog.text and "fails verification" in caplog.text
    if kind != "no_record":
        assert str(damaged.relative_to(workdir / "checkpoints" / "6").as_posix()) in caplog.text
    assert (workdir / "checkpoints_corrupt" / "6").is_dir()
    assert logged_losses(workdir) == logged_losses(base)  # steps 5 and 6 redone from step 4: bit for bit

    # no crash loop: the step 6 written by the resumed run verifies, and the next run restores it
    assert Checkpointer(workdir / "checkpoints").steps() == [2, 4, 6]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = train(config, workdir)
    assert again.status == "completed" and "unusable" not in caplog.text
    assert [p.name for p in (workdir / "checkpoints_corrupt").iterdir()] == ["6"]


def test_a_directory_without_records_restores_unverified_with_a_warning(base, tmp_path, caplog):
    workdir = _copy(base, tmp_path)
    for path in (workdir / "checkpoints").rglob(f"{RECORD_PREFIX}*"):
        path.unlink()
    trainer = Trainer.create(load_test_config("configs/two_tower.py:tiny", *OVERRIDES), workdir)
    tx, _ = trainer.optimizer()
    ckpt = Checkpointer(workdir / "checkpoints")
    with caplog.at_level(logging.WARNING):
        restored = ckpt.restore_latest(abstract_state(trainer.spec, tx, trainer.shardings(tx)))
    assert restored is not None and restored[1]["step"] == 6
    assert ckpt.last_restore["verified"] is False and "unverified" in caplog.text


class _Position:
    def __init__(self, state):
        self.state = state

    def get_state(self):
        return self.state


def test_non_finite_loss_after_a_restore_names_the_restored_step_and_restore_step_recovers(base, tmp_path):
    workdir = _copy(base, tmp_path)
    config = load_test_config("configs/two_tower.py:tiny", *OVERRIDES, "train.steps=8")
    trainer = Trainer.create(config, workdir)
    tx, _ = trainer.optimizer()
    target = abstract_state(trainer.spec, tx, trainer.shardings(tx))
    ckpt = Checkpointer(workdir / "checkpoints", use_async=False)
    state, meta = ckpt.restore(6, target)
    ckpt.close()
    # values bad before they were saved (a fault upstream of the disk): the record is honest, the state is not
    shutil.rmtree(workdir / "checkpoints" / "6")
    ckpt = Checkpointer(workdir / "checkpoints", use_async=False)
    poisoned = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
    ckpt.save(6, poisoned, _Position(meta["data_iter"]), {k: v for k, v in meta.items() if k != "data_iter"})
    ckpt.close()

    with pytest.raises(NonFiniteLossError) as err:
        train(config, workdir)
    message = str(err.value)
    assert "at step 7" in message and "after restoring checkpoint step 6, which is the suspect" in message
    assert "--set train.restore_step=N" in message and "on disk: 2, 4" in message and "intact" not in message
    assert err.value.suspect == 6

    with pytest.raises(NonFiniteLossError):  # the same again: nothing is set aside behind the user's back
        train(config, workdir)
    with config.unlocked():
        config.train.restore_step = 4
    result = train(config, workdir)
    assert result.status == "completed" and result.step == 8
    assert (workdir / "checkpoints_superseded" / "6").is_dir()
    assert all(np.isfinite(v) for s, v in logged_losses(workdir).items() if s > 4)


def test_restore_step_that_does_not_exist_is_an_error(base, tmp_path):
    workdir = _copy(base, tmp_path)
    config = load_test_config("configs/two_tower.py:tiny", *OVERRIDES, "train.restore_step=3")
    with pytest.raises(CheckpointError, match=r"train.restore_step=3: no such checkpoint.*finished steps: \[2, 4, 6\]"):
        train(config, workdir)


def test_cli_reports_a_missing_restore_step_with_its_own_exit_code(base, tmp_path, capsys):
    from conftest import REPO
    from launch import cli

    workdir = _copy(base, tmp_path)
    sets = [a for o in (*OVERRIDES, "train.restore_step=3") for a in ("--set", o)]
    code = cli.main(["train", "--config", f"{REPO}/configs/two_tower.py:tiny", "--workdir", str(workdir), *sets])
    assert code == cli.EXIT_CHECKPOINT == 4
    assert "train.restore_step=3: no such checkpoint" in capsys.readouterr().err


def test_restore_of_a_corrupt_step_raises_naming_the_step_and_file(base, tmp_path):
    workdir = _copy(base, tmp_path)
    damaged = _flip_data(workdir / "checkpoints" / "4")
    trainer = Trainer.create(load_test_config("configs/two_tower.py:tiny", *OVERRIDES), workdir)
    tx, _ = trainer.optimizer()
    with pytest.raises(IntegrityError, match=f"checkpoint step 4 fails verification: file .*{damaged.name}"):
        Checkpointer(workdir / "checkpoints").restore(4, abstract_state(trainer.spec, tx, trainer.shardings(tx)))


def test_export_refuses_a_corrupt_step(base, tmp_path):
    from launch import export as ex

    workdir = _copy(base, tmp_path)
    damaged = _flip_data(workdir / "checkpoints" / "6")
    with pytest.raises(ex.ExportError, match=f"checkpoint step 6 fails verification: file .*{damaged.name}.*"
                                             "not exporting it.*other finished steps: 2, 4"):
        ex.load_trained(workdir)
    out = tmp_path / "out"
    with pytest.raises(ex.ExportError, match="step 6 fails verification"):
        ex.export(workdir, out, "safetensors")
    assert not out.exists() or not any(out.iterdir())
    assert ex.load_trained(workdir, step=4).step == 4


# The two-process case (one record part per process, a corrupt step set aside) is in test_multiprocess.py.
