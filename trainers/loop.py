"""The training loop: set up (mesh, task, state, data, checkpoints), then step, log, evaluate, save.

The loop only reads device values back at log, eval and checkpoint steps; every other step is an
asynchronous dispatch of the jitted step. SIGTERM/SIGINT finish the current step, save a checkpoint
and return with ``status="interrupted"``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines.loader import process_batches
from trainers.checkpoints import Checkpointer, config_fingerprint
from trainers.init_from import apply_init_from
from trainers.mesh import batch_sharding, make_mesh, parse_rules
from trainers.metrics_writer import MetricsWriter
from trainers.optimizer import make_optimizer
from trainers.state import (ModelSpec, TrainState, abstract_state, init_state, model_spec, state_from_params,
                            state_shardings)
from trainers.step import UpdateContext, jit_train_step, make_rollout, make_update
from trainers.tasks import EvalContext, Task, get_task, to_host

log = logging.getLogger(__name__)


# A non-finite loss this many steps or fewer after a restore makes the restored checkpoint the suspect.
SUSPECT_STEPS = 10


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/Inf; the state was not updated past ``step``.

    ``restored`` (the step the run resumed from) is named as the suspect when the failure comes within
    ``SUSPECT_STEPS`` of it; ``older`` are the checkpoints before it that are still on disk.
    """

    def __init__(self, step: int, last_checkpoint: int | None, restored: int | None = None,
                 older: tuple[int, ...] = (), verified: bool = True):
        self.step, self.last_checkpoint, self.restored = step, last_checkpoint, restored
        self.suspect = restored if restored is not None and step - restored <= SUSPECT_STEPS else None
        if self.suspect is None:
            where = (f"the last good checkpoint (step {last_checkpoint}) is intact" if last_checkpoint is not None
                     else "no checkpoint was written")
        else:
            checked = ("its files passed verification: the values saved may be bad, or the data after it"
                       if verified
                       else "it has no integrity record and was restored unverified")
            since = (f"; the checkpoints written since (up to step {last_checkpoint}) descend from it"
                     if last_checkpoint is not None and last_checkpoint > restored else "")
            how = (f"restore an older one with `--set train.restore_step=N` (on disk: "
                   f"{', '.join(map(str, older))})" if older else
                   "there is no older checkpoint: start again in a fresh workdir")
            where = (f"{step - restored} step(s) after restoring checkpoint step {restored}, which is the suspect "
                     f"({checked}){since}; {how}")
        super().__init__(f"non-finite loss or gradient at step {step}: training stopped; {where}")


@dataclasses.dataclass
class TrainResult:
    status: str  # "completed" | "stopped" (at train.stop_after) | "interrupted" (by a signal)
    step: int
    metrics: dict[str, float]
    eval_metrics: dict[str, float]


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _NoData:
    """The data iterator of a task without a training source: every step's data batch is ``{}``."""

    def __iter__(self) -> _NoData:
        return self

    def __next__(self) -> dict:
        return {}

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        pass


@dataclasses.dataclass
class Step:
    """The compiled step of a run: ``(state, batch) -> (state, metrics)``, with what it needs around it.

    A task with a host function (``Task.score``) runs as two jitted calls with the host in between:
    ``rollout(state, batch)``, then ``update(state, scored batch)``; every other task as one (``fn``).
    """

    fn: Callable[[TrainState, dict], tuple[TrainState, dict]]
    tx: Any
    shardings: TrainState
    batch_shardings: dict


@dataclasses.dataclass
class RunState:
    """What the loop carries from step to step."""

    state: TrainState
    step: int  # steps done
    last_saved: int | None  # step of the newest checkpoint on disk, None before the first
    logged: dict[str, float] = dataclasses.field(default_factory=dict)
    evaluated: dict[str, float] = dataclasses.field(default_factory=dict)
    t_last: float = dataclasses.field(default_factory=time.perf_counter)
    step_last: int = 0  # the step at t_last
    pause: float = 0.0  # seconds spent evaluating since t_last: not training time


