"""Tasks: what a method plugs into the loop (model, loss or update, data or rollout, task state,
evaluators, serving functions), registered by name.

A new method is a model file, a task module here, a config and tests; it touches no file of the loop.
The config's ``task`` field names the task; ``get_task`` imports ``trainers.tasks.<name>`` on demand,
so the loop imports no task. A task living elsewhere is named ``package.module:name`` (the module is
imported, then ``name`` looked up in the registry), e.g. the tiny tasks of the test suite.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from data_pipelines.loader import RandomAccessSource, Transform
from trainers.mesh import BATCH_AXES, data_parallel_size
from trainers.state import TrainState, with_axes  # noqa: F401 - with_axes: for tasks' init_extra
from trainers.step import UpdateContext

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Tower:
    """A serving function of a trained model, for export, retrieval and decoding.

    ``fn(model, *arrays) -> outputs``: ``[batch, dim]`` embeddings for a retrieval tower, or any pytree
    of ``[batch, ...]`` arrays (semantic-ID codes, beams and their scores). ``inputs`` names each array
    and gives its per-example shape and dtype (no batch dimension), in the order ``fn`` takes them.
    """

    fn: Callable[..., Any]
    inputs: dict[str, jax.ShapeDtypeStruct]


@dataclasses.dataclass
class Corpus:
    """Items to index for ``ecomax export --format scann``: ``tower`` names the ``Task.towers()`` entry
    that embeds them; ``batches`` yields ``(ids [n], inputs)`` with ``inputs`` a tuple of arrays in the
    tower's input order; ``description`` is recorded in the export's manifest."""

    tower: str
    batches: Iterable[tuple[np.ndarray, tuple[np.ndarray, ...]]]
    description: dict[str, Any]


class Task(abc.ABC):
    """Base class of every task. Subclasses are registered with ``@register("name")``.

    Required: ``build_model``, and either ``loss`` (the default gradient step uses it) or ``update``.
    Everything else is optional, declared here with its default:

    * data: ``train_source`` (none: every step's data batch is ``{}``, e.g. a rollout task that samples
      its own prompts), ``inputs`` (per-example shapes; ``batch_spec`` derives from it), ``shuffle``;
    * task-owned state: ``init_extra`` (codebooks, counts, EMA teachers, a reference policy), carried in
      ``TrainState.extra``; ``host_state``/``load_host_state`` for what a host function keeps (JSON);
    * the step: ``update`` (default: ``ctx.gradient_step``); ``rollout`` (makes the step's batch with the
      live parameters), ``score`` (a host function between rollout and update), ``updates_per_rollout``,
      ``turns`` and ``interact`` (a multi-turn rollout with the host environment between turns);
    * evaluation and serving: ``evaluate``, ``towers``, ``export_corpus``, ``forward_flops``, ``model_config``.
    """

    # False when ``train_source()`` already returns examples in training order (e.g. grouped into batches);
    # the loader then cuts global batches in source order instead of shuffling by index.
    shuffle: bool = True

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        # The trainer asks more than once (shapes, pipeline); sources may be costly to open or generate.
        self.train_source = functools.cache(self.train_source)

    def overrides(self, name: str) -> bool:
        """Whether this task defines the optional ability ``name`` (e.g. ``"rollout"``, ``"score"``)."""
        return getattr(type(self), name) is not getattr(Task, name)

    # --- model and loss -----------------------------------------------------------------------------------

    @abc.abstractmethod
    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """The model, with every parameter carrying logical axis names."""

    def loss(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        """``(model, global batch, rng) -> (scalar loss, {name: scalar})``, traced inside the train step."""
        raise NotImplementedError(f"{type(self).__name__} defines neither loss() nor update()")

    # --- data ---------------------------------------------------------------------------------------------

    def train_source(self) -> tuple[RandomAccessSource, Transform | None] | None:
        """The training examples and the per-example ``transform(record, rng) -> dict of arrays``; None
        when the task makes its batches itself (``rollout`` gets ``{}``)."""
        return None

    def inputs(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Per-example shapes and dtypes of a training example (no batch dimension); by default read off
        the first example of ``train_source``. Declare them to compile without touching data."""
        found = self.train_source()
        if found is None:
            return {}
        source, transform = found
        example = source[0] if transform is None else transform(source[0], np.random.default_rng(0))
        return {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in example.items()}

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of one global batch: ``inputs()`` with a leading ``batch_size``."""
        return {k: jax.ShapeDtypeStruct((batch_size, *v.shape), v.dtype) for k, v in self.inputs().items()}

    # --- task-owned state ---------------------------------------------------------------------------------

    def init_extra(self, params: Any, rng: jax.Array) -> Any:
        """The task's own state, traced inside the jitted init: a pytree of arrays (leaves may be
        ``with_axes(x, names)`` to shard them), or None. ``params`` are the freshly initialised parameters."""
        return None

    def host_state(self) -> dict[str, Any]:
        """What the host side (``score``) keeps across steps, as JSON; saved with every checkpoint."""
        return {}

    def load_host_state(self, state: dict[str, Any]) -> None:
        """Restore ``host_state()`` from a checkpoint."""

    # --- the step -----------------------------------------------------------------------------------------

    def update(self, ctx: UpdateContext, state: TrainState, batch: Batch,
               rng: jax.Array) -> tuple[TrainState, Metrics]:
        """One update of ``state`` on ``batch``, traced inside the jitted step; by default the gradient step
        of ``loss``. Replace it (a Lloyd iteration) or extend it (an EMA update after ``ctx.gradient_step``);
        the engine keeps the non-finite guard and advances ``state.step``."""
        return ctx.gradient_step(state, batch, rng)

    def rollout(self, ctx: UpdateContext, state: TrainState, batch: Batch, rng: jax.Array) -> Batch:
        """Make this step's training batch from ``state`` (jitted, live parameters): sample or beam-search,
        record the log-probs of what was generated. ``batch`` is the data batch (``{}`` without a source)."""
        raise NotImplementedError

    def score(self, rollout: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
        """A host function between ``rollout`` and ``update`` (a retriever, a reward model, a simulator):
        the rollout's arrays on the host in, the training batch out (same leading dimension)."""
        raise NotImplementedError

    @property
    def updates_per_rollout(self) -> int:
        """Updates taken on each rollout (GRPO's mu), against the log-probs recorded at rollout time."""
        return 1

    @property
    def turns(self) -> int:
        """Rollout calls per train step: a multi-turn agent generates, the environment answers
        (``interact``, on the host), it generates again, ``turns`` times; then ``score`` and the updates."""
        return 1

    def interact(self, rollout: dict[str, np.ndarray], step: int, turn: int) -> dict[str, np.ndarray]:
        """The environment between two rollout turns (a retriever answering the policy's searches): the
        previous turn's arrays on the host in, the next turn's ``rollout`` batch out (the same arrays every
        turn, so it compiles once). ``turn`` counts from 1."""
        raise NotImplementedError

    # --- evaluation, serving, export ----------------------------------------------------------------------

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        """Evaluation metrics at ``ctx.step``; by default none."""
        return {}

    def towers(self) -> dict[str, Tower]:
        """Named serving functions (e.g. ``query`` and ``item``) for export; by default none. Return the same
        function objects on every call (module-level functions), so compiled forms are reused."""
        return {}

    def export_corpus(self, name: str = "eval", size: int | None = None) -> Corpus | None:
        """The items ``ecomax export --format scann`` indexes (``size`` caps them); None: the task has none."""
        return None

    def forward_flops(self, batch_size: int) -> Mapping[str, float] | None:
        """Analytic forward matmul FLOPs of one global batch, by part, for ``ecomax bench``'s MFU; None: unknown."""
        return None

    def model_config(self) -> Any:
        """The model's configuration (a dataclass), recorded in exports; None when the task has none."""
        return None


