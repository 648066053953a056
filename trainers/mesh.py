"""The device mesh (``data`` x ``fsdp`` x ``expert`` x ``tensor``, Auto axes) and the config's sharding rules.

``expert`` is the expert-parallel axis of sparse MoE layers (``models/moe.py``): outside them it carries
batch like ``data``; inside, the experts are split over it. Size 1 unless a config asks for it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from models.partitioning import Rules

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# The batch dimension of every input is split over the data-parallel axes, fsdp-major: with
# ("data", "fsdp") the SPMD partitioner of jaxlib 0.10.2 swaps batch rows in matmuls whose other operand
# is sharded over fsdp when fsdp and tensor have equal sizes (e.g. 2x2x2), silently corrupting
# gradients; ("fsdp", "data") partitions the same work correctly. README: Known issues. The expert axis
# comes last: it carries batch outside the MoE layers.
BATCH_AXES = ("fsdp", "data", "expert")

DEFAULT_RULES = {
    "batch": "fsdp,data,expert",
    "embed": "fsdp",
    "expert": "expert",
    "mlp": "tensor",
    "heads": "tensor",
    "vocab": "tensor",
}


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Fill a -1 axis with the remaining devices; check the product equals ``num_devices``. ``expert`` may be
    absent (1)."""
    shape = [int(sizes[a]) if a in sizes or a != "expert" else 1 for a in MESH_AXES]
    if shape.count(-1) == 1:
        known = int(np.prod([s for s in shape if s != -1]))
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: {num_devices} devices are not divisible by {known}")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, "
                         f"{num_devices} are available")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with Auto axis types (jax 0.10 defaults ``make_mesh`` to Explicit)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(sizes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def parse_rules(rules: Mapping[str, str]) -> Rules:
    """Config rules ``{"embed": "fsdp", "batch": "fsdp,data", "seq": ""}`` -> ``{name: (axes...)}``."""
    return {name: tuple(a.strip() for a in axes.split(",") if a.strip()) for name, axes in rules.items()}


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
