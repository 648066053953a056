"""The train state and its creation directly sharded on the mesh.

Parameters are a pure nested dict of arrays (``nnx.to_pure_dict``); the model's graph definition is
kept aside and merged back inside jitted functions. Shardings come from each parameter's logical axis
names and the config's rules; parameters, optimizer state and the task's own state are born sharded
(``jax.jit(init, out_shardings=...)``) and never exist whole on one device.

Task-owned state (``TrainState.extra``: codebooks, usage counts, EMA teachers, a reference policy,
running statistics) is whatever pytree ``Task.init_extra(params, rng)`` returns. A leaf wrapped as
``with_axes(x, ("codes", "embed"))`` is sharded by those logical names; an unwrapped leaf shaped like a
parameter at the same key path (a copy of the params, say) is sharded like that parameter; any other
leaf is replicated. It is checkpointed, restored onto another mesh and resumed like the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from models.partitioning import Rules, logical_to_spec, param_logical_axes, path_name, tree_specs
from trainers.mesh import replicated


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: train steps taken
    params: Any  # nested dict of f32 arrays
    opt_state: optax.OptState
    bad_step: jax.Array  # int32 []: first step whose loss or gradient was non-finite, -1 if none
    extra: Any = None  # the task's own state (Task.init_extra); None when the task keeps none


@jax.tree_util.register_pytree_node_class
class Logical:
    """A task-state leaf with the logical axis names to shard it by (see ``with_axes``)."""

    def __init__(self, value: Any, axes: tuple[str | None, ...]):
        self.value, self.axes = value, tuple(axes)

    def tree_flatten(self):
        return (self.value,), self.axes

    @classmethod
    def tree_unflatten(cls, axes, children):
        return cls(children[0], axes)


def with_axes(value: jax.Array, axes: tuple[str | None, ...]) -> Logical:
    """Mark a leaf of ``Task.init_extra``'s tree with logical axis names, e.g. ``("codes", "embed")``."""
    return Logical(value, axes)


def _is_logical(x: Any) -> bool:
    return isinstance(x, Logical)


def strip_axes(tree: Any) -> Any:
    """``tree`` with every ``Logical`` leaf replaced by its value."""
    return jax.tree.map(lambda x: x.value if _is_logical(x) else x, tree, is_leaf=_is_logical)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the trainer knows of a model without materialising it."""

    graphdef: nnx.GraphDef
    abstract_params: Any  # nested dict of ShapeDtypeStruct
    logical_axes: Any  # nested dict of logical-name tuples

    @property
    def num_params(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self.abstract_params))


def _pure_params(model: nnx.Module) -> Any:
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
    if any(jax.tree.leaves(r) for r in rest):
        extra = [(path_name(p), type(v).__name__) for r in rest for p, v in nnx.to_flat_state(r)]
        raise ValueError(f"models must hold only nnx.Param state; found {extra[:5]} (state that is not a "
                         "parameter belongs to the task: Task.init_extra)")
    return graphdef, nnx.to_pure_dict(params)


def model_spec(build: Callable[[nnx.Rngs], nnx.Module]) -> ModelSpec:
    """Trace ``build`` abstractly: graph definition, parameter shapes, logical axis names."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    graphdef, params = _pure_params(abstract)
    logical = param_logical_axes(nnx.state(abstract, nnx.Param))
    if jax.tree.structure(params) != jax.tree.structure(logical, is_leaf=lambda x: isinstance(x, tuple)):
        raise ValueError("parameter tree and logical-axis tree differ; is every variable an nnx.Param?")
    return ModelSpec(graphdef, params, logical)


