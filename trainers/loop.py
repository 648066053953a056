"""The training loop: set up (mesh, task, state, data, checkpoints), then step, log, evaluate, save.

The loop only reads device values back at log, eval and checkpoint steps; every other step is an
asynchronous dispatch of the jitted step. SIGTERM/SIGINT finish the current step, save a checkpoint
and return with ``status="interrupted"``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from data_pipelines.loader import process_batches
from trainers.checkpoints import Checkpointer, config_fingerprint
from trainers.init_from import apply_init_from
from trainers.mesh import batch_sharding, make_mesh, parse_rules
from trainers.metrics_writer import MetricsWriter
from trainers.optimizer import make_optimizer
from trainers.state import ModelSpec, TrainState, abstract_state, init_state, model_spec, state_shardings
from trainers.step import jit_train_step, make_train_step
from trainers.tasks import EvalContext, Task, get_task

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/Inf; the state was not updated past ``step``."""

    def __init__(self, step: int, last_checkpoint: int | None):
        self.step = step
        where = (f"the last good checkpoint (step {last_checkpoint}) is intact" if last_checkpoint is not None
                 else "no checkpoint was written")
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


@dataclasses.dataclass
class Trainer:
    """Everything a run needs, built from the config; ``run()`` trains."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    task: Task
    spec: ModelSpec
    mesh: jax.sharding.Mesh
    _eval_compiled: dict = dataclasses.field(default_factory=dict, repr=False)

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
        return state_shardings(self.spec, tx, self.mesh, self.rules)

    def batch_shardings(self) -> dict:
        return {k: batch_sharding(self.mesh, len(v.shape))
                for k, v in self.task.batch_spec(self.config.train.batch_size).items()}

    def compiled_step(self):
        """The jitted train step, the optimizer's schedule and the state shardings."""
        tx, schedule = self.optimizer()
        shardings = self.shardings(tx)
        step = make_train_step(self.task.loss, self.spec.graphdef, tx, schedule, mesh=self.mesh, rules=self.rules,
                               seed=self.config.seed, microbatches=self.config.train.microbatches,
                               compute_dtype=self.config.train.compute_dtype)
        return jit_train_step(step, shardings, self.batch_shardings(), self.mesh), tx, shardings

    def lower(self) -> jax.stages.Lowered:
        """The train step lowered for abstract state and batch: compiles paper-scale configs without memory."""
        step_fn, tx, shardings = self.compiled_step()
        batch_sh = self.batch_shardings()
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k])
                 for k, v in self.task.batch_spec(self.config.train.batch_size).items()}
        return step_fn.lower(abstract_state(self.spec, tx, shardings), batch)

    def data(self):
        source, transform = self.task.train_source()
        d = self.config.data
        return process_batches(source, global_batch_size=self.config.train.batch_size, seed=self.config.seed,
                               transform=transform, shuffle=self.task.shuffle, process_index=jax.process_index(),
                               process_count=jax.process_count(), read_threads=d.get("read_threads", 4),
                               prefetch=d.get("prefetch", 16), worker_count=d.get("worker_count", 0))

    def global_batch(self, local: dict[str, np.ndarray], shardings: dict) -> dict[str, jax.Array]:
        """This process's rows -> global arrays (one batched transfer when there is one process)."""
        if jax.process_count() == 1:
            return jax.device_put(local, {k: shardings[k] for k in local})
        return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in local.items()}

    def evaluate(self, state: TrainState, step: int) -> dict[str, float]:
        ctx = EvalContext(self.spec.graphdef, state.params, self.mesh, step, self.workdir, self._eval_compiled)
        results = self.task.evaluate(ctx)
        return {k: float(v) for k, v in results.items() if isinstance(v, (int, float, np.number))}

    # --- the run -----------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.config.train
        primary = jax.process_index() == 0
        self.workdir.mkdir(parents=True, exist_ok=True)
        if primary:
            (self.workdir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2, default=str))
        step_fn, tx, shardings = self.compiled_step()
        batch_sh = self.batch_shardings()
        data_iter = iter(self.data())
        ckpt = Checkpointer(self.workdir / "checkpoints", keep=cfg.keep_checkpoints,
                            use_async=cfg.get("async_checkpoints", True))
        fingerprint = config_fingerprint(self.config)
        state, last_saved = self._restore_or_init(ckpt, tx, shardings, data_iter, fingerprint)
        start = int(jax.device_get(state.step))
        writer = MetricsWriter(self.workdir, total_steps=cfg.steps, initial_step=start, enabled=primary)
        writer.message(f"ecomax: task {self.config.task}, {self.spec.num_params:,} parameters, mesh "
                       f"{dict(self.mesh.shape)}, {'resuming at step ' + str(start) if start else 'from scratch'}")
        result = TrainResult("completed", start, {}, {})
        try:
            with _StopFlag() as stop:
                state, result = self._loop(state, step_fn, data_iter, batch_sh, ckpt, writer, stop, start,
                                           last_saved, fingerprint)
        finally:
            ckpt.close()
            writer.close()
        return result

    def _restore_or_init(self, ckpt: Checkpointer, tx, shardings: TrainState, data_iter: Iterator,
                         fingerprint: str) -> tuple[TrainState, int | None]:
        restored = ckpt.restore_latest(abstract_state(self.spec, tx, shardings), data_iter)
        if restored is None:
            state = init_state(self.task.build_model, self.config.seed, tx, shardings)
            if any(entry.path for entry in self.config.get("init_from", {}).values()):
                state = state.replace(params=apply_init_from(state.params, shardings.params, self.config.init_from))
            return state, None
        state, meta = restored
        if meta.get("config_hash") != fingerprint:
            log.warning("resuming from a checkpoint written with another config (hash %s, now %s)",
                        meta.get("config_hash"), fingerprint)
        return state, int(meta["step"])

    def _loop(self, state, step_fn, data_iter, batch_sh, ckpt, writer, stop, start, last_saved, fingerprint):
        cfg = self.config.train
        logged: dict[str, float] = {}
        evaluated: dict[str, float] = {}
        t_last, step_last, pause = time.perf_counter(), start, 0.0
        done = start
        last = min(cfg.steps, cfg.stop_after) if cfg.get("stop_after", 0) > 0 else cfg.steps
        for done in range(start + 1, last + 1):
            state, metrics = step_fn(state, self.global_batch(next(data_iter), batch_sh))
            writer.advance()
            final = done == last
            if done % cfg.log_every == 0 or final:
                logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
                self._check_finite(int(logged.pop("bad_step")), last_saved)
                now = time.perf_counter()
                seconds = max(now - t_last - pause, 1e-9)  # evaluation time is not training time
                logged["examples_per_sec"] = (done - step_last) * cfg.batch_size / seconds
                logged["step_time"] = seconds / (done - step_last)
                writer.write(done, logged)
                t_last, step_last, pause = now, done, 0.0
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                t0 = time.perf_counter()
                evaluated = self.evaluate(state, done)
                writer.write(done, evaluated, prefix="eval/")
                pause += time.perf_counter() - t0
            if done % cfg.checkpoint_every == 0 or final or stop.signum is not None:
                self._check_finite(int(jax.device_get(state.bad_step)), last_saved)
                ckpt.save(done, state, data_iter, {"step": done, "config_hash": fingerprint})
                last_saved = done
            if stop.signum is not None:
                writer.message(f"ecomax: {signal.Signals(stop.signum).name} received: saved step {done}, stopping")
                return state, TrainResult("interrupted", done, logged, evaluated)
        return state, TrainResult("completed" if done == cfg.steps else "stopped", done, logged, evaluated)

    @staticmethod
    def _check_finite(bad_step: int, last_saved: int | None) -> None:
        if bad_step >= 0:
            raise NonFiniteLossError(bad_step + 1, last_saved)


def train(config: ml_collections.ConfigDict, workdir: pathlib.Path | str) -> TrainResult:
    """Train ``config`` in ``workdir``, resuming from its newest good checkpoint."""
    return Trainer.create(config, workdir).run()