@dataclasses.dataclass
class Trainer:
    """Everything a run needs, built from the config; ``run()`` trains."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    task: Task
    spec: ModelSpec
    mesh: jax.sharding.Mesh
    _eval_compiled: dict = dataclasses.field(default_factory=dict, repr=False)
    _restored: dict | None = dataclasses.field(default=None, repr=False)  # the checkpoint this run resumed from

    @classmethod
    def create(cls, config: ml_collections.ConfigDict, workdir: pathlib.Path | str,
               devices: list[jax.Device] | None = None) -> Trainer:
        """``devices`` (default: all) are laid out as the config's mesh."""
        workdir = pathlib.Path(workdir)
        task = get_task(config)
        mesh = make_mesh(config.mesh, devices)
        return cls(config, workdir, task, model_spec(task.build_model), mesh)

    # --- pieces (also used by bench, export and tests) --------------------------------------------------

    @property
    def rules(self):
        return parse_rules(self.config.sharding.rules)

    def optimizer(self):
        return make_optimizer(self.config, self.spec.abstract_params)

    def shardings(self, tx) -> TrainState:
        return state_shardings(self.spec, tx, self.mesh, self.rules, self.task.init_extra)

    def batch_shardings(self) -> dict:
        return {k: batch_sharding(self.mesh, len(v.shape))
                for k, v in self.task.batch_spec(self.config.train.batch_size).items()}

    def update_context(self, tx, schedule) -> UpdateContext:
        t = self.config.train
        return UpdateContext(self.spec.graphdef, tx, schedule, self.mesh, self.task.loss, t.microbatches,
                             t.compute_dtype)

    def compiled_step(self) -> Step:
        """The jitted train step (rollout, task update or gradient step, as the task declares)."""
        tx, schedule = self.optimizer()
        shardings, batch_sh = self.shardings(tx), self.batch_shardings()
        task, ctx = self.task, self.update_context(tx, schedule)
        common = dict(seed=self.config.seed, mesh=self.mesh, rules=self.rules)
        update = make_update(functools.partial(task.update, ctx), updates=task.updates_per_rollout,
                             check_state=task.overrides("update"), **common)
        if not task.overrides("rollout"):
            return Step(jit_train_step(update, shardings, batch_sh, self.mesh), tx, shardings, batch_sh)
        rollout = make_rollout(functools.partial(task.rollout, ctx), **common)
        if not task.overrides("score"):
            return Step(jit_train_step(lambda state, batch: update(state, rollout(state, batch)), shardings, batch_sh,
                                       self.mesh), tx, shardings, batch_sh)
        return Step(_HostScoredStep(task, rollout, update, shardings, batch_sh, self.mesh), tx, shardings, batch_sh)

    def lower(self) -> jax.stages.Lowered:
        """The train step lowered for abstract state and batch: compiles paper-scale configs without memory.

        For a task with a host function this is its rollout (the update compiles at the first step, once
        the host's output shapes are known); ``hosted()`` tells which."""
        step = self.compiled_step()
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=step.batch_shardings[k])
                 for k, v in self.task.batch_spec(self.config.train.batch_size).items()}
        fn = step.fn.rollout if isinstance(step.fn, _HostScoredStep) else step.fn
        return fn.lower(self.abstract_state(step), batch)

    def hosted(self) -> bool:
        """Whether a train step runs a host function between two jitted calls (``Task.score``)."""
        return self.task.overrides("rollout") and self.task.overrides("score")

    def abstract_state(self, step: Step) -> TrainState:
        return abstract_state(self.spec, step.tx, step.shardings, self.task.init_extra)

    def init_state(self, tx, shardings: TrainState) -> TrainState:
        """A fresh state, born sharded (``init_from`` entries applied)."""
        state = init_state(self.task.build_model, self.config.seed, tx, shardings, self.task.init_extra)
        if any(entry.path for entry in self.config.get("init_from", {}).values()):
            params = apply_init_from(state.params, shardings.params, self.config.init_from)
            # the task's state is remade from the imported weights (a GRPO reference is the start policy)
            state = state_from_params(params, self.config.seed, tx, shardings, self.task.init_extra)
        return state

    def data(self):
        found = self.task.train_source()
        if found is None:
            return _NoData()
        source, transform = found
        d = self.config.data
        return process_batches(source, global_batch_size=self.config.train.batch_size, seed=self.config.seed,
                               transform=transform, shuffle=self.task.shuffle, process_index=jax.process_index(),
                               process_count=jax.process_count(), read_threads=d.get("read_threads", 4),
                               prefetch=d.get("prefetch", 16), worker_count=d.get("worker_count", 0))

    def global_batch(self, local: dict[str, np.ndarray], shardings: dict) -> dict[str, jax.Array]:
        return global_batch(local, shardings)

    def evaluate(self, state: TrainState, step: int) -> dict[str, float]:
        ctx = EvalContext(self.spec.graphdef, state.params, self.mesh, step, self.workdir, self._eval_compiled,
                          state.extra)
        results = self.task.evaluate(ctx)
        return {k: float(v) for k, v in results.items() if isinstance(v, (int, float, np.number))}

    # --- the run -----------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.config.train
        primary = jax.process_index() == 0
        self.workdir.mkdir(parents=True, exist_ok=True)
        if primary:
            (self.workdir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2, default=str))
        step = self.compiled_step()
        data_iter = iter(self.data())
        ckpt = Checkpointer(self.workdir / "checkpoints", keep=cfg.keep_checkpoints,
                            use_async=cfg.get("async_checkpoints", True))
        run = self._restore_or_init(ckpt, step, data_iter)
        writer = MetricsWriter(self.workdir, total_steps=cfg.steps, initial_step=run.step, enabled=primary)
        writer.message(f"ecomax: task {self.config.task}, {self.spec.num_params:,} parameters, mesh "
                       f"{dict(self.mesh.shape)}, {'resuming at step ' + str(run.step) if run.step else 'from scratch'}")
        try:
            with _StopFlag() as stop:
                return self._loop(run, step, data_iter, ckpt, writer, stop)
        finally:
            ckpt.close()
            writer.close()

    def _meta(self, step: int) -> dict[str, Any]:
        return {"step": step, "config_hash": config_fingerprint(self.config), "task_host": self.task.host_state()}

    def _restore_or_init(self, ckpt: Checkpointer, step: Step, data_iter: Iterator) -> RunState:
        """The newest verified checkpoint (or exactly ``train.restore_step``), else a fresh state."""
        requested = int(self.config.train.get("restore_step", 0) or 0)
        target = self.abstract_state(step)
        if requested > 0:
            restored = ckpt.restore_exact(requested, target, data_iter)
        else:
            restored = ckpt.restore_latest(target, data_iter)
        if restored is None:
            self._restored = None
            return RunState(self.init_state(step.tx, step.shardings), 0, None)
        state, meta = restored
        fingerprint = config_fingerprint(self.config)
        if meta.get("config_hash") != fingerprint:
            log.warning("resuming from a checkpoint written with another config (hash %s, now %s)",
                        meta.get("config_hash"), fingerprint)
        self.task.load_host_state(meta.get("task_host") or {})
        done = int(meta["step"])
        self._restored = {"step": done, "directory": ckpt.directory, "older": [s for s in ckpt.steps() if s < done],
                          "verified": ckpt.last_restore.get("verified", True)}
        return RunState(state, done, done, step_last=done)

    def _loop(self, run: RunState, step: Step, data_iter, ckpt: Checkpointer, writer: MetricsWriter,
              stop: _StopFlag) -> TrainResult:
        cfg = self.config.train
        last = min(cfg.steps, cfg.stop_after) if cfg.get("stop_after", 0) > 0 else cfg.steps
        while run.step < last:
            run.state, metrics = step.fn(run.state, self.global_batch(next(data_iter), step.batch_shardings))
            run.step += 1
            writer.advance()
            final = run.step == last
            if run.step % cfg.log_every == 0 or final:
                self._log(run, metrics, writer)
            if (cfg.eval_every and run.step % cfg.eval_every == 0) or run.step == cfg.steps:
                t0 = time.perf_counter()
                run.evaluated = self.evaluate(run.state, run.step)
                writer.write(run.step, run.evaluated, prefix="eval/")
                run.pause += time.perf_counter() - t0
            if run.step % cfg.checkpoint_every == 0 or final or stop.signum is not None:
                self._check_finite(int(jax.device_get(run.state.bad_step)), run.last_saved)
                ckpt.save(run.step, run.state, data_iter, self._meta(run.step))
                run.last_saved = run.step
            if stop.signum is not None:
                writer.message(f"ecomax: {signal.Signals(stop.signum).name} received: saved step {run.step}, stopping")
                return TrainResult("interrupted", run.step, run.logged, run.evaluated)
        return TrainResult("completed" if run.step == cfg.steps else "stopped", run.step, run.logged, run.evaluated)

    def _log(self, run: RunState, metrics: dict, writer: MetricsWriter) -> None:
        logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self._check_finite(int(logged.pop("bad_step")), run.last_saved)
        now = time.perf_counter()
        seconds = max(now - run.t_last - run.pause, 1e-9)
        logged["examples_per_sec"] = (run.step - run.step_last) * self.config.train.batch_size / seconds
        logged["step_time"] = seconds / (run.step - run.step_last)
        writer.write(run.step, logged)
        run.logged, run.t_last, run.step_last, run.pause = logged, now, run.step, 0.0

    def _check_finite(self, bad_step: int, last_saved: int | None) -> None:
        if bad_step < 0:
            return
        r = self._restored
        if r is None:
            raise NonFiniteLossError(bad_step + 1, last_saved)
        older = tuple(s for s in r["older"] if (r["directory"] / str(s)).is_dir())  # keep-N may have dropped some
        raise NonFiniteLossError(bad_step + 1, last_saved, r["step"], older, r["verified"])


