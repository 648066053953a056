"""Mesh construction, rules, and the batch-axis order that keeps XLA's partitioner correct."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from models.partitioning import logical_to_spec
from trainers.mesh import BATCH_AXES, make_mesh, parse_rules, resolve_mesh_shape


def test_resolve_mesh_shape_fills_minus_one_and_checks_the_product():
    assert resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 1, 2)   # expert absent: 1
    assert resolve_mesh_shape({"data": 1, "fsdp": 1, "expert": -1, "tensor": 2}, 8) == (1, 1, 4, 2)
    with pytest.raises(ValueError, match="needs 4 devices, 8 are available"):
        resolve_mesh_shape({"data": 1, "fsdp": 2, "tensor": 2}, 8)
    with pytest.raises(ValueError, match="not divisible by 3"):
        resolve_mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)


def test_rules_map_logical_names_and_use_each_mesh_axis_once():
    rules = parse_rules({"batch": "fsdp,data", "embed": "fsdp", "mlp": "tensor", "seq": ""})
    assert logical_to_spec(("batch", "seq", "embed"), rules) == P(("fsdp", "data"), None, None)
    assert logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    assert logical_to_spec(("unknown", None), rules) == P(None, None)
    assert make_mesh({"data": 2, "fsdp": 2, "tensor": 2}).axis_types == (jax.sharding.AxisType.Auto,) * 4


@pytest.mark.parametrize("batch_axes,correct", [(BATCH_AXES, True), (("data", "fsdp"), False)])
def test_batch_axis_order_and_the_partitioner_row_swap(batch_axes, correct):
    """``a @ w.T`` with ``a`` over (batch axes, tensor) and ``w`` over (fsdp, tensor) on 2x2x2.

    jaxlib 0.10.2 returns rows 1 and 2 swapped for the ("data", "fsdp") order: a partitioner bug that
    corrupted gradients before the trainer switched to fsdp-major batches. When the second case fails
    (the product comes out right), the upstream fix has landed and the order no longer matters.
    """
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    a = np.arange(8, dtype=np.float32).reshape(4, 2)
    w = np.eye(2, dtype=np.float32)
    spec = NamedSharding(mesh, P(batch_axes, "tensor"))
    f = jax.jit(lambda a, w: a @ w.T, out_shardings=spec)
    out = np.asarray(f(jax.device_put(a, spec), jax.device_put(w, NamedSharding(mesh, P("fsdp", "tensor")))))
    assert np.array_equal(out, a) == correct
