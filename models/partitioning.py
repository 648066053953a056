"""Logical axis names -> mesh partitioning, for parameters and activations.

Every parameter of an ecomax model is created with logical axis names::

    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))

and activations are constrained with the same vocabulary::

    x = constrain(x, ("batch", "seq", "embed"))

A *rule set* maps each logical name to mesh axes (``{"batch": ("fsdp", "data"), "embed": ("fsdp",),
"mlp": ("tensor",)}``); names that are absent or map to ``()`` are replicated. The trainer picks the
rules from the config and activates them while it traces the step (``activation_rules``); outside that
context ``constrain`` is a no-op, so models run unchanged in plain Python, in tests and in exports.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Mapping[str, tuple[str, ...]]
LogicalAxes = Sequence[str | None]

# Names the models in this repository use. A rule set may name more; a model may not use fewer-known ones
# silently: `logical_to_spec` accepts any name, the trainer's config check lists unknown ones.
LOGICAL_AXES = ("batch", "seq", "embed", "mlp", "heads", "kv", "vocab", "patch", "channels", "classes", "layers", "relpos",
                "expert")


def logical_to_spec(axes: LogicalAxes, rules: Rules) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec; a mesh axis is used at most once (first use wins)."""
    used: set[str] = set()
    spec: list[Any] = []
    for name in axes:
        mesh_axes = tuple(a for a in (rules.get(name, ()) if name else ()) if a not in used)
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def path_name(path: Sequence[Any]) -> str:
    """A parameter's path as one ``a/b/0/kernel`` string, the names optimizer regexes, ``init_from`` targets
    and exported tensors use.

    ``path`` is a key path of an ``nnx`` flat state (plain strings and ints), of ``jax.tree_util``
    (``DictKey.key``, ``SequenceKey.idx``) or a list of strings; each entry becomes its key, index or ``str``.
    """
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_logical_axes(abstract_state: nnx.State) -> dict:
    """Pure nested dict of each variable's logical axis names (from ``nnx.with_partitioning``).

    Raises ValueError naming the parameter when a non-scalar one carries no names.
    """
    flat = {}
    for path, var in nnx.to_flat_state(abstract_state):
        names = var.get_metadata().get("out_sharding") if hasattr(var, "get_metadata") else None
        shape = getattr(var, "shape", None) or getattr(var.get_value(), "shape", ())
        if names is None:
            if len(shape) == 0:
                names = ()
            else:
                raise ValueError(
                    f"parameter {path_name(path)} {tuple(shape)} has no logical axis names: create it with "
                    "nnx.with_partitioning(init, (...)) or nnx.Param(value, out_sharding=(...))")
        if len(names) != len(shape):
            raise ValueError(f"parameter {path_name(path)}: {len(names)} logical names {tuple(names)} "
                             f"for shape {tuple(shape)}")
        flat[path] = tuple(names)
    return _unflatten(flat)


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(getattr(key, "key", key), {})
        node[getattr(path[-1], "key", path[-1])] = value
    return out


def tree_specs(logical: Any, rules: Rules) -> Any:
    """Map a pytree whose leaves are logical-axis tuples to PartitionSpecs."""
    return jax.tree.map(lambda axes: logical_to_spec(axes, rules), logical, is_leaf=lambda x: isinstance(x, tuple))


# --- activations -----------------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("ecomax_rules", default=None)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Within this context (active while a step is traced), ``constrain`` applies ``rules`` on ``mesh``."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing ``activation_rules`` (the trainer's step), or None in plain calls."""
    active = _ACTIVE.get()
    return None if active is None else active[0]


def active() -> tuple[Mesh, Rules] | None:
    """``(mesh, rules)`` of the enclosing ``activation_rules``, or None in plain calls."""
    return _ACTIVE.get()


def shards(name: str) -> int:
    """How many ways the active rules split logical axis ``name`` (1 outside ``activation_rules``)."""
    active = _ACTIVE.get()
    if active is None:
        return 1
    mesh, rules = active
    return math.prod(mesh.shape[a] for a in rules.get(name, ()))


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Constrain an activation's sharding by logical names; a no-op outside ``activation_rules``."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    if len(axes) != x.ndim:
        raise ValueError(f"constrain: {len(axes)} logical names {tuple(axes)} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules)))