@dataclasses.dataclass
class EvalContext:
    """What an evaluator gets: the model (as graphdef + sharded params), the task's state, the mesh and
    where to write."""

    graphdef: nnx.GraphDef
    params: Any
    mesh: Mesh
    step: int
    workdir: pathlib.Path
    # fn -> its jitted form; the trainer passes one dict to every evaluation, so repeated evaluations
    # (train.eval_every) reuse the compiled functions instead of tracing them again.
    compiled: dict = dataclasses.field(default_factory=dict)
    extra: Any = None  # TrainState.extra

    @property
    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params)

    def apply(self, fn: Callable[..., Any], *arrays: np.ndarray, batch_size: int | None = None,
              replicated: Mapping[str, Any] | None = None) -> Any:
        """Run ``fn(model, *arrays, **replicated)`` jitted on the mesh with the rows of ``arrays`` split over
        the data axes; returns host numpy arrays (any pytree ``fn`` returns).

        ``arrays`` are host arrays of equal length, identical on every process. With ``batch_size`` they are
        run in chunks of that many rows (a short one padded: one program serves every call with that
        ``batch_size``) and the outputs concatenated; without it, in one call (padded to a multiple of the
        data-parallel size).
        ``replicated`` operands (a trie, a codebook table, ``ctx.extra``) go to every device whole.
        """
        n = len(arrays[0])
        if batch_size is None:
            return self._apply_batch(fn, arrays, replicated or {}, n)
        if n <= batch_size:
            return self._apply_batch(fn, arrays, replicated or {}, batch_size)
        outs = [self._apply_batch(fn, [a[s:s + batch_size] for a in arrays], replicated or {}, batch_size)
                for s in range(0, n, batch_size)]
        return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *outs)

    def _apply_batch(self, fn: Callable[..., Any], arrays: Sequence[np.ndarray], replicated: Mapping[str, Any],
                     rows: int) -> Any:
        n = len(arrays[0])
        rows = rows + -rows % data_parallel_size(self.mesh)
        arrays = [np.concatenate([a, np.repeat(a[-1:], rows - n, 0)]) if rows > n else a for a in arrays]
        sharded = [jax.make_array_from_callback(a.shape, NamedSharding(self.mesh, P(BATCH_AXES)),
                                                lambda idx, a=a: a[idx]) for a in arrays]
        key = _cache_key(fn)
        if key not in self.compiled:
            graphdef = self.graphdef
            self.compiled[key] = jax.jit(lambda params, rep, *xs: fn(nnx.merge(graphdef, params), *xs, **rep))
        out = self.compiled[key](self.params, dict(replicated), *sharded)
        return jax.tree.map(lambda x: to_host(x)[:n], out)


def _cache_key(fn: Callable[..., Any]) -> Any:
    """``fn`` itself, or for a ``functools.partial`` its function and arguments (a fresh partial of the same
    call must hit the same compiled entry)."""
    if isinstance(fn, functools.partial):
        try:
            key = (_cache_key(fn.func), fn.args, tuple(sorted(fn.keywords.items())))
            hash(key)
            return key
        except TypeError:
            return fn
    return fn


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
    module, _, name = config.task.rpartition(":")
    module = module or f"trainers.tasks.{name}"
    if name not in _REGISTRY:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    if name not in _REGISTRY:
        known = sorted(p.stem for p in pathlib.Path(__file__).parent.glob("*.py") if p.stem != "__init__")
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(known)}")
    return _REGISTRY[name](config)
