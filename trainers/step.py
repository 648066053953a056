"""The train step: one jitted pure function ``(state, batch) -> (state, metrics)``.

A step is ``Task.update(ctx, state, batch, rng)``; by default that is ``ctx.gradient_step``: forward,
loss, gradients (accumulated over microbatches), global-norm clipping and the optax update, under a
mixed-precision policy: parameters stay f32, the model computes in ``compute_dtype`` (the parameters
are cast inside the differentiated function, so gradients arrive in f32). A task may replace the update
(a Lloyd iteration) or extend it (an EMA codebook update after the gradient update).

A task with a rollout makes the step's batch first: ``Task.rollout(ctx, state, batch, rng)`` with the
live parameters (sampling, beam search), then, if the task has one, a host function (``Task.score``:
a retriever, a reward model) between two jitted calls, then ``Task.updates_per_rollout`` updates on
that batch. Every random number derives from ``(seed, step)``, so a resumed run repeats the same steps.

Whatever the update, a non-finite loss, gradient norm or (for a task's own update) new state leaves the
state unchanged and records the step in ``state.bad_step``; the loop reads it when it logs or
checkpoints, so no step needs a host sync.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.partitioning import Rules, activation_rules
from trainers.mesh import BATCH_AXES
from trainers.state import TrainState

LossFn = Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
StepFn = Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]
# The update's rng is fold_in(key(seed), step) (then the update's index, when there are several); the
# rollout's is drawn from a stream of its own.
_ROLLOUT_STREAM = 0x7011


def cast_floats(tree: Any, dtype: jnp.dtype) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def split_microbatches(batch: Any, n: int, mesh: Mesh) -> Any:
    """``[b, ...] -> [n, b/n, ...]`` with microbatch m = rows m, m+n, m+2n, ...

    Taking strided rows keeps every device's rows on that device: no data moves.
    """

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, BATCH_AXES)))

    return jax.tree.map(split, batch)


@dataclasses.dataclass(frozen=True)
class UpdateContext:
    """What a task's ``update`` and ``rollout`` get besides the state: the model's graph, the optimizer and
    the default gradient step, traced inside the jitted step."""

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Mesh
    loss_fn: LossFn | None = None
    microbatches: int = 1
    compute_dtype: str = "float32"

    def model(self, params: Any) -> nnx.Module:
        """The model with ``params`` (cast to the compute dtype)."""
        return nnx.merge(self.graphdef, cast_floats(params, jnp.dtype(self.compute_dtype)))

    def gradients(self, params: Any, batch: Any, rng: jax.Array, loss_fn: LossFn | None = None):
        """``((loss, metrics), grads)`` of ``loss_fn`` (default: the task's loss), mean over microbatches."""
        loss_fn = loss_fn or self.loss_fn
        dtype = jnp.dtype(self.compute_dtype)

        def loss_of(params: Any, batch: Any, rng: jax.Array):
            loss, metrics = loss_fn(self.model(params), cast_floats(batch, dtype), rng)
            return loss.astype(jnp.float32), metrics

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        n = self.microbatches
        if n == 1:
            return grad_fn(params, batch, rng)

        def accumulate(carry, xs):
            micro, index = xs
            (loss, metrics), grads = grad_fn(params, micro, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, carry, ((loss, metrics), grads)), None

        micro = split_microbatches(batch, n, self.mesh)
        zeros = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32 if jnp.issubdtype(s.dtype, jnp.floating)
                                                 else s.dtype), zeros)
        total, _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(n)))
        return jax.tree.map(lambda x: x / n, total)

    def apply_gradients(self, state: TrainState, grads: Any) -> TrainState:
        # Every gradient is finished before the update starts (global-norm clipping implies it): a ViT-B/16
        # step that XLA:CPU fused into its backward ran 1.2-1.7x slower in a process holding other states.
        grads = jax.lax.optimization_barrier(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)

    def gradient_step(self, state: TrainState, batch: Any, rng: jax.Array,
                      loss_fn: LossFn | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
        """The default update: gradients of ``loss_fn`` (default: the task's loss), clipping, optax."""
        (loss, metrics), grads = self.gradients(state.params, batch, rng, loss_fn)
        return self.apply_gradients(state, grads), {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
                                                    "lr": self.schedule(state.step)}


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def guarded(update: Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict]], *, check_state: bool):
    """``update`` with the non-finite guard: when the loss, the gradient norm or (``check_state``: a task's
    own update) any float of the new params or task state is not finite, the state is kept as it was and
    ``bad_step`` records the step."""

    def step(state: TrainState, batch: Any, rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        new, metrics = update(state, batch, rng)
        finite = _all_finite({k: metrics[k] for k in ("loss", "grad_norm") if k in metrics})
        if check_state:
            finite &= _all_finite((new.params, new.extra))
        kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        kept = kept.replace(step=state.step, bad_step=jnp.where((state.bad_step < 0) & ~finite, state.step,
                                                                state.bad_step))
        return kept, metrics

    return step


def make_update(update: Callable, *, seed: int, mesh: Mesh, rules: Rules, updates: int = 1,
                check_state: bool = False) -> StepFn:
    """``updates`` guarded updates on one batch, then ``step + 1``: ``(state, batch) -> (state, metrics)``
    (the metrics of the last update)."""
    one = guarded(update, check_state=check_state)

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        with activation_rules(mesh, rules):
            metrics = {}
            for k in range(updates):  # GRPO's mu is small (1-4): unrolled
                state, metrics = one(state, batch, rng if updates == 1 else jax.random.fold_in(rng, k))
        state = state.replace(step=state.step + 1)
        return state, {**{k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}, "bad_step": state.bad_step}

    return step


def rollout_rng(seed: int, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _ROLLOUT_STREAM), step)


def make_rollout(rollout: Callable, *, seed: int, mesh: Mesh, rules: Rules) -> Callable[..., Any]:
    """``(state, data batch[, turn]) -> rollout batch`` with the live parameters, rng from ``(seed, step)``
    (and the turn of a multi-turn rollout, folded in)."""

    def run(state: TrainState, batch: Any, turn: jax.Array | None = None) -> Any:
        rng = rollout_rng(seed, state.step)
        if turn is not None:
            rng = jax.random.fold_in(rng, turn)
        with activation_rules(mesh, rules):
            return rollout(state, batch, rng)

    return run


def jit_train_step(step: Callable, state_shardings: TrainState, batch_shardings: Any, mesh: Mesh):
    """``jax.jit`` with explicit in/out shardings and the state donated."""
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=(0,))

