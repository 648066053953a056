"""The train state and its creation directly sharded on the mesh.

Parameters are a pure nested dict of arrays (``nnx.to_pure_dict``); the model's graph definition is
kept aside and merged back inside jitted functions. Shardings come from each parameter's logical axis
names and the config's rules; parameters and optimizer state are born sharded
(``jax.jit(init, out_shardings=...)``) and never exist whole on one device.
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

from models.partitioning import Rules, param_logical_axes, tree_specs
from trainers.mesh import replicated


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: optimizer steps taken
    params: Any  # nested dict of f32 arrays
    opt_state: optax.OptState
    bad_step: jax.Array  # int32 []: first step whose loss or gradient was non-finite, -1 if none


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
        extra = [("/".join(map(str, p)), type(v).__name__) for r in rest for p, v in nnx.to_flat_state(r)]
        raise ValueError(f"models must hold only nnx.Param state; found {extra[:5]}")
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


def state_shardings(spec: ModelSpec, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules) -> TrainState:
    """Shardings of every leaf of the train state: optimizer moments follow their parameters."""
    p_sh = param_shardings(spec, mesh, rules)
    opt_sh = _follow_params(jax.eval_shape(tx.init, spec.abstract_params), spec.abstract_params, p_sh,
                            replicated(mesh))
    return TrainState(step=replicated(mesh), params=p_sh, opt_state=opt_sh, bad_step=replicated(mesh))


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


def abstract_state(spec: ModelSpec, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """The train state as ShapeDtypeStructs carrying ``shardings``: the target for restoring."""
    shapes = jax.eval_shape(lambda p: _fresh_state(p, tx), spec.abstract_params)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _fresh_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      bad_step=jnp.full((), -1, jnp.int32))


def init_state(build: Callable[[nnx.Rngs], nnx.Module], seed: int, tx: optax.GradientTransformation,
               shardings: TrainState) -> TrainState:
    """Initialise parameters and optimizer state directly into ``shardings``."""

    def init() -> TrainState:
        with nnx.use_eager_sharding(False):
            _, params = _pure_params(build(nnx.Rngs(seed)))
        return _fresh_state(params, tx)

    return jax.jit(init, out_shardings=shardings)()
