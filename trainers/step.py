"""The train step: one jitted pure function ``(state, batch) -> (state, metrics)``.

Forward, loss, gradients (accumulated over microbatches), global-norm clipping and the optax update,
under a mixed-precision policy: parameters stay f32, the model computes in ``compute_dtype`` (the
parameters are cast inside the differentiated function, so gradients arrive in f32). A non-finite
loss or gradient leaves the state unchanged and records the step in ``state.bad_step``; the loop
reads it when it logs or checkpoints, so no step needs a host sync.
"""

from __future__ import annotations

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


def make_train_step(loss_fn: LossFn, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, mesh: Mesh, rules: Rules, seed: int, microbatches: int = 1,
                    compute_dtype: str = "float32") -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """The un-jitted step; ``jit_train_step`` adds shardings and donation."""
    dtype = jnp.dtype(compute_dtype)

    def loss_of(params: Any, batch: Any, rng: jax.Array):
        model = nnx.merge(graphdef, cast_floats(params, dtype))
        loss, metrics = loss_fn(model, cast_floats(batch, dtype), rng)
        return loss.astype(jnp.float32), metrics

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def gradients(params: Any, batch: Any, rng: jax.Array):
        if microbatches == 1:
            return grad_fn(params, batch, rng)

        def accumulate(carry, xs):
            micro, index = xs
            (loss, metrics), grads = grad_fn(params, micro, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, carry, ((loss, metrics), grads)), None

        micro = split_microbatches(batch, microbatches, mesh)
        zeros = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32 if jnp.issubdtype(s.dtype, jnp.floating)
                                                 else s.dtype), zeros)
        total, _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(microbatches)))
        return jax.tree.map(lambda x: x / microbatches, total)

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        with activation_rules(mesh, rules):
            rng = jax.random.fold_in(jax.random.key(seed), state.step)
            (loss, metrics), grads = gradients(state.params, batch, rng)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            bad_step=jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step),
        )
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
                   "bad_step": new_state.bad_step}
        return new_state, jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype != jnp.int32 else x, metrics)

    return step


def jit_train_step(step: Callable, state_shardings: TrainState, batch_shardings: Any, mesh: Mesh):
    """``jax.jit`` with explicit in/out shardings and the state donated."""
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=(0,))
