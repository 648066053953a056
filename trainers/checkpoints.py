"""Checkpoints: Orbax, saved in the background, keep-N; train state + grain iterator state + metadata.

``restore_latest`` walks the steps newest first and returns the first one that restores cleanly; a
corrupt one is reported and moved aside to ``checkpoints_corrupt/`` (kept for inspection, out of the
manager's way). Restoring takes an abstract target whose leaves carry the *current* shardings, so a
checkpoint written on one mesh resumes on another.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def config_fingerprint(config: ml_collections.ConfigDict) -> str:
    """A short stable hash of the resolved config, stored in every checkpoint."""
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Checkpointer:
    """Saves without stalling the loop; restores the newest checkpoint that is intact.

    One process: saves run on a background thread, so the loop only pays for an on-device copy of the
    state (a jitted copy, dispatched asynchronously, so the donated buffers of the next step are free
    to go) and the data iterator's state (a small JSON dict); the thread writes them with a
    synchronous Orbax manager. Several processes: Orbax's own asynchronous save on the main thread, since
    its cross-process barriers must not interleave with the train step's collectives. Every process
    calls ``save`` at the same steps, as Orbax's multi-host saving requires. A save first waits for the
    previous one.
    """

    def __init__(self, directory: pathlib.Path | str, *, keep: int = 3, use_async: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self._keep = keep
        threaded = use_async and jax.process_count() == 1
        self._orbax_async = use_async and not threaded
        self._manager = self._open()
        self._saver = concurrent.futures.ThreadPoolExecutor(1, "ecomax-ckpt") if threaded else None
        self._pending: concurrent.futures.Future | None = None
        self._copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                               enable_async_checkpointing=self._orbax_async)
        return ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def steps(self) -> list[int]:
        self.wait()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any, meta: dict) -> None:
        """Start saving ``state`` at ``step``; ``meta`` (JSON) gets the iterator state as ``data_iter``."""
        self.wait()
        meta = {**meta, "data_iter": data_iter.get_state() if data_iter is not None else None}
        if self._saver is None:
            self._start(step, state, meta)
        else:
            self._pending = self._saver.submit(self._write, step, self._copy(state), meta)

    def _start(self, step: int, state: Any, meta: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def _write(self, step: int, state: Any, meta: dict) -> None:
        self._start(step, state, meta)
        self._manager.wait_until_finished()

    def wait(self) -> None:
        """Block until the pending save (if any) is on disk; re-raise its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        self._manager.wait_until_finished()

    def restore(self, step: int, target: Any, data_iter: Any = None) -> tuple[Any, dict]:
        self.wait()
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        meta = restored["meta"]
        if data_iter is not None and meta.get("data_iter") is not None:
            data_iter.set_state(meta["data_iter"])
        return restored["state"], meta

    def restore_latest(self, target: Any, data_iter: Any = None) -> tuple[Any, dict] | None:
        """The newest checkpoint that restores cleanly, or None when there is none."""
        for step in reversed(self.steps()):
            try:
                return self.restore(step, target, data_iter)
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                log.warning("checkpoint step %d in %s does not restore (%s: %s); trying the previous one",
                            step, self.directory, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
                self._set_aside(step)
        return None

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            aside = self.directory.parent / "checkpoints_corrupt"
            aside.mkdir(exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(aside / f"{step}"))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"ecomax_set_aside_{step}")
        self._manager.close()
        self._manager = self._open()

    def close(self) -> None:
        self.wait()
        if self._saver is not None:
            self._saver.shutdown()
        self._manager.close()
