"""Checkpoints: Orbax, saved in the background, keep-N; train state + grain iterator state + metadata.

Every checkpoint carries an *integrity record*: the SHA-256 digest and size of each of its files,
written after Orbax has committed the step (``STEP/ecomax_integrity.P-of-N.json``, one part per
process, each written to a temporary name and renamed into place). A step is restored only after its
files match the record. ``restore_latest`` walks the steps newest first and returns the first one that
verifies and restores cleanly; a corrupt one (a flipped byte, a missing or truncated file, an Orbax
error) is reported with its step and file and moved aside to ``checkpoints_corrupt/`` (kept for
inspection, out of the manager's way). In a directory whose checkpoints carry records, a step without
a complete record is an unfinished save and is set aside the same way; a directory written before
records existed is restored unverified, with a warning. Restoring takes an abstract target whose
leaves carry the *current* shardings, so a checkpoint written on one mesh resumes on another.

Several processes: each hashes a disjoint share of the files (file ``i`` of the sorted list goes to
process ``i mod N``) when saving and when verifying, so every byte any process reads is checked once;
the verdicts are all-gathered, so every process sets aside and restores the same step.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

RECORD_FORMAT = "ecomax.integrity/1"
RECORD_PREFIX = "ecomax_integrity"
# In the checkpoints directory: "the steps here carry integrity records" (a step without one is unfinished).
DIRECTORY_MARKER = f"{RECORD_PREFIX}.json"
_RECORD_RE = re.compile(rf"^{RECORD_PREFIX}\.(\d+)-of-(\d+)\.json$")
_CHUNK = 4 << 20


def config_fingerprint(config: ml_collections.ConfigDict) -> str:
    """A short stable hash of the resolved config, stored in every checkpoint.

    ``train.restore_step`` is left out: it says where to resume from, not what is trained.
    """
    values = config.to_dict()
    values.get("train", {}).pop("restore_step", None)
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- integrity records ------------------------------------------------------------------------------


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says which step, which file and why."""


class IntegrityError(CheckpointError):
    """A checkpoint's files do not match its integrity record (or it has no complete record)."""

    def __init__(self, step: int, problem: str, path: str | None = None, *, unrecorded: bool = False):
        self.step, self.problem, self.path, self.unrecorded = step, problem, path, unrecorded
        super().__init__(f"checkpoint step {step} fails verification: {problem}")


def _atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_record(name: str) -> bool:
    return name.startswith(RECORD_PREFIX) or name.startswith(f".{RECORD_PREFIX}")


def checkpoint_files(step_dir: pathlib.Path) -> list[str]:
    """The files of a committed step (relative, ``/``-separated, sorted), integrity records excluded."""
    return sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")
                  if p.is_file() and not _is_record(p.name))


def file_digest(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_many(step_dir: pathlib.Path, names: Sequence[str]) -> dict[str, str]:
    """``name -> sha256`` for ``names`` (hashlib releases the GIL: a few threads use a few cores)."""
    if len(names) <= 1:
        return {n: file_digest(step_dir / n) for n in names}
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1, len(names))) as pool:
        return dict(zip(names, pool.map(lambda n: file_digest(step_dir / n), names)))


def write_record(step_dir: pathlib.Path, step: int, process_index: int = 0, process_count: int = 1) -> pathlib.Path:
    """Hash this process's share of ``step_dir``'s files and write its part of the integrity record.

    Call it once the step is committed (its files are final). The part lists every file seen, so a
    verifier can tell that the parts together cover the step.
    """
    names = checkpoint_files(step_dir)
    mine = names[process_index::process_count]
    digests = _hash_many(step_dir, mine)
    record = {"format": RECORD_FORMAT, "step": int(step), "algorithm": "sha256", "process": process_index,
              "process_count": process_count, "listing": names,
              "files": {n: {"size": (step_dir / n).stat().st_size, "sha256": digests[n]} for n in mine}}
    path = step_dir / f"{RECORD_PREFIX}.{process_index}-of-{process_count}.json"
    _atomic_write(path, json.dumps(record, indent=1))
    return path