def global_batch(local: dict[str, np.ndarray], shardings: dict) -> dict[str, jax.Array]:
    """This process's rows -> global arrays (one batched transfer when there is one process)."""
    if jax.process_count() == 1:
        return jax.device_put(local, {k: shardings[k] for k in local})
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in local.items()}


class _HostScoredStep:
    """Rollout (jitted) -> ``Task.score`` on the host -> updates (jitted): one train step of a task with a host
    function. A multi-turn task (``Task.turns``) runs ``rollout`` again after each ``Task.interact``. The
    later turns and the update are compiled at their first call, when the host's shapes are known."""

    def __init__(self, task: Task, rollout: Callable, update: Callable, shardings: TrainState, batch_sh: dict,
                 mesh: jax.sharding.Mesh):
        self.task, self.update, self.shardings, self.mesh = task, update, shardings, mesh
        self._rollout_fn = rollout
        self.rollout = jax.jit(rollout, in_shardings=(shardings, batch_sh))
        self._next_turn: Callable | None = None
        self._update: Callable | None = None
        if task.turns > 1 and not task.overrides("interact"):
            raise ValueError(f"task {type(task).__name__} has {task.turns} turns but no interact()")

    def _to_device(self, batch: dict[str, np.ndarray]) -> tuple[dict, dict]:
        sh = {k: batch_sharding(self.mesh, np.ndim(v)) for k, v in batch.items()}
        return global_batch(_local_rows(batch), sh), sh

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        step = int(jax.device_get(state.step))
        made = self.rollout(state, batch)
        for turn in range(1, self.task.turns):
            context, sh = self._to_device(self.task.interact({k: to_host(v) for k, v in made.items()}, step, turn))
            if self._next_turn is None:
                self._next_turn = jax.jit(self._rollout_fn, in_shardings=(self.shardings, sh, None))
            made = self._next_turn(state, context, jnp.int32(turn))
        scored, scored_sh = self._to_device(self.task.score({k: to_host(v) for k, v in made.items()}, step))
        if self._update is None:
            self._update = jit_train_step(self.update, self.shardings, scored_sh, self.mesh)
        return self._update(state, scored)


def _local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's rows of a host batch that every process holds whole."""
    if jax.process_count() == 1:
        return batch
    n = jax.process_count()
    return {k: np.array_split(np.asarray(v), n)[jax.process_index()] for k, v in batch.items()}


def train(config: ml_collections.ConfigDict, workdir: pathlib.Path | str) -> TrainResult:
    """Train ``config`` in ``workdir``, resuming from its newest good checkpoint."""
    return Trainer.create(config, workdir).run()