def param_shardings(spec: ModelSpec, mesh: Mesh, rules: Rules) -> Any:
    return jax.tree.map(lambda p: NamedSharding(mesh, p), tree_specs(spec.logical_axes, rules),
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


ExtraInit = Callable[[Any, jax.Array], Any]  # (params, rng) -> the task's state (leaves may be ``Logical``)


def _no_extra(params: Any, rng: jax.Array) -> None:
    return None


def state_shardings(spec: ModelSpec, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules,
                    init_extra: ExtraInit = _no_extra) -> TrainState:
    """Shardings of every leaf of the train state: optimizer moments follow their parameters; task-state
    leaves follow their logical names, else a parameter of the same path and shape, else are replicated."""
    p_sh = param_shardings(spec, mesh, rules)
    opt_sh = _follow_params(jax.eval_shape(tx.init, spec.abstract_params), spec.abstract_params, p_sh,
                            replicated(mesh))
    extra = jax.eval_shape(init_extra, spec.abstract_params, jax.random.key(0))
    named = jax.tree.map(lambda x: NamedSharding(mesh, logical_to_spec(x.axes, rules)) if _is_logical(x) else None,
                         extra, is_leaf=_is_logical)
    followed = _follow_params(strip_axes(extra), spec.abstract_params, p_sh, replicated(mesh))
    extra_sh = jax.tree.map(lambda n, f: f if n is None else n, named, followed, is_leaf=lambda x: x is None)
    return TrainState(step=replicated(mesh), params=p_sh, opt_state=opt_sh, bad_step=replicated(mesh),
                      extra=extra_sh)


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def _follow_params(opt_shapes: Any, params: Any, param_sh: Any, default: NamedSharding) -> Any:
    """Shard each optimizer-state leaf like the parameter its key path ends with (same shape), else ``default``.

    Works for any optax state (chains, ``masked``, ``multi_transform``): moments are trees shaped like
    (a subset of) the parameters, nested under the transform's own keys.
    """
    by_path = {_keys(p): (leaf.shape, sh) for (p, leaf), sh in
               zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_sh))}
    depth = max(map(len, by_path), default=0)

    def pick(path, leaf):
        keys = _keys(path)
        for n in range(min(depth, len(keys)), 0, -1):
            shape, sharding = by_path.get(keys[-n:], (None, None))
            if shape is not None and shape == leaf.shape:
                return sharding
        return default

    return jax.tree.map_with_path(pick, opt_shapes)


def abstract_state(spec: ModelSpec, tx: optax.GradientTransformation, shardings: TrainState,
                   init_extra: ExtraInit = _no_extra) -> TrainState:
    """The train state as ShapeDtypeStructs carrying ``shardings``: the target for restoring."""
    shapes = jax.eval_shape(lambda p: _fresh_state(p, tx, init_extra, jax.random.key(0)), spec.abstract_params)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


# The task state's rng stream: independent of the parameters' (nnx.Rngs(seed)) for the same seed.
_EXTRA_STREAM = 0x5EED


def _fresh_state(params: Any, tx: optax.GradientTransformation, init_extra: ExtraInit, rng: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      bad_step=jnp.full((), -1, jnp.int32), extra=strip_axes(init_extra(params, rng)))


def init_state(build: Callable[[nnx.Rngs], nnx.Module], seed: int, tx: optax.GradientTransformation,
               shardings: TrainState, init_extra: ExtraInit = _no_extra) -> TrainState:
    """Initialise parameters, optimizer state and the task's state directly into ``shardings``."""

    def init() -> TrainState:
        with nnx.use_eager_sharding(False):
            _, params = _pure_params(build(nnx.Rngs(seed)))
        return _fresh_state(params, tx, init_extra, jax.random.fold_in(jax.random.key(seed), _EXTRA_STREAM))

    return jax.jit(init, out_shardings=shardings)()


def state_from_params(params: Any, seed: int, tx: optax.GradientTransformation, shardings: TrainState,
                      init_extra: ExtraInit = _no_extra) -> TrainState:
    """A fresh state around given (already sharded) ``params``: the optimizer state and the task's state are
    made from them, as ``init_state`` makes them from random ones (e.g. GRPO's reference = imported weights)."""
    rng = jax.random.fold_in(jax.random.key(seed), _EXTRA_STREAM)
    return jax.jit(lambda p: _fresh_state(p, tx, init_extra, rng), out_shardings=shardings)(params)