def has_record(step_dir: pathlib.Path) -> bool:
    return any(_RECORD_RE.match(p.name) for p in step_dir.iterdir()) if step_dir.is_dir() else False


def read_record(step_dir: pathlib.Path, step: int) -> dict[str, dict]:
    """The merged record of a step: ``file -> {size, sha256}``; raises ``IntegrityError`` if incomplete."""
    parts: dict[int, dict[int, pathlib.Path]] = {}
    for p in step_dir.iterdir():
        if m := _RECORD_RE.match(p.name):
            parts.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    if not parts:
        raise IntegrityError(step, "no integrity record: the save did not finish", str(step_dir), unrecorded=True)
    count = max(parts)
    missing = sorted(set(range(count)) - set(parts[count]))
    if missing:
        raise IntegrityError(step, f"integrity record incomplete (missing the part of process(es) {missing} of "
                             f"{count}): the save did not finish", str(step_dir), unrecorded=True)
    files: dict[str, dict] = {}
    listing: set[str] = set()
    for p in parts[count].values():
        try:
            record = json.loads(p.read_text())
            if record.get("format") != RECORD_FORMAT or int(record["step"]) != step:
                raise ValueError(f"format {record.get('format')!r}, step {record.get('step')!r}")
            files.update(record["files"])
            listing.update(record["listing"])
        except (ValueError, KeyError, TypeError) as e:
            raise IntegrityError(step, f"unreadable integrity record ({e})", str(p)) from None
    uncovered = sorted(listing - set(files))
    if uncovered:
        raise IntegrityError(step, f"integrity record has no digest for {len(uncovered)} file(s)",
                             str(step_dir / uncovered[0]))
    return files


def verify_step(step_dir: pathlib.Path, step: int, process_index: int = 0, process_count: int = 1) -> int:
    """Check this process's share of a step's files against its record; returns the bytes hashed.

    Raises ``IntegrityError`` naming the first bad file (missing, wrong size, wrong digest).
    """
    files = read_record(step_dir, step)
    names = sorted(files)[process_index::process_count]
    for n in names:  # cheap checks first: a missing or truncated file needs no hashing
        path = step_dir / n
        if not path.is_file():
            raise IntegrityError(step, f"file {n} is missing", str(path))
        if path.stat().st_size != files[n]["size"]:
            raise IntegrityError(step, f"file {n} has {path.stat().st_size} bytes, the record says {files[n]['size']}",
                                 str(path))
    digests = _hash_many(step_dir, names)
    bad = [n for n in names if digests[n] != files[n]["sha256"]]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise IntegrityError(step, f"file {bad[0]} does not match its sha256 digest{more}", str(step_dir / bad[0]))
    return sum(files[n]["size"] for n in names)


def directory_uses_records(directory: pathlib.Path) -> bool:
    """True when the steps of ``directory`` are expected to carry records (marker, or any step has one)."""
    if (directory / DIRECTORY_MARKER).is_file():
        return True
    return any(has_record(p) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()) \
        if directory.is_dir() else False


def _all_processes(flag: int) -> np.ndarray:
    """Every process's ``flag``, in process order (one process: just ours)."""
    if jax.process_count() == 1:
        return np.array([flag])
    return np.asarray(multihost_utils.process_allgather(np.int32(flag))).reshape(-1)


# --- the checkpointer -------------------------------------------------------------------------------


