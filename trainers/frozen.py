"""A trained ecomax model, frozen, for another task to call: a reward model, a teacher, a ranker scoring what a
generator proposes (OneMall's RL reward is the KuaiSearch ranker's click probability).

    ranker = Frozen.load("runs/rank")                 # a workdir (newest verified checkpoint) or a params export
    probs = ranker.apply(predict, *arrays, batch_size=1024)      # jitted once per function, on one device

The config comes from the folder's ``config.json`` and the task it names builds the model; the parameters are
read as ``init_from`` reads them (``trainers/init_from.py``: the checkpoint's integrity record is verified).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from models.partitioning import path_name
from trainers.init_from import checkpoint_params
from trainers.state import model_spec


@dataclasses.dataclass
class Frozen:
    """``config`` and ``task`` of the trained run, its ``graphdef`` and host ``params``."""

    config: ml_collections.ConfigDict
    task: Any
    graphdef: nnx.GraphDef
    params: Any
    path: pathlib.Path
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | pathlib.Path, step: int | None = None) -> Frozen:
        from trainers.tasks import get_task  # noqa: PLC0415 - tasks import this module

        folder = pathlib.Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: no config.json; expected an ecomax workdir or an `ecomax export "
                                    "--format params` folder")
        config = ml_collections.ConfigDict(json.loads((folder / "config.json").read_text()))
        task = get_task(config)
        spec = model_spec(task.build_model)
        stored = {path_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(checkpoint_params(str(folder), step, ""))[0]}
        wanted, treedef = jax.tree_util.tree_flatten_with_path(spec.abstract_params)
        leaves = []
        for key, want in wanted:   # by path name: a checkpoint's list indices come back as "0", "1", ...
            got = stored.get(path_name(key))
            if got is None or got.shape != want.shape or np.dtype(got.dtype) != np.dtype(want.dtype):
                raise ValueError(f"{folder}: parameter {path_name(key)} is {None if got is None else (got.shape, got.dtype)}"
                                 f" in the checkpoint, but the model its config.json builds wants "
                                 f"{(want.shape, want.dtype)}")
            leaves.append(got)
        return cls(config, task, spec.graphdef, jax.device_put(jax.tree.unflatten(treedef, leaves)), folder)

    def apply(self, fn: Callable[..., jax.Array], *arrays: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """``fn(model, *batch) -> [b, ...]`` over ``arrays`` in batches of ``batch_size`` (or the power of two that
        holds all rows, when smaller; the last batch padded, so each size compiles once), jitted on the first
        device; -> numpy, ``len(arrays[0])`` rows."""
        if fn not in self._compiled:
            self._compiled[fn] = jax.jit(lambda params, *xs: fn(nnx.merge(self.graphdef, params), *xs))
        run, n = self._compiled[fn], len(arrays[0])
        batch_size = min(batch_size, 1 << max(0, n - 1).bit_length())
        out = []
        for start in range(0, n, batch_size):
            chunk = [np.asarray(a[start:start + batch_size]) for a in arrays]
            pad = batch_size - len(chunk[0])
            chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) if pad else c for c in chunk]
            out.append(np.asarray(run(self.params, *chunk))[:batch_size - pad])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)
