"""Tasks: what a method plugs into the loop (model, loss, data, evaluators), registered by name.

A new method is a model file, a task module here, a config and tests; it touches no file of the loop.
The config's ``task`` field names the task; ``get_task`` imports ``trainers.tasks.<module>`` on demand,
so the loop imports no task.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from data_pipelines.loader import RandomAccessSource, Transform
from trainers.mesh import BATCH_AXES, data_parallel_size

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Tower:
    """A serving function of a trained model, for export and retrieval.

    ``fn(model, *arrays) -> [batch, dim]`` embeddings; ``inputs`` names each array and gives its
    per-example shape and dtype (no batch dimension), in the order ``fn`` takes them.
    """

    fn: Callable[..., jax.Array]
    inputs: dict[str, jax.ShapeDtypeStruct]


class Task(abc.ABC):
    """Base class of every task. Subclasses are registered with ``@register("name")``."""

    # False when ``train_source()`` already returns examples in training order (e.g. grouped into batches);
    # the loader then cuts global batches in source order instead of shuffling by index.
    shuffle: bool = True

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        # The trainer asks more than once (shapes, pipeline); sources may be costly to open or generate.
        self.train_source = functools.cache(self.train_source)

    @abc.abstractmethod
    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """The model, with every parameter carrying logical axis names."""

    @abc.abstractmethod
    def loss(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        """``(model, global batch, rng) -> (scalar loss, {name: scalar})``, traced inside the train step."""

    @abc.abstractmethod
    def train_source(self) -> tuple[RandomAccessSource, Transform | None]:
        """The training examples and the per-example ``transform(record, rng) -> dict of arrays``."""

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of one global batch (for compiling without data); by default read off one example."""
        source, transform = self.train_source()
        example = source[0] if transform is None else transform(source[0], np.random.default_rng(0))
        return {k: jax.ShapeDtypeStruct((batch_size, *np.shape(v)), np.asarray(v).dtype) for k, v in example.items()}

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        """Evaluation metrics at ``ctx.step``; by default none."""
        return {}

    def towers(self) -> dict[str, Tower]:
        """Named serving functions (e.g. ``query`` and ``item``) for export; by default none."""
        return {}


@dataclasses.dataclass
class EvalContext:
    """What an evaluator gets: the model (as graphdef + sharded params), the mesh and where to write."""

    graphdef: nnx.GraphDef
    params: Any
    mesh: Mesh
    step: int
    workdir: pathlib.Path
    # fn -> its jitted form; the trainer passes one dict to every evaluation, so repeated evaluations
    # (train.eval_every) reuse the compiled embedding functions instead of tracing them again.
    compiled: dict = dataclasses.field(default_factory=dict)

    @property
    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params)

    def apply(self, fn: Callable[..., Any], *arrays: np.ndarray) -> Any:
        """Run ``fn(model, *arrays)`` jitted on the mesh with the batch split over the data axes.

        ``arrays`` are host arrays of one batch, identical on every process (any length: padded to a
        multiple of the data-parallel size and cut back); returns host numpy arrays.
        """
        n = len(arrays[0])
        pad = -n % data_parallel_size(self.mesh)
        arrays = [np.concatenate([a, np.repeat(a[-1:], pad, 0)]) if pad else a for a in arrays]
        sharded = [jax.make_array_from_callback(a.shape, NamedSharding(self.mesh, P(BATCH_AXES)),
                                                lambda idx, a=a: a[idx]) for a in arrays]
        if fn not in self.compiled:
            graphdef = self.graphdef
            self.compiled[fn] = jax.jit(lambda params, *xs: fn(nnx.merge(graphdef, params), *xs))
        out = self.compiled[fn](self.params, *sharded)
        return jax.tree.map(lambda x: to_host(x)[:n], out)


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process, sharded) array as a host numpy array on every process."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


_REGISTRY: dict[str, type[Task]] = {}


def register(name: str) -> Callable[[type[Task]], type[Task]]:
    def wrap(cls: type[Task]) -> type[Task]:
        _REGISTRY[name] = cls
        return cls
    return wrap


def get_task(config: ml_collections.ConfigDict) -> Task:
    """The task named by ``config.task``, importing ``trainers.tasks.<name>`` if needed."""
    name = config.task
    if name not in _REGISTRY:
        try:
            importlib.import_module(f"trainers.tasks.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"trainers.tasks.{name}":
                raise
    if name not in _REGISTRY:
        known = sorted(p.stem for p in pathlib.Path(__file__).parent.glob("*.py") if p.stem != "__init__")
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(known)}")
    return _REGISTRY[name](config)