class Checkpointer:
    """Saves without stalling the loop; restores the newest checkpoint that verifies and restores.

    One process: saves run on a background thread, so the loop only pays for an on-device copy of the
    state (a jitted copy, dispatched asynchronously, so the donated buffers of the next step are free
    to go) and the data iterator's state (a small JSON dict); the thread writes them with a
    synchronous Orbax manager, then hashes the files into the step's integrity record. Several
    processes: Orbax's own asynchronous save on the main thread, since its cross-process barriers must
    not interleave with the train step's collectives; a recorder thread waits for the commit and writes
    this process's part of the record. Every process calls ``save`` at the same steps, as Orbax's
    multi-host saving requires. A save first waits for the previous one (and its record).
    """

    def __init__(self, directory: pathlib.Path | str, *, keep: int = 3, use_async: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self._keep = keep
        threaded = use_async and jax.process_count() == 1
        self._orbax_async = use_async and not threaded
        self._manager = self._open()
        self._saver = concurrent.futures.ThreadPoolExecutor(1, "ecomax-ckpt") if use_async else None
        self._pending: concurrent.futures.Future | None = None
        self._copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
        self.last_restore: dict[str, Any] = {}  # what the last restore did (step, verified, seconds)
        if jax.process_index() == 0 and not self._manager.all_steps():
            _atomic_write(self.directory / DIRECTORY_MARKER, json.dumps(
                {"format": RECORD_FORMAT, "note": "every step here carries an integrity record; a step "
                 "without one did not finish saving"}))

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                               enable_async_checkpointing=self._orbax_async)
        return ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def steps(self) -> list[int]:
        self.wait()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any, meta: dict) -> None:
        """Start saving ``state`` at ``step``; ``meta`` (JSON) gets the iterator state as ``data_iter``."""
        self.wait()
        meta = {**meta, "data_iter": data_iter.get_state() if data_iter is not None else None}
        if self._saver is None:  # synchronous
            self._start(step, state, meta)
            self._record(step)
        elif self._orbax_async:
            self._start(step, state, meta)
            self._pending = self._saver.submit(self._record_when_committed, step)
        else:
            self._pending = self._saver.submit(self._write, step, self._copy(state), meta)

    def _start(self, step: int, state: Any, meta: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def _write(self, step: int, state: Any, meta: dict) -> None:
        self._start(step, state, meta)
        self._manager.wait_until_finished()
        self._record(step)

    def _record_when_committed(self, step: int) -> None:
        self._manager.wait_until_finished()
        self._record(step)

    def _record(self, step: int, timeout: float = 300.0) -> None:
        """Write this process's part of ``step``'s record once the committed step directory is visible."""
        path = self.step_dir(step)
        deadline = time.monotonic() + timeout
        while not path.is_dir():  # another process's commit (a rename) may not be visible here yet
            if time.monotonic() > deadline:
                raise CheckpointError(f"checkpoint step {step} did not appear in {self.directory} within "
                                      f"{timeout:.0f} s of its save finishing; no integrity record written")
            time.sleep(0.05)
        write_record(path, step, jax.process_index(), jax.process_count())

    def wait(self) -> None:
        """Block until the pending save (if any) and its record are on disk; re-raise its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        self._manager.wait_until_finished()

    def verify(self, step: int) -> dict[str, Any]:
        """Verify ``step`` (every process its share, then all agree); raises ``IntegrityError``.

        Returns ``{"verified": bool, "bytes": n, "seconds": s}``; ``verified`` is False for a directory
        written before records existed (restored unverified, with a warning).
        """
        t0 = time.perf_counter()
        path = self.step_dir(step)
        error: IntegrityError | None = None
        hashed = 0
        legacy = not has_record(path) and not directory_uses_records(self.directory)
        if not legacy:
            try:
                hashed = verify_step(path, step, jax.process_index(), jax.process_count())
            except IntegrityError as e:
                error = e
        verdicts = _all_processes(0 if error is None else 1)
        if error is not None:
            raise error
        if verdicts.any():
            others = [int(i) for i in np.flatnonzero(verdicts)]
            raise IntegrityError(step, f"process(es) {others} found a file that does not match the record "
                                 "(see their log)", str(path))
        if legacy:
            log.warning("checkpoint step %d in %s has no integrity record (written before records existed): "
                        "restoring it unverified", step, self.directory)
        return {"verified": not legacy, "bytes": hashed, "seconds": time.perf_counter() - t0}

    def restore(self, step: int, target: Any, data_iter: Any = None, *, verify: bool = True) -> tuple[Any, dict]:
        """Restore ``step`` (verified first, unless ``verify=False``) into ``target``'s shardings."""
        self.wait()
        t0 = time.perf_counter()
        check = self.verify(step) if verify else {"verified": False, "bytes": 0, "seconds": 0.0}
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        meta = restored["meta"]
        if data_iter is not None and meta.get("data_iter") is not None:
            data_iter.set_state(meta["data_iter"])
        self.last_restore = {"step": step, **check, "restore_seconds": time.perf_counter() - t0}
        return restored["state"], meta

    def restore_latest(self, target: Any, data_iter: Any = None) -> tuple[Any, dict] | None:
        """The newest checkpoint that verifies and restores cleanly, or None when there is none."""
        for step in reversed(self.steps()):
            error: Exception | None = None
            try:
                restored = self.restore(step, target, data_iter)
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                error = e
            chosen = _all_processes(step if error is None else -1)  # every process the same verdict
            if error is None and (chosen == step).all():
                return restored
            if error is None and (chosen >= 0).all():
                raise CheckpointError(f"processes restored different checkpoint steps {chosen.tolist()}: is "
                                      f"{self.directory} the same shared directory on every host?")
            if error is not None:
                first = str(error).splitlines()[0][:300] if str(error) else ""
                why = f"{type(error).__name__}: {first}"
            else:
                why = f"process(es) {np.flatnonzero(chosen < 0).tolist()} could not verify or restore it"
            older = [s for s in self.steps() if s < step]
            log.warning("checkpoint step %d in %s is unusable (%s); moved to %s; %s", step, self.directory, why,
                        self.directory.parent / "checkpoints_corrupt",
                        f"trying step {older[-1]}" if older else "no older checkpoint: starting from scratch")
            self._set_aside(step, "checkpoints_corrupt")
        return None

    def read_params(self, step: int | None = None) -> tuple[Any, int]:
        """``(params as host arrays, step)`` of ``step`` (default: the newest) after verifying it, with no
        target: for ``init_from`` a checkpoint of another run (another task's state and optimizer). Reads the
        whole saved state on this host."""
        steps = self.steps()
        if not steps or (step is not None and step not in steps):
            raise CheckpointError(f"{self.directory}: no finished checkpoint{f' at step {step}' if step else ''}; "
                                  f"finished steps: {steps or 'none'}")
        step = steps[-1] if step is None else step
        self.verify(step)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        state = self._manager.restore(step, args=args)["state"]
        params = state["params"] if isinstance(state, dict) else state.params
        return jax.tree.map(np.asarray, params), step

    def restore_exact(self, step: int, target: Any, data_iter: Any = None) -> tuple[Any, dict]:
        """Restore ``step`` (verified) and set the newer steps aside in ``checkpoints_superseded/``.

        For ``train.restore_step``: the run continues from ``step``, and the checkpoints it writes must not
        collide with the newer ones. A step that is missing or fails verification is an error.
        """
        steps = self.steps()
        if step not in steps:
            raise CheckpointError(f"train.restore_step={step}: no such checkpoint in {self.directory}; "
                                  f"finished steps: {steps or 'none'}")
        restored = self.restore(step, target, data_iter)
        for newer in (s for s in steps if s > step):
            log.warning("train.restore_step=%d: moving the newer checkpoint step %d to %s", step, newer,
                        self.directory.parent / "checkpoints_superseded")
            self._set_aside(newer, "checkpoints_superseded")
        return restored

    def _set_aside(self, step: int, folder: str) -> None:
        if jax.process_index() == 0:
            aside = self.directory.parent / folder
            aside.mkdir(exist_ok=True)
            dest, n = aside / str(step), 1
            while dest.exists():  # the same step set aside before (an earlier run): keep both
                dest, n = aside / f"{step}.{n}", n + 1
            shutil.move(str(self.step_dir(step)), str(dest))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"ecomax_set_aside_{folder}_{step}")
        self._manager.close()
        self._manager = self._open()

    def close(self) -> None:
        self.wait()
        if self._saver is not None:
            self._saver.shutdown()
        self._manager.close()
